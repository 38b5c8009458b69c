"""Cost of PGD-k adversarial example generation relative to one forward+backward training pass.

Model: torchvision ResNet-18 (10 classes) converted to clean/adv BatchNorms, 32x32 inputs, batch 64.
PGD-k runs the ``pgd`` domain (``mbn.create_domain("pgd", steps=k)``, defaults otherwise: eval-mode
BN, targeted, random start 0.8) through the adv BN, as the trainer does. The baseline is one
train-mode forward + backward of the cross-entropy loss w.r.t. the parameters, routed through the
clean BN. Configurations are timed round-robin (so drift hits all of them alike); median and IQR of
the repeats, ratios to the baseline median, all from one run.

Usage:
    python benchmarks/bench_attacks.py [--repeats 7] [--batch 64] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from common import machine_info, sync

import mbn
from mbn.domain import DomainContext
from mbn.fileio import atomic_write_text

STEPS = (1, 3, 5, 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "attacks.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = mbn.convert_model(torchvision.models.resnet18(num_classes=10), ("clean", "adv")).to(device).train()
    images = torch.rand(args.batch, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    ctx = DomainContext(model=model, bn="adv", generator=torch.Generator(device).manual_seed(0), num_classes=10)
    domains = {k: mbn.create_domain("pgd", steps=k) for k in STEPS}

    def forward_backward() -> None:
        with mbn.use_source(model, "clean"):
            F.cross_entropy(model(images), labels).backward()
        model.zero_grad(set_to_none=True)

    jobs = {"forward_backward": forward_backward}
    for k, domain in domains.items():
        jobs[f"pgd{k}"] = lambda domain=domain: domain.generate(images, labels, ctx)

    times: dict[str, list[float]] = {name: [] for name in jobs}
    for i in range(args.warmup + args.repeats):
        for name, job in jobs.items():
            sync(device)
            start = time.perf_counter()
            job()
            sync(device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)

    base = float(np.median(times["forward_backward"]))
    results = {}
    for name, samples in times.items():
        q1, median, q3 = np.percentile(samples, [25, 50, 75])
        results[name] = {
            "median_s": float(median),
            "iqr_s": float(q3 - q1),
            "ratio_to_forward_backward": float(median) / base,
            "samples_s": [float(s) for s in samples],
        }
    machine = machine_info(device) | {
        "torchvision": torchvision.__version__,
        # The machine is shared: a load above the core count means the timings are contended.
        "loadavg_1m_at_end": os.getloadavg()[0],
    }
    setup = {
        "model": "torchvision resnet18, num_classes=10, converted to (clean, adv)",
        "input": [args.batch, 3, 32, 32],
        "attack": "pgd domain defaults (eps 4, step 1, eval BN, targeted, random_start 0.8), steps=k",
        "repeats": args.repeats,
        "warmup": args.warmup,
        "seed": 0,
    }
    print(f"machine: {machine}")
    print(f"{'config':>18} {'median ms':>10} {'IQR ms':>8} {'x fwd+bwd':>10}")
    for name, r in results.items():
        print(f"{name:>18} {r['median_s'] * 1e3:10.1f} {r['iqr_s'] * 1e3:8.1f} {r['ratio_to_forward_backward']:10.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps({"machine": machine, "setup": setup, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
