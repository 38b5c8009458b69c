"""Seconds per 10,000 images of ``mbn-eval --suite``: plain scoring, with ``--bn-adapt``, with ``--bn-route auto``.

Times :func:`mbn.eval.suite_eval.evaluate_suite` in-process on a CIFAR-10-C-layout suite (``--write-suite`` output or
the published arrays) for a trained run, on a few corruption sets read in full (``--corruptions``), after one
warm-up set; the model's load and the suite's listing are not counted. Each variant runs ``--repeats`` times
(round robin) and the median is reported.

Usage:
    python benchmarks/bench_suites.py RUN SUITE_DIR [--corruptions fog contrast] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from common import machine_info, write_json

from mbn.data import to_device
from mbn.eval.loading import load_run
from mbn.eval.suite_eval import Preparation, evaluate_suite
from mbn.eval.suites import SuiteSpec, read_suite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("suite", type=Path)
    parser.add_argument("--corruptions", nargs="+", default=["fog", "contrast"])
    parser.add_argument("--severities", type=int, nargs="+", default=[3])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default="suites", help="results file benchmarks/results/<name>.json")
    args = parser.parse_args()

    run = load_run(args.run, args.device)
    suite = read_suite(
        SuiteSpec.parse(f"cifar10-c={args.suite}"), run.stats.class_names,
        corruptions=args.corruptions, severities=args.severities,
    )  # fmt: skip
    move = partial(to_device, device=run.device)
    common = dict(source=run.sources[0], to_device=move, prepare=Preparation(run.stats.image_size),
                  batch_size=args.batch_size)  # fmt: skip
    variants = {
        "plain": {},
        "bn_adapt": {"bn_adapt": True},
        "bn_route_auto": {"route_sources": run.sources},
    }
    warm = read_suite(SuiteSpec.parse(f"cifar10-c={args.suite}"), run.stats.class_names, limit=512,
                      corruptions=args.corruptions[:1], severities=[1])  # fmt: skip
    evaluate_suite(run.model, warm, **common)  # type: ignore[arg-type]
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, extra in variants.items():
            start = time.perf_counter()
            evaluate_suite(run.model, suite, **common, **extra)  # type: ignore[arg-type]
            if run.device.type == "cuda":
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - start)
    per_10k = {name: statistics.median(s) / suite.num_images * 10_000 for name, s in seconds.items()}
    result = {
        "machine": machine_info(run.device),
        "run": str(args.run),
        "model": f"{run.cfg.model.name} (width {run.cfg.model.width})",
        "bn_sources": list(run.sources),
        "images": suite.num_images,
        "sets": [f"{s.corruption}/{s.severity}" for s in suite.sets],
        "batch_size": args.batch_size,
        "seconds": seconds,
        "seconds_per_10k_images": per_10k,
        "ratio_to_plain": {name: per_10k[name] / per_10k["plain"] for name in per_10k},
    }
    for name, value in per_10k.items():
        print(f"{name}: {value:.2f} s per 10k images ({result['ratio_to_plain'][name]:.2f}x plain)")
    print(f"wrote {write_json(args.name, result)}")


if __name__ == "__main__":
    main()
