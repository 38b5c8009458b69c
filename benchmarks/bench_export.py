"""mbn-export on a real run: does timm's own pipeline, in a fresh process, score what mbn-eval scores?

Trains (or reuses) a short AdvProp run on an ImageFolder tree (the shared CIFAR-10 by default), evaluates it with
``mbn-eval``, exports it with ``mbn-export`` (timed), then in a new interpreter loads the folder with
``timm.create_model("local-dir:...")`` and classifies the tree's test images through
``timm.data.create_transform(**resolve_data_config(...))`` with torchvision's ``ImageFolder`` (PIL decoding). It
reports both accuracies, how many images the two pipelines predict differently (timm's reader decodes JPEGs with
PIL, mbn's with torchvision's libjpeg-turbo), and the export's size and time.

    python benchmarks/bench_export.py                       # ../shared/datasets/cifar10, ~10 min on 2 cores
    python benchmarks/bench_export.py --root DIR --train-limit 2000 --steps 20
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import machine_info, write_json

REPO = Path(__file__).resolve().parents[1]

FRESH = r"""
import json, sys, torch, torchvision
import mbn, timm
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
config = timm.data.resolve_data_config({}, model=model)
dataset = torchvision.datasets.ImageFolder(sys.argv[2], transform=timm.data.create_transform(**config))
index = [model.pretrained_cfg["label_names"].index(c) for c in dataset.classes]
loader = torch.utils.data.DataLoader(dataset, batch_size=250, num_workers=2)
predicted, labels = [], []
with torch.no_grad():
    for images, targets in loader:
        predicted += model(images).argmax(1).tolist()
        labels += [index[t] for t in targets.tolist()]
print(json.dumps({"predicted": predicted, "labels": labels,
                  "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=REPO.parent / "shared" / "datasets" / "cifar10")
    p.add_argument("--run", type=Path, help="an existing run to export (default: train one)")
    p.add_argument("--train-limit", type=int, default=10000)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--name", default="export_cpu")
    args = p.parse_args()
    from mbn.cli.eval import main as eval_main
    from mbn.cli.export import main as export_main
    from mbn.cli.train import main as train_main
    from mbn.eval.loading import load_run

    scratch = Path(tempfile.mkdtemp(prefix="bench-export-"))
    run = args.run
    if run is None:
        run = scratch / "run"
        recipe = [str(REPO / "recipes" / "advprop.yaml"), "data.name=imagefolder", f"data.root={args.root}",
                  f"data.train_limit={args.train_limit}", f"trainer.max_steps={args.steps}",
                  f"data.batch_size={args.batch_size}", "model.name=cifar_resnet20", "model.width=16",
                  "trainer.progress=none", "logging.tensorboard=false", f"trainer.out_dir={run}"]  # fmt: skip
        tic = time.perf_counter()
        assert train_main(recipe) == 0
        print(f"trained in {time.perf_counter() - tic:.0f} s", flush=True)
    assert eval_main([str(run), "--device", "cpu"]) == 0
    report = json.loads((run / "eval.json").read_text())
    out = scratch / "export"
    tic = time.perf_counter()
    assert export_main([str(run), str(out)]) == 0
    export_s = time.perf_counter() - tic
    tic = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", FRESH, str(out), str(args.root / "test")], capture_output=True,
                          text=True, check=True, cwd=scratch)  # fmt: skip
    timm_s = time.perf_counter() - tic
    fresh = json.loads(done.stdout.strip().splitlines()[-1])

    loaded = load_run(run, "cpu")  # mbn's own predictions, image by image, in the same (sorted) order
    import mbn

    plain = mbn.export_model(loaded.model, loaded.sources[0]).eval()
    mbn_predicted = []
    with torch.no_grad():
        for lo in range(0, len(loaded.test.labels), 500):
            x = torch.from_numpy(loaded.test.images[lo : lo + 500]).permute(0, 3, 1, 2).float().div(255.0)
            mbn_predicted += plain(x).argmax(1).tolist()
    assert fresh["labels"] == loaded.test.labels.tolist(), "the two readers list the test images differently"
    timm_acc = sum(a == b for a, b in zip(fresh["predicted"], fresh["labels"], strict=True)) / len(fresh["labels"])
    differ = sum(a != b for a, b in zip(fresh["predicted"], mbn_predicted, strict=True))
    result = {
        "machine": machine_info(torch.device("cpu")),
        "run": {"root": str(args.root), "steps": args.steps, "train_limit": args.train_limit},
        "test_images": len(fresh["labels"]),
        "mbn_eval_clean_acc": report["clean_acc"],
        "timm_pipeline_acc": timm_acc,
        "predictions_that_differ": differ,
        "timm_data_config": fresh["config"],
        "export_seconds": round(export_s, 2),
        "timm_load_and_classify_seconds": round(timm_s, 1),
        "files": {p.name: p.stat().st_size for p in sorted(out.iterdir())},
    }
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    write_json(args.name, result)


if __name__ == "__main__":
    main()
