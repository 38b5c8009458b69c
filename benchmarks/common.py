"""Shared benchmark plumbing: machine metadata, round-robin timing with warm-up, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mbn.fileio import atomic_write_text

RESULTS = Path(__file__).parent / "results"


def cpu_model() -> str:
    """The CPU's model name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "date": time.strftime("%Y-%m-%d"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def sync(device: torch.device) -> None:
    """Wait for queued device work (timings must include it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(
    cases: dict[str, Callable[[], object]], device: torch.device, repeats: int = 7, warmup: int = 2
) -> dict[str, dict[str, float]]:
    """Median and IQR seconds per call of each case, interleaved so drift hits every case alike."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            sync(device)
            tic = time.perf_counter()
            fn()
            sync(device)
            samples[name].append(time.perf_counter() - tic)
    out = {}
    for name, values in samples.items():
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        out[name] = {"median_s": statistics.median(values), "iqr_s": q[2] - q[0]}
    return out


def write_json(name: str, payload: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    return path
