"""Time to the first training step and peak memory: streamed (data.preload=false) vs preloaded ImageFolder trees.

Each case runs in a fresh process (cold decoded-image cache for the preloaded path, so its one-time decode is
counted): build the trainer on the first N training images of the tree (``data.train_limit``), run one step, and
report the seconds from process start to the end of that step, the main process's peak RSS and the largest
DataLoader worker's. Vanilla recipe, CIFAR
ResNet-8 width 16, batch 64, 2 DataLoader workers for the streamed path, 256 test images.

Usage:
    python benchmarks/bench_streaming.py [--root ../shared/datasets/cifar10] [--sizes 1000 10000 50000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import machine_info, write_json

REPO = Path(__file__).resolve().parents[1]
CASE = r"""
import json, resource, sys, time
tic = time.perf_counter()
from mbn.config import load_recipe
from mbn.train import Trainer, build_trainer
cfg = load_recipe(sys.argv[1], sys.argv[3:])
with build_trainer(cfg, sys.argv[2]) as trainer:
    trainer.cfg.trainer.max_steps = 1
    trainer.train_one_epoch(0)
    seconds = time.perf_counter() - tic
rss = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
       "peak_rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
print(json.dumps({"first_step_s": seconds, **rss}))
"""


def measure(root: Path, size: int, preload: bool, tmp: Path) -> dict[str, float]:
    overrides = [
        "data.name=imagefolder", f"data.root={root}", f"data.train_limit={size}", "data.test_limit=256",
        f"data.preload={str(preload).lower()}", f"data.num_workers={0 if preload else 2}", "data.batch_size=64",
        "model.name=cifar_resnet8", "model.width=16", "trainer.progress=none", "logging.tensorboard=false",
    ]  # fmt: skip
    run = tmp / f"run-{size}-{preload}"
    env = {**os.environ, "MBN_CACHE_DIR": str(tmp / f"cache-{size}-{preload}"), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", CASE, str(REPO / "recipes" / "vanilla.yaml"), str(run), *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO.parent / "shared" / "datasets" / "cifar10")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            preloaded = measure(args.root, size, True, Path(tmp))
            streamed = measure(args.root, size, False, Path(tmp))
            results[size] = {
                "preloaded": preloaded,
                "streamed": streamed,
                "first_step_ratio": streamed["first_step_s"] / preloaded["first_step_s"],
                "rss_ratio": streamed["peak_rss_mb"] / preloaded["peak_rss_mb"],
            }
            print(f"{size} images: first step {preloaded['first_step_s']:.1f} s preloaded, "
                  f"{streamed['first_step_s']:.1f} s streamed (x{results[size]['first_step_ratio']:.2f}); "
                  f"peak RSS {preloaded['peak_rss_mb']:.0f} MB vs {streamed['peak_rss_mb']:.0f} MB "
                  f"(x{results[size]['rss_ratio']:.2f})", flush=True)  # fmt: skip
    info = {"machine": machine_info(torch.device("cpu")), "root": str(args.root), "results": results}
    print(f"written {write_json('streaming', info)}")


if __name__ == "__main__":
    main()
