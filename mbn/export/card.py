"""The model card (``README.md``) of an export: what was trained, which BN was kept, its results, its inputs."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from mbn.export.trained import TrainedNetwork

_PAPER = "AdvProp (Xie et al., *Adversarial Examples Improve Image Recognition*, CVPR 2020)"


def find_evaluation(trained: TrainedNetwork) -> dict[str, Any] | None:
    """The run's ``mbn-eval`` report of exactly these weights through this BN, when there is one.

    A report counts only when it names the exported checkpoint and is not older than it.
    """
    from mbn.eval.evaluate import default_out_dir

    weights = "ema" if trained.weights == "ema" else "model"
    path = default_out_dir(trained.run_dir, weights, trained.source, trained.sources) / "eval.json"
    try:
        result = json.loads(path.read_text())
        fresh = path.stat().st_mtime >= trained.checkpoint.stat().st_mtime
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or not fresh:
        return None
    same = (
        result.get("checkpoint") == str(trained.checkpoint.resolve())
        and result.get("weights", "model") == weights
        and result.get("bn", trained.sources[0]) == trained.source
    )
    return result if same else None


def _domains_table(trained: TrainedNetwork) -> list[str]:
    from mbn.config import domain_specs

    try:
        specs = domain_specs(trained.cfg)
    except Exception:  # a recipe this version reads differently: the card goes on without the table
        return []
    rows = ["| domain | type | BN | loss weight |", "|---|---|---|---|"]
    for spec in specs:
        kept = " (exported)" if spec.bn == trained.source else ""
        rows.append(f"| {spec.name} | {spec.type} | {spec.bn}{kept} | {spec.weight:g} |")
    return [*rows, ""]


def _training_accuracy(state: Mapping[str, Any], weights: str) -> list[str]:
    accs = state.get("test_acc_ema" if weights == "ema" else "test_acc") or {}
    if not accs:
        return []
    step = state.get("evaluated_step", state.get("step"))
    shown = ", ".join(f"`{bn}` BN {100 * float(acc):.2f} %" for bn, acc in accs.items())
    return [f"Test accuracy measured during training at step {step}: {shown}.", ""]


def _evaluation_section(result: Mapping[str, Any]) -> list[str]:
    from mbn.eval.report import render_markdown

    body = render_markdown({k: v for k, v in result.items() if k != "divergence"}).splitlines()
    kept = [line for line in body[2:] if not line.startswith("- checkpoint:")]  # a local path, not for publishing
    section = ["### The mbn-eval report", ""] + [("#" + line if line.startswith("## ") else line) for line in kept]
    return [*section, ""] if section[-1] else section


def _usage(trained: TrainedNetwork) -> list[str]:
    if trained.library == "torchvision":
        name = trained.model_name.removeprefix("torchvision.")
        return [
            "```python",
            "import json, torchvision",
            "from safetensors.torch import load_file",
            f'model = torchvision.models.get_model("{name}", num_classes={trained.num_classes})',
            'model.load_state_dict(load_file("model.safetensors"))',
            "# or, with mbn installed: model, transform = mbn.load_exported(FOLDER)",
            "```",
        ]
    needs_mbn = not trained.model_name.startswith("timm.")
    return [
        "```python",
        *(["import mbn  # registers mbn's CIFAR ResNets with timm"] if needs_mbn else []),
        "import timm",
        'model = timm.create_model("local-dir:FOLDER", pretrained=True).eval()  # or "hf-hub:USER/REPO"',
        "config = timm.data.resolve_data_config({}, model=model)",
        "transform = timm.data.create_transform(**config)  # the normalisation above",
        "# or: model, transform = mbn.load_exported(FOLDER)",
        "```",
    ]


def model_card(trained: TrainedNetwork, files: Sequence[str], license_id: str | None = None) -> str:
    """The card's markdown, with Hugging Face front matter."""
    cfg, prep = trained.cfg, trained.preprocessing
    n_params = sum(p.numel() for p in trained.net.parameters())
    weights = "the exponential moving average of the weights" if trained.weights == "ema" else "the trained weights"
    others = ", ".join(f"`{s}`" for s in trained.sources if s != trained.source)
    if not others:
        dropped = "."
    elif trained.source == trained.sources[0]:
        dropped = f"; the auxiliary BNs ({others}) and any auxiliary heads were dropped, as AdvProp does at test time."
    else:
        main = f"`{trained.sources[0]}`"
        others = others.replace(main, f"{main} (the main one)", 1)
        dropped = (f"; the other BNs ({others}) and any auxiliary heads were "
                   f"dropped. This is the `{trained.source}` BN's network, exported to be studied on its own; AdvProp "
                   "keeps the main BN for inference.")  # fmt: skip
    mbn_class = not trained.model_name.startswith(("timm.", "torchvision."))
    plain = (
        "The network class is mbn's (`import mbn` registers it with timm); nothing else of mbn runs at inference."
        if mbn_class
        else "It is a plain network: no mbn code runs at inference."
    )
    library = "pytorch" if mbn_class else trained.library  # the Hub's timm snippet would lack the `import mbn`
    tags = ["image-classification", "mbn", "batch-norm", *(["timm"] if trained.library == "timm" else [])]
    tags += ["advprop"] if len(trained.sources) > 1 else []
    front = [
        "---",
        f"library_name: {library}",
        f"tags: [{', '.join(tags)}]",
        "pipeline_tag: image-classification",
    ]
    if license_id:
        front.append(f"license: {license_id}")
    front += ["---", ""]
    classes = ", ".join(trained.class_names[:20]) + (", ..." if trained.num_classes > 20 else "")
    lines = [
        *front,
        f"# {trained.model_name}, trained with mbn ({len(trained.sources)} BN source"
        f"{'s' if len(trained.sources) > 1 else ''}, exported through the `{trained.source}` BN)",
        "",
        f"Trained with [mbn](https://pypi.org/project/mbn-advprop/), multi-domain N-BatchNorm training after {_PAPER}: "
        f"each data source went through its own BatchNorm ({', '.join(f'`{s}`' for s in trained.sources)}). This "
        f"folder holds {weights} with the `{trained.source}` BN{dropped} {plain}",
        "",
        "## Model",
        "",
        f"- architecture: `{trained.model_name}` ({n_params:,} parameters), {trained.num_classes} classes: {classes}",
        f"- input: {len(prep.mean)} x {prep.image_size} x {prep.image_size}",
        f"- exported from step {trained.state.get('step')} of run `{trained.run_dir.name}` "
        f"(`{trained.checkpoint.name}`)",
        "",
        "## Preprocessing",
        "",
        prep.describe(),
        "",
        f"In `config.json`: `pretrained_cfg` mean {list(prep.mean)}, std {list(prep.std)}, input_size "
        f"{list(prep.data_config()['input_size'])}, crop_pct {prep.crop_pct:g}, interpolation `{prep.interpolation}`.",
        *(
            ["`model.onnx` has the normalisation folded in: feed it images scaled to [0, 1]."]
            if "model.onnx" in files
            else []
        ),
        "",
        "## Training",
        "",
        f"Data: `{cfg.data.name}`; optimiser `{cfg.optim.name}` (lr {cfg.optim.lr:g}), schedule `{cfg.schedule.name}`; "
        f"{'weight EMA ' + format(cfg.ema.decay, 'g') if cfg.ema.decay else 'no weight EMA'}. Domains:",
        "",
        *_domains_table(trained),
        "## Evaluation",
        "",
        *_training_accuracy(trained.state, trained.weights),
    ]
    report = find_evaluation(trained)
    lines += (
        _evaluation_section(report)
        if report
        else [
            "No `mbn-eval` report of these weights was found in the run; run `mbn-eval RUN --all` before exporting "
            "to include clean, per-BN, corruption and PGD results here.",
            "",
        ]
    )
    lines += ["## Usage", "", *_usage(trained), "", "## Files", "", *[f"- `{name}`" for name in files], ""]
    return "\n".join(lines)
