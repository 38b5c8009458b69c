"""Framework overhead: ``mbn-train``'s step (``Trainer.train_one_epoch``) vs a minimal hand-written loop.

Claim measured: the engine adds <= 5% per step over a plain PyTorch loop doing the same math: same
model (CIFAR ResNet-8, width 16, converted to the recipe's BNs), same batches (the same resumable
loader, synthetic data, batch 64, no workers), same optimiser and schedule, same attack (PGD1 eps 1
through the adv BN in eval mode, targeted, 80% random start). The hand loop uses only mbn's core
(routing + ``mbn.attacks``), no Trainer. ``vanilla`` and ``advprop`` are measured; blocks of steps of
the two loops alternate (round robin) and the median per-step time of the blocks is compared.
Logging: TensorBoard off, log lines off, ``log_every`` 10**9 (the engine's per-step bookkeeping stays).

The whole measurement is repeated ``--repeats`` times (fresh trainers each time) and the median ratio is
reported with its range, so a reader sees the spread.

Usage:
    python benchmarks/bench_overhead.py [--steps-per-block 8] [--blocks 5] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from common import machine_info, write_json

import mbn
from mbn.config import load_recipe
from mbn.data import to_device
from mbn.train import Trainer, build_trainer

OVERRIDES = [
    "model.name=cifar_resnet8", "model.width=16", "data.name=synthetic", "data.synthetic_train_size=4096",
    "data.synthetic_test_size=64", "data.batch_size=64", "data.num_workers=0", "trainer.progress=none",
    "trainer.log_every=1000000000", "logging.tensorboard=false", "trainer.epochs=100",
]  # fmt: skip


def hand_loop(trainer: Trainer, recipe: str):
    """A plain loop over the same model/optimiser/batches; returns ``run(n_steps) -> seconds``."""
    model, opt, sched = trainer.model, trainer.update.optimizer, trainer.update.scheduler
    num_classes, advprop = trainer.data.num_classes, recipe == "advprop"
    state = {"epoch": 0, "batches": iter(())}

    def next_batch():
        try:
            return next(state["batches"])
        except StopIteration:
            state["batches"] = iter(trainer.data.train.epoch_batches(state["epoch"]))
            state["epoch"] += 1
            return next(state["batches"])

    def adv_forward(t):
        with mbn.use_source(model, "adv"):
            return model(t)

    def run(n: int) -> float:
        model.train()
        tic = time.perf_counter()
        for step in range(n):
            g = torch.Generator().manual_seed(step)
            x, y = to_device(next_batch(), trainer.runtime.device)
            if not advprop:
                loss = F.cross_entropy(model(x), y)
            else:
                target = mbn.attacks.random_wrong_labels(y, num_classes, g)
                with mbn.eval_mode(model):
                    x_adv = mbn.attacks.pgd(adv_forward, x, target, eps=1 / 255, steps=1, step_size=1 / 255,
                                            random_start=0.8, targeted=True, generator=g)  # fmt: skip
                with mbn.split_sources(model, {"clean": len(x), "adv": len(x_adv)}):
                    logits = model(torch.cat([x, x_adv]))
                loss = F.cross_entropy(logits[: len(x)], y) + F.cross_entropy(logits[len(x) :], y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        return time.perf_counter() - tic

    return run


def engine_loop(trainer: Trainer):
    """``Trainer.train_one_epoch`` bounded to n steps through ``max_steps``."""

    def run(n: int) -> float:
        trainer.length = trainer.hooks.length = replace(trainer.length, max_steps=trainer.state.step + n)
        tic = time.perf_counter()
        while trainer.state.step < trainer.length.max_steps:
            if trainer.epoch_done:
                trainer.state.epoch, trainer.state.batch = trainer.state.epoch + 1, 0
            trainer.train_one_epoch(trainer.state.epoch)
        return time.perf_counter() - tic

    return run


def measure(recipe: str, steps: int, blocks: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_recipe(f"recipes/{recipe}.yaml", OVERRIDES)
        engine = engine_loop(build_trainer(cfg, Path(tmp) / "engine"))  # one run directory each: each holds its lock
        hand = hand_loop(build_trainer(cfg, Path(tmp) / "hand"), recipe)
        engine(2), hand(2)  # warm-up
        times: dict[str, list[float]] = {"engine": [], "hand": []}
        for _ in range(blocks):
            times["engine"].append(engine(steps) / steps)
            times["hand"].append(hand(steps) / steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"per_step_s": med, "blocks": times, "ratio_engine_over_hand": med["engine"] / med["hand"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-per-block", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--name", default="overhead", help="results file benchmarks/results/<name>.json")
    args = parser.parse_args()
    runs = [{r: measure(r, args.steps_per_block, args.blocks) for r in ("vanilla", "advprop")}
            for _ in range(args.repeats)]  # fmt: skip
    results = {}
    for recipe in ("vanilla", "advprop"):
        ratios = [run[recipe]["ratio_engine_over_hand"] for run in runs]
        results[recipe] = {
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "ratios": ratios, "runs": [run[recipe] for run in runs],
        }  # fmt: skip
        ms = {k: statistics.median(run[recipe]["per_step_s"][k] for run in runs) * 1e3 for k in ("engine", "hand")}
        print(f"{recipe}: engine/hand = {statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f} "
              f"over {len(ratios)} runs; {ms['engine']:.1f} ms vs {ms['hand']:.1f} ms per step)")  # fmt: skip
    payload = {"machine": machine_info(torch.device("cpu")), "settings": OVERRIDES, "results": results}
    print(f"written {write_json(args.name, payload)}")


if __name__ == "__main__":
    main()
