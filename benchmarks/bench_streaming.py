"""Time to the first training step and peak memory: streamed (data.preload=false) vs preloaded ImageFolder trees.

Each case runs in a fresh process (cold decoded-image cache for the preloaded path, so its one-time decode is
counted): build the trainer on the first N training images of the tree (``data.train_limit``), run one step, and
report the seconds from process start to the end of that step, the main process's peak RSS and the largest
DataLoader worker's. Vanilla recipe, CIFAR
ResNet-8 width 16, batch 64, 2 DataLoader workers for the streamed path, 256 test images.

With ``--webdataset``: the same 10k-image ImageFolder tree (the shared CIFAR-10 test split, linked as both ``train``
and ``test``) streamed as a tree (``data.preload=false``) and as WebDataset tar shards (``data.name=webdataset``;
written once to a temporary folder by ``mbn.data.make_shards``, 1000 samples a shard). Each case in a fresh process:
the seconds from process start to the first training batch and to the end of the first training step, and the
loader's images/s over one epoch of 64-image batches (2 workers, no training), with the ratios shards / tree.

Usage:
    python benchmarks/bench_streaming.py [--root ../shared/datasets/cifar10] [--sizes 1000 10000 50000]
    python benchmarks/bench_streaming.py --webdataset [--tree ../shared/datasets/cifar10/test] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
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


LOADER_CASE = r"""
import json, sys, time
tic = time.perf_counter()
from mbn.config import load_recipe
from mbn.data import build_data
cfg = load_recipe(sys.argv[1], sys.argv[2:])
bundle = build_data(cfg.data, seed=0, device="cpu")
built = time.perf_counter()
batches = bundle.train.epoch_batches(0)
images = len(next(batches)[0])
first = time.perf_counter()
rest = sum(len(x) for x, _ in batches)
end = time.perf_counter()
print(json.dumps({"build_s": built - tic, "first_batch_s": first - tic, "images": images + rest,
                  "images_per_s": rest / (end - first)}))
"""


def measure(root: Path, size: int, preload: bool, tmp: Path) -> dict[str, float]:
    overrides = [
        "data.name=imagefolder", f"data.root={root}", f"data.train_limit={size}", "data.test_limit=256",
        f"data.preload={str(preload).lower()}", f"data.num_workers={0 if preload else 2}", "data.batch_size=64",
        "model.name=cifar_resnet8", "model.width=16", "trainer.progress=none", "logging.tensorboard=false",
        "trainer.max_steps=1",  # the trainer reads its length from the recipe when built, not from cfg afterwards
    ]  # fmt: skip
    run = tmp / f"run-{size}-{preload}"
    env = {**os.environ, "MBN_CACHE_DIR": str(tmp / f"cache-{size}-{preload}"), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", CASE, str(REPO / "recipes" / "vanilla.yaml"), str(run), *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_case(code: str, args: list[str], env: dict[str, str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise SystemExit(f"case failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_source(overrides: list[str], tmp: Path, name: str) -> dict[str, float]:
    """First batch and images/s of the training loader alone, then the first step of a trainer: two processes."""
    common = [
        "data.test_limit=256", "data.num_workers=2", "data.batch_size=64", "model.name=cifar_resnet8",
        "model.width=16", "trainer.progress=none", "logging.tensorboard=false", "trainer.max_steps=1",
    ]  # fmt: skip
    env = {**os.environ, "MBN_CACHE_DIR": str(tmp / "cache"), "PYTHONPATH": str(REPO)}
    recipe = str(REPO / "recipes" / "vanilla.yaml")
    loader = run_case(LOADER_CASE, [recipe, *common, *overrides], env)
    step = run_case(CASE, [recipe, str(tmp / f"run-{name}-{time.monotonic_ns()}"), *common, *overrides], env)
    return {**loader, "first_step_s": step["first_step_s"]}


def compare_webdataset(tree: Path, rounds: int) -> None:
    """Streamed ImageFolder vs WebDataset shards of the same tree (median of ``rounds`` alternating rounds)."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root = tmp / "tree"
        root.mkdir()
        for split in ("train", "test"):
            (root / split).symlink_to(tree.resolve(), target_is_directory=True)
        tic = time.perf_counter()
        cmd = [sys.executable, "-m", "mbn.data.make_shards", str(root), str(tmp / "shards"), "--shard-size", "1000",
               "--splits", "train", "test"]  # fmt: skip
        written = subprocess.run(
            cmd, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)}
        )
        make_shards_s = time.perf_counter() - tic
        patterns = dict(line.split(": ", 1)[1].split("=", 1) for line in written.stdout.strip().splitlines())
        sources = {
            "imagefolder": ["data.name=imagefolder", f"data.root={root}", "data.preload=false"],
            "webdataset": ["data.name=webdataset", f"data.root={patterns['data.root']}",
                           f"data.test_root={patterns['data.test_root']}"],
        }  # fmt: skip
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in sources}
        for _ in range(rounds):
            for name, overrides in sources.items():
                runs[name].append(measure_source(overrides, tmp, name))
    results = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
    tree_, shards = results["imagefolder"], results["webdataset"]
    ratios = {key: shards[key] / tree_[key] for key in ("first_batch_s", "first_step_s", "images_per_s")}
    info = {"machine": machine_info(torch.device("cpu")), "tree": str(tree), "rounds": rounds,
            "make_shards_s": make_shards_s, "results": results, "ratios_shards_over_tree": ratios}  # fmt: skip
    print(f"machine: {info['machine']}")
    print(f"make_shards: {make_shards_s:.1f} s for {int(tree_['images'])} training images (+ the test split)")
    for name, r in results.items():
        print(f"{name}: first batch {r['first_batch_s']:.2f} s ({r['first_batch_s'] - r['build_s']:.2f} s after the "
              f"loaders are built), first step {r['first_step_s']:.2f} s, "
              f"{r['images_per_s']:.0f} images/s over {int(r['images'])} images")  # fmt: skip
    print("webdataset / imagefolder: " + ", ".join(f"{k} x{v:.2f}" for k, v in ratios.items()))
    print(f"written {write_json('streaming_webdataset', info)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO.parent / "shared" / "datasets" / "cifar10")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--webdataset", action="store_true", help="streamed tree vs WebDataset shards of --tree")
    parser.add_argument("--tree", type=Path, default=REPO.parent / "shared" / "datasets" / "cifar10" / "test")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds (--webdataset); medians reported")
    args = parser.parse_args()
    if args.webdataset:
        compare_webdataset(args.tree, args.rounds)
        return
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
