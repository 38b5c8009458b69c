"""Throughput of the on-device ``autoaugment`` domain vs the usual CPU data-loader route.

Routes (CIFAR-10 policy, 32x32 RGB):
  * ``mbn_autoaugment``: the domain on a float batch already on the device (per-image sub-policies).
  * ``kornia_autoaugment``: kornia 0.9's ``AutoAugment`` on the same batch (ONE sub-policy per call, for
    reference: not the paper's per-image sampling).
  * ``torchvision_dataloader_w{0,2}``: ``transforms.AutoAugment(AutoAugmentPolicy.CIFAR10)`` + ``PILToTensor``
    on PIL images in a ``DataLoader`` (batch 256) with 2 workers (and 0, i.e. in the main process).
albumentations has no AutoAugment pipeline built in, so it is not measured.

Usage: ``python benchmarks/bench_autoaug.py [--images 5120] [--repeats 5] [--device cpu] [--threads 1]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from common import machine_info, sync
from kornia.augmentation.auto import AutoAugment as KorniaAutoAugment
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

import mbn
from mbn.domain import DomainContext
from mbn.fileio import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results" / "autoaug.json"


def summarize(times: list[float], images: int) -> dict[str, float]:
    """Median and IQR of seconds per run, and median images/s."""
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0], 0, times[0])
    median = statistics.median(times)
    return {
        "median_s": median,
        "iqr_s": q3 - q1,
        "images_per_run": images,
        "images_per_s": images / median,
        "runs": len(times),
    }


def bench_on_device(fn, images: torch.Tensor, total: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Time ``fn`` over ``total`` images in batches of ``images``; 2 warm-up batches first."""
    for _ in range(2):
        fn(images)
    sync(device)
    batches = max(1, total // images.shape[0])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batches):
            fn(images)
        sync(device)
        times.append(time.perf_counter() - start)
    return summarize(times, batches * images.shape[0])


class PilImages(Dataset):
    def __init__(self, arrays: np.ndarray, transform) -> None:
        self.images = [Image.fromarray(a) for a in arrays]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.images[i])


def bench_dataloader(arrays: np.ndarray, workers: int, batch: int, repeats: int) -> dict[str, float]:
    """Epochs over the PIL dataset through torchvision's AutoAugment; one warm-up epoch starts the workers."""
    tf = transforms.Compose([transforms.AutoAugment(transforms.AutoAugmentPolicy.CIFAR10), transforms.PILToTensor()])
    loader = DataLoader(
        PilImages(arrays, tf), batch_size=batch, num_workers=workers, persistent_workers=workers > 0, shuffle=False
    )
    for _ in loader:
        pass
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in loader:
            pass
        times.append(time.perf_counter() - start)
    return summarize(times, len(arrays))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5120, help="images per timed run")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: OpenMP threads spin on a busy shared box)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, size=(args.images, 32, 32, 3), dtype=np.uint8)
    batch = torch.from_numpy(arrays[: args.batch]).permute(0, 3, 1, 2).float().div(255).to(device)
    labels = torch.zeros(args.batch, dtype=torch.long, device=device)

    domain = mbn.create_domain("autoaugment", policy="cifar10")
    ctx = DomainContext(
        model=torch.nn.Linear(1, 1).to(device), bn="autoaugment", generator=torch.Generator(device).manual_seed(0)
    )
    kornia_aa = KorniaAutoAugment(policy="cifar10").to(device)

    machine = machine_info(device)
    print(json.dumps(machine))
    results: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        results["mbn_autoaugment"] = bench_on_device(
            lambda x: domain.generate(x, labels, ctx), batch, args.images, args.repeats, device
        )
        print("mbn_autoaugment", results["mbn_autoaugment"])
        results["kornia_autoaugment"] = bench_on_device(kornia_aa, batch, args.images, args.repeats, device)
        print("kornia_autoaugment", results["kornia_autoaugment"])
    for workers in (2, 0):
        key = f"torchvision_dataloader_w{workers}"
        results[key] = bench_dataloader(arrays, workers, args.batch, args.repeats)
        print(key, results[key])

    ours = results["mbn_autoaugment"]["images_per_s"]
    ratios = {f"mbn_over_{k}": ours / v["images_per_s"] for k, v in results.items() if k != "mbn_autoaugment"}
    print("ratios", json.dumps(ratios, indent=1))
    out = {
        "benchmark": "autoaugment throughput, CIFAR-10 policy, 32x32 RGB",
        "machine": machine,
        "config": vars(args) | {"out": str(args.out)},
        "results": results,
        "ratios": ratios,
        "notes": [
            "mbn_autoaugment: float batch already on the device, a sub-policy per image (paper's sampling).",
            "kornia_autoaugment: one sub-policy per call for the whole batch; magnitudes differ from the paper.",
            "torchvision: PIL images -> AutoAugment -> PILToTensor (uint8) in a DataLoader; excludes the host->device "
            "copy and the float conversion the domain route has already paid.",
            "albumentations: no AutoAugment-like pipeline built in; not measured.",
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
