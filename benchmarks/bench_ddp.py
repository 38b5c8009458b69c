"""DDP overhead: the same recipe as one process and as ``torchrun --nproc_per_node=2`` (gloo on CPU, NCCL on CUDA).

Each case is a whole ``mbn-train`` run (synthetic data, CIFAR ResNet-8 width 16, batch 64 per process, 60 steps,
TensorBoard off); the per-step time is ``train_time_s / steps`` and the throughput ``images_per_s`` from its
``metrics.json`` (every rank's images; the first logging window, warm-up, is excluded). Cases alternate over
``--repeats`` rounds and medians are reported. On a 2-core CPU two processes share the cores that one process
uses with 2 threads, so no speed-up is expected: the point is the overhead (all-reduce, buffer broadcast, agreed
stop flags).

``--find-unused`` instead compares two processes with ``trainer.find_unused_parameters=true`` (what every
multi-BN recipe used before 0.3.1) against the default, which skips DDP's search for unused parameters where every
BN and head is trained every step (``ddp_find_unused_<device>.json``).

Usage:
    python benchmarks/bench_ddp.py [--repeats 3] [--device cpu|cuda] [--recipes vanilla advprop] [--find-unused]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import machine_info, write_json

REPO = Path(__file__).resolve().parents[1]
SETTINGS = [
    "data.name=synthetic", "data.synthetic_train_size=8192", "data.synthetic_test_size=64", "data.batch_size=64",
    "data.num_workers=0", "model.name=cifar_resnet8", "model.width=16", "trainer.progress=none",
    "trainer.log_every=10", "trainer.max_steps=60", "trainer.eval_every=0", "logging.tensorboard=false",
]  # fmt: skip


def run(recipe: str, processes: int, out: Path, device: str, *extra: str) -> dict[str, float]:
    launcher = [sys.executable, "-m", "mbn.cli.train"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                    "-m", "mbn.cli.train"]  # fmt: skip
    cmd = [*launcher, str(REPO / "recipes" / f"{recipe}.yaml"), *SETTINGS, f"trainer.device={device}",
           f"trainer.out_dir={out}", *extra]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    metrics = json.loads((out / "metrics.json").read_text())
    return {"step_s": metrics["train_time_s"] / metrics["steps"], "images_per_s": metrics["images_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--recipes", nargs="+", default=["vanilla", "advprop"])
    parser.add_argument("--find-unused", action="store_true", help="compare find_unused_parameters true vs default")
    args = parser.parse_args()
    if args.find_unused:
        compare_find_unused(args)
        return
    samples: dict[str, dict[int, list[dict[str, float]]]] = {r: {1: [], 2: []} for r in args.recipes}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for recipe in args.recipes:
                for processes in (1, 2):
                    out = Path(tmp) / f"{recipe}-{processes}-{i}"
                    samples[recipe][processes].append(run(recipe, processes, out, args.device))
    results = {}
    for recipe, by_procs in samples.items():
        med = {p: {k: statistics.median(s[k] for s in runs) for k in ("step_s", "images_per_s")}
               for p, runs in by_procs.items()}  # fmt: skip
        results[recipe] = {
            "one_process": med[1],
            "two_processes": med[2],
            "step_time_ratio": med[2]["step_s"] / med[1]["step_s"],
            "throughput_ratio": med[2]["images_per_s"] / med[1]["images_per_s"],
            "runs": {str(p): runs for p, runs in by_procs.items()},
        }
        print(f"{recipe}: step {med[1]['step_s'] * 1e3:.1f} ms (1 process) vs {med[2]['step_s'] * 1e3:.1f} ms "
              f"(2 processes, x{results[recipe]['step_time_ratio']:.2f}); images/s {med[1]['images_per_s']:.0f} vs "
              f"{med[2]['images_per_s']:.0f} (x{results[recipe]['throughput_ratio']:.2f})")  # fmt: skip
    device = torch.device(args.device)
    path = write_json(f"ddp_{device.type}", {"machine": machine_info(device), "settings": SETTINGS, "results": results})
    print(f"written {path}")


def compare_find_unused(args: argparse.Namespace) -> None:
    """Two processes, ``trainer.find_unused_parameters=true`` vs the default, alternating over the repeats."""
    cases = {"forced_true": ["trainer.find_unused_parameters=true"], "default": []}
    samples: dict[str, dict[str, list[dict[str, float]]]] = {r: {c: [] for c in cases} for r in args.recipes}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for recipe in args.recipes:
                for case, extra in cases.items():
                    out = Path(tmp) / f"{recipe}-{case}-{i}"
                    samples[recipe][case].append(run(recipe, 2, out, args.device, *extra))
    results = {}
    for recipe, by_case in samples.items():
        med = {c: statistics.median(s["step_s"] for s in runs) for c, runs in by_case.items()}
        results[recipe] = {"step_s": med, "default_over_forced": med["default"] / med["forced_true"], "runs": by_case}
        print(f"{recipe}: {med['forced_true'] * 1e3:.1f} ms/step with find_unused_parameters=true, "
              f"{med['default'] * 1e3:.1f} ms by default (x{results[recipe]['default_over_forced']:.3f})")  # fmt: skip
    device = torch.device(args.device)
    payload = {"machine": machine_info(device), "settings": SETTINGS, "processes": 2, "results": results}
    print(f"written {write_json(f'ddp_find_unused_{device.type}', payload)}")


if __name__ == "__main__":
    main()
