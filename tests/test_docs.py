"""Code shown in the user docs runs."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import mbn

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _python_blocks(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / name).read_text(), flags=re.S)


def test_feature_plugin_doc_example_registers_and_runs(scratch_registry):
    exec(_python_blocks("plugins.md")[0], {})
    domain = mbn.create_domain("color_jitter", strength=0.5)
    ctx = mbn.DomainContext(model=torch.nn.Linear(1, 1), bn="clean", generator=torch.Generator().manual_seed(0))
    images = torch.rand(8, 3, 16, 16)
    out, _ = domain.generate(images, torch.arange(8), ctx)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, images)
