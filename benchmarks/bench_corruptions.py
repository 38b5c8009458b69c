"""Cost of generating CIFAR-10-C style corruptions with mbn.eval.corruptions (CPU, numpy/OpenCV).

Claim measured: seconds to generate all 15 corruptions x 5 severities for 1000 CIFAR test images (32x32), i.e. the
one-off cost of building the corruption cache; the sum over corruptions of the median time of all five severities
of one corruption, round-robin timing after a warm-up round. Uses the CIFAR-10 test images when --data exists
(100 per class), else seeded synthetic images.

Usage:
    python benchmarks/bench_corruptions.py [--num-images 1000] [--repeats 3] [--data ../shared/datasets/cifar10]
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import cv2
import numpy as np
import torch
from common import machine_info, time_round_robin, write_json
from PIL import Image

from mbn.eval.corruptions import CHUNK_SIZE, CORRUPTIONS, SEVERITIES, generate_corrupted


def load_images(data: Path, n: int, seed: int) -> tuple[np.ndarray, str]:
    """``n`` CIFAR-10 test images (balanced over classes) or, without the data, seeded random ones."""
    test = data / "test"
    if test.is_dir():
        classes = sorted(p for p in test.iterdir() if p.is_dir())
        per_class = -(-n // len(classes))
        files = [f for c in classes for f in sorted(c.glob("*.jpg"))[:per_class]][:n]
        return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]), f"CIFAR-10 test ({data})"
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8), "synthetic uniform noise"


def all_severities(images: np.ndarray, name: str, seed: int) -> None:
    for severity in SEVERITIES:
        generate_corrupted(images, name, severity, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/cifar10"))
    args = parser.parse_args()

    images, source = load_images(args.data, args.num_images, args.seed)
    machine = machine_info(torch.device("cpu")) | {"cv2_threads": cv2.getNumThreads(), "numpy": np.__version__}
    print(machine)
    print(f"images: {images.shape} from {source}")

    cases = {name: functools.partial(all_severities, images, name, args.seed) for name in CORRUPTIONS}
    rows = time_round_robin(cases, torch.device("cpu"), repeats=args.repeats, warmup=1)
    total = sum(r["median_s"] for r in rows.values())
    for name, r in rows.items():
        print(f"{name:18s} 5 severities: median {r['median_s']:7.3f} s  IQR {r['iqr_s']:6.3f} s")
    print(f"total 15 x 5 for {len(images)} images: {total:.1f} s ({1000 * total / len(images):.1f} ms per image)")

    path = write_json(
        "corruptions",
        {
            "benchmark": "corruption generation, 15 corruptions x 5 severities",
            "machine": machine,
            "num_images": len(images),
            "image_source": source,
            "chunk_size": CHUNK_SIZE,
            "repeats": args.repeats,
            "seed": args.seed,
            "total_median_s": total,
            "per_corruption": rows,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
