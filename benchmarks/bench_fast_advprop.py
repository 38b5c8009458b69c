"""Step cost of AdvProp variants relative to vanilla, measured in one run on the same model and batches.

Cases (all through ``Trainer.train_one_epoch``; by default CIFAR ResNet-8 width 16, synthetic 32x32 data, batch
64; ``--model cifar_resnet18 --width 64 --batch-size 128`` is the shipped recipes' model and batch; no workers,
TensorBoard and log lines off): ``vanilla``, ``advprop_pgd1`` (recipes/advprop.yaml), ``advprop_pgd5``
(PGD5, eps 4), ``fast_advprop`` (recipes/fast_advprop.yaml). Blocks of steps of the cases alternate (round
robin) and the median per-step time over the blocks is compared with vanilla's. The per-run ratio multiplies
the per-step ratio by the run's epochs over vanilla's: ``fast_advprop`` trains ``trainer.budget_of=vanilla``
epochs, the others as many as vanilla.

Usage:
    python benchmarks/bench_fast_advprop.py [--steps-per-block 6] [--blocks 5] [--device cpu|cuda]
        [--model cifar_resnet8 --width 16 --batch-size 64]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import machine_info, sync, write_json

from mbn.config import load_recipe
from mbn.train import Trainer, build_trainer

COMMON = [
    "data.name=synthetic", "data.synthetic_train_size=4096",
    "data.synthetic_test_size=64", "data.num_workers=0", "trainer.progress=none",
    "trainer.log_every=1000000000", "logging.tensorboard=false", "trainer.epochs=105",
]  # fmt: skip
REPO = Path(__file__).resolve().parents[1]
CASES = {
    "vanilla": ("vanilla", []),
    "advprop_pgd1": ("advprop", []),
    "advprop_pgd5": ("advprop", ["domains.adv.steps=5", "domains.adv.eps=4"]),
    "fast_advprop": ("fast_advprop", []),
}


def stepper(trainer: Trainer):
    """``run(n) -> seconds`` for n more engine steps."""

    def run(n: int) -> float:
        trainer.length = trainer.hooks.length = replace(trainer.length, max_steps=trainer.state.step + n)
        sync(trainer.runtime.device)
        tic = time.perf_counter()
        while trainer.state.step < trainer.length.max_steps:
            if trainer.epoch_done:
                trainer.state.epoch, trainer.state.batch = trainer.state.epoch + 1, 0
            trainer.train_one_epoch(trainer.state.epoch)
        sync(trainer.runtime.device)
        return time.perf_counter() - tic

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-per-block", type=int, default=6)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="cifar_resnet8")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    size = [f"model.name={args.model}", f"model.width={args.width}", f"data.batch_size={args.batch_size}"]
    settings = [*size, *COMMON]
    with tempfile.TemporaryDirectory() as tmp:
        trainers, runs = {}, {}
        for name, (recipe, extra) in CASES.items():
            cfg = load_recipe(REPO / "recipes" / f"{recipe}.yaml", [*settings, f"trainer.device={args.device}", *extra])
            trainers[name] = build_trainer(cfg, Path(tmp) / name)
            runs[name] = stepper(trainers[name])
        for run in runs.values():
            run(2)  # warm-up
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.blocks):
            for name, run in runs.items():
                times[name].append(run(args.steps_per_block) / args.steps_per_block)
        per_step = {name: statistics.median(v) for name, v in times.items()}
        epochs = {name: trainers[name].epochs for name in runs}
        for trainer in trainers.values():
            trainer.close()
    results = {
        name: {
            "per_step_s": per_step[name],
            "blocks_s": times[name],
            "epochs": epochs[name],
            "step_ratio": per_step[name] / per_step["vanilla"],
            "run_ratio": per_step[name] * epochs[name] / (per_step["vanilla"] * epochs["vanilla"]),
        }
        for name in runs
    }
    device = torch.device(args.device)
    default_size = (args.model, args.width, args.batch_size) == ("cifar_resnet8", 16, 64)
    name = f"fast_advprop_{device.type}" + ("" if default_size else f"_{args.model}_w{args.width}_b{args.batch_size}")
    path = write_json(name, {"machine": machine_info(device), "settings": settings, "results": results})
    for name, res in results.items():
        print(f"{name}: {res['per_step_s'] * 1e3:.1f} ms/step, x{res['step_ratio']:.2f} per step, "
              f"x{res['run_ratio']:.2f} per run ({res['epochs']} epochs)")  # fmt: skip
    print(f"written {path}")


if __name__ == "__main__":
    main()
