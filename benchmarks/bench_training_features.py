"""What the weight average and gradient accumulation cost per optimiser step, measured through ``mbn-train``'s engine.

Cases, each a fresh trainer on the same model and synthetic data (CIFAR ResNet-8 by default, no workers,
logging off), timed in alternating blocks of steps (round robin) so drift hits every case alike:

- ``base``: batch 64, one forward/backward per optimiser step;
- ``ema``: the same with ``ema.decay=0.9999`` (one ``torch._foreach_lerp_`` over weights and BN statistics per step);
- ``accum4``: ``data.batch_size=16`` with ``optim.grad_accum_steps=4``: the same 64 images per optimiser step in four
  micro-batches (four forwards, backwards and domain generations, one optimiser step).

Ratios against ``base`` are reported per recipe (``vanilla``: 1 BN; ``advprop``: clean + PGD-1 adversarial BN),
medians over ``--repeats`` whole measurements with their range. On a CPU the ``accum4`` ratio is mostly the price of
smaller batches (worse kernel efficiency), which accumulation exists to trade for memory.

Usage:
    python benchmarks/bench_training_features.py [--model cifar_resnet8] [--width 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from bench_overhead import engine_loop
from common import machine_info, write_json

from mbn.config import load_recipe
from mbn.train import build_trainer

COMMON = [
    "data.name=synthetic", "data.synthetic_train_size=4096", "data.synthetic_test_size=64", "data.num_workers=0",
    "trainer.progress=none", "trainer.log_every=1000000000", "logging.tensorboard=false", "trainer.epochs=100",
]  # fmt: skip
CASES = {
    "base": ["data.batch_size=64"],
    "ema": ["data.batch_size=64", "ema.decay=0.9999"],
    "accum4": ["data.batch_size=16", "optim.grad_accum_steps=4"],
}


def measure(recipe: str, model: list[str], steps: int, blocks: int) -> dict:
    """Median seconds per optimiser step of each case, blocks of ``steps`` alternating between the cases."""
    with tempfile.TemporaryDirectory() as tmp:
        loops, params = {}, 0
        for name, extra in CASES.items():
            trainer = build_trainer(load_recipe(f"recipes/{recipe}.yaml", COMMON + model + extra), Path(tmp) / name)
            loops[name], params = engine_loop(trainer), sum(p.numel() for p in trainer.model.parameters())
        for run in loops.values():
            run(2)  # warm-up
        times: dict[str, list[float]] = {name: [] for name in loops}
        for _ in range(blocks):
            for name, run in loops.items():
                times[name].append(run(steps) / steps)
    med = {name: statistics.median(v) for name, v in times.items()}
    ratios = {n: med[n] / med["base"] for n in med}
    return {"per_step_s": med, "blocks": times, "ratio_over_base": ratios, "params": params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cifar_resnet8")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--steps-per-block", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="training_features", help="results file benchmarks/results/<name>.json")
    args = parser.parse_args()
    model = [f"model.name={args.model}", f"model.width={args.width}"]
    results = {}
    for recipe in ("vanilla", "advprop"):
        runs = [measure(recipe, model, args.steps_per_block, args.blocks) for _ in range(args.repeats)]
        summary = {}
        for case in CASES:
            ratios = [run["ratio_over_base"][case] for run in runs]
            ms = statistics.median(run["per_step_s"][case] for run in runs) * 1e3
            summary[case] = {"ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
                             "ratio_max": max(ratios), "per_step_ms": ms}  # fmt: skip
            print(f"{recipe:8s} {case:7s} {ms:7.1f} ms/step  x{statistics.median(ratios):.3f} of base "
                  f"(range {min(ratios):.3f}-{max(ratios):.3f} over {len(ratios)} runs)")  # fmt: skip
        results[recipe] = {"params": runs[0]["params"], "summary": summary, "runs": runs}
    payload = {"machine": machine_info(torch.device("cpu")), "model": model,
               "settings": COMMON, "cases": CASES, "results": results}  # fmt: skip
    print(f"written {write_json(args.name, payload)}")


if __name__ == "__main__":
    main()
