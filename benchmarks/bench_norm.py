"""Overhead of MultiSourceBatchNorm: forward+backward of a converted ResNet-18 vs the plain one.

Claim measured: (1) a converted model with one source active costs about the same as the plain
model; (2) one split-batch forward of a concatenated clean+adv batch vs two separate forwards.
torchvision ResNet-18, 10 classes, 32x32 inputs, batch 64 per source, train mode, SGD-free
forward+backward (``loss.backward()``), round-robin timing, median of repeats, ratios from one run.

Usage:
    python benchmarks/bench_norm.py [--device cpu|cuda] [--batch 64] [--repeats 7]
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
import torchvision
from common import machine_info, time_round_robin, write_json

import mbn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    plain = torchvision.models.resnet18(num_classes=10).to(device, memory_format=fmt).train()
    multi = mbn.convert_model(copy.deepcopy(plain), ("clean", "adv")).train()
    b = args.batch
    x = torch.rand(2 * b, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (2 * b,), device=device)

    def step(model, inp, target):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(inp), target).backward()

    def converted_one_source():
        with mbn.use_source(multi, "adv"):
            step(multi, x[:b], y[:b])

    def split_forward():
        with mbn.split_sources(multi, {"clean": b, "adv": b}):
            step(multi, x, y)

    def separate_forwards():
        multi.zero_grad(set_to_none=True)
        for i, source in enumerate(("clean", "adv")):
            with mbn.use_source(multi, source):
                F.cross_entropy(multi(x[i * b : (i + 1) * b]), y[i * b : (i + 1) * b]).backward()

    cases = {
        "plain_one_batch": lambda: step(plain, x[:b], y[:b]),
        "converted_one_source": converted_one_source,
        "plain_double_batch": lambda: step(plain, x, y),
        "split_two_sources": split_forward,
        "separate_two_forwards": separate_forwards,
    }
    timings = time_round_robin(cases, device, repeats=args.repeats)
    med = {k: v["median_s"] for k, v in timings.items()}
    ratios = {
        "converted_one_source / plain": med["converted_one_source"] / med["plain_one_batch"],
        "split_two_sources / separate_two_forwards": med["split_two_sources"] / med["separate_two_forwards"],
        "split_two_sources / plain_double_batch": med["split_two_sources"] / med["plain_double_batch"],
    }
    payload = {"machine": machine_info(device), "batch_per_source": b, "timings": timings, "ratios": ratios}
    path = write_json(f"norm_{device.type}", payload)
    for name, value in ratios.items():
        print(f"{name}: {value:.3f}")
    print(f"written {path}")


if __name__ == "__main__":
    main()
