"""Shared fixtures: ``device``/``dtype`` driven by ``--device`` (kornia's conftest pattern)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = REPO.parent / "shared" / "datasets" / "cifar10"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="cpu, cuda or all")


def _devices(config: pytest.Config) -> list[str]:
    opt = config.getoption("--device")
    devices = ["cpu", "cuda"] if opt == "all" else opt.split(",")
    return [d for d in devices if d == "cpu" or torch.cuda.is_available()]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", [torch.device(d) for d in _devices(metafunc.config)], ids=str)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def shared_cifar10() -> Path:
    """The shared CIFAR-10 ImageFolder tree; skips the test when it is absent."""
    if not (SHARED_CIFAR10 / "train").is_dir():
        pytest.skip(f"{SHARED_CIFAR10} not present")
    return SHARED_CIFAR10


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Domains registered during the test are forgotten afterwards."""
    from mbn import registry

    registry.available_domains()  # entry points indexed into the real registry first, not only into the copies
    monkeypatch.setattr(registry, "_DOMAINS", dict(registry._DOMAINS))
    monkeypatch.setattr(registry, "_ORIGINS", dict(registry._ORIGINS))
    monkeypatch.setattr(registry, "_ENTRY_POINTS", dict(registry._ENTRY_POINTS))
