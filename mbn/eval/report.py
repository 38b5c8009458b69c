"""Human-readable output of an ``eval.json`` result: a markdown report and three matplotlib plots.

Plots use the Agg backend (no display needed) and are written atomically. Each is drawn only when its section
holds results: ``robust_acc_vs_eps.png`` (PGD accuracy against L-inf and L2 radius, clean accuracy at eps 0),
``corruption_acc.png`` (accuracy per corruption, one bar per severity) and ``bn_divergence.png`` (per-layer
symmetric KL between each auxiliary BN's statistics and the main BN's, see :mod:`mbn.eval.divergence`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mbn.fileio import atomic_write, atomic_write_text

__all__ = [
    "PLOT_FILES",
    "corruptions_evaluated",
    "paper_table",
    "plot_bn_divergence",
    "plot_corruptions",
    "plot_robustness",
    "render_markdown",
    "write_report",
]

PLOT_FILES = {
    "adversarial": "robust_acc_vs_eps.png",
    "corruptions": "corruption_acc.png",
    "divergence": "bn_divergence.png",
}
"""Plot file name of each ``eval.json`` section."""


# ----------------------------------------------------------------------------------------------- markdown


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def corruptions_evaluated(section: Mapping[str, Any]) -> str:
    """What a ``corruptions`` section's means are over: ``"14 of 15 corruptions"`` when some were skipped.

    Args:
        section: The ``corruptions`` section of ``eval.json``.

    Returns:
        ``"N of M corruptions"``, or ``"N corruptions"`` when none was skipped.
    """
    evaluated, skipped = len(section.get("accuracy") or {}), len(section.get("skipped") or {})
    return f"{evaluated} of {evaluated + skipped} corruptions" if skipped else f"{evaluated} corruptions"


def render_markdown(result: Mapping[str, Any]) -> str:
    """A markdown report of every section present in an ``eval.json`` result (accuracies in %).

    Args:
        result: The ``eval.json`` content.

    Returns:
        The markdown text.
    """
    sources = list(result.get("sources") or [])
    main = sources[0] if sources else "main"
    limit = result.get("limit")
    lines = [
        "# Evaluation",
        "",
        f"- checkpoint: `{result.get('checkpoint')}`",
        f"- test images: {result.get('num_images')}" + ("" if limit is None else f" (seeded subset, --limit {limit})"),
        f"- BN sources: {', '.join(sources)} (main: {main}); accuracies in %, eval mode",
        "",
    ]
    per_bn = result.get("per_bn_acc") or {}
    if result.get("clean_acc") is not None or per_bn:
        lines += ["## Clean accuracy", ""]
        accs = dict(per_bn) or {main: result.get("clean_acc")}
        top5 = dict(result.get("per_bn_acc5") or {})
        if not top5 and result.get("clean_acc5") is not None:
            top5 = {main: result.get("clean_acc5")}
        rows = [[f"{bn} (main)" if bn == main else bn, _pct(acc)] for bn, acc in accs.items()]
        if any(v is not None for v in top5.values()):  # none with five classes or fewer
            rows = [[*row, _pct(top5.get(bn))] for row, bn in zip(rows, accs, strict=True)]
            lines += [*_table(["BN", "accuracy", "top-5"], rows), ""]
        else:
            lines += [*_table(["BN", "accuracy"], rows), ""]

    adv = result.get("adversarial")
    if adv:
        lines += [f"## Adversarial (PGD-{adv['steps']}, through the {adv['bn']} BN)", ""]
        rows = [["clean", "0", _pct(result.get("clean_acc"))]] if result.get("clean_acc") is not None else []
        rows += [["L-inf", f"{eps}/255", _pct(acc)] for eps, acc in adv.get("linf", {}).items()]
        rows += [["L2", eps, _pct(acc)] for eps, acc in adv.get("l2", {}).items()]
        rows += [["AutoAttack L-inf", f"{eps}/255", _pct(acc)] for eps, acc in (adv.get("autoattack") or {}).items()]
        lines += [*_table(["attack", "eps", "accuracy"], rows), ""]

    corr = result.get("corruptions")
    if corr:
        severities = list(next(iter(corr["accuracy"].values())).keys()) if corr["accuracy"] else []
        ce, skipped = corr.get("ce") or {}, corr.get("skipped") or {}
        over = corruptions_evaluated(corr)
        lines += ["## Common corruptions", ""]
        lines.append(f"Mean accuracy over {over} x {len(severities)} severities: **{_pct(corr['mean_acc'])}**.")
        if corr.get("mce") is not None:
            mce_over = f" over {over}" if skipped else ""
            lines.append(f"mCE{mce_over} relative to `{corr['reference']}`: **{_pct(corr['mce'])}** "
                         "(100 = as the reference).")  # fmt: skip
        for name, why in skipped.items():
            lines.append(f"Skipped: {name}, {why}; the means above leave it out.")
        lines.append("")
        header = ["corruption", *[f"s{s}" for s in severities], "mean", *(["CE"] if ce else [])]
        rows = [
            [name, *[_pct(row[s]) for s in severities], _pct(corr["per_corruption_mean"][name])]
            + ([_pct(ce[name])] if ce else [])
            for name, row in corr["accuracy"].items()
        ]
        rows += [[name, *["-" for _ in severities], "skipped", *(["-"] if ce else [])] for name in skipped]
        lines += [*_table(header, rows), ""]

    suites = result.get("suites")
    if suites:
        lines += _suites_markdown(result, suites)

    div = result.get("divergence")
    if div:
        aux = list(div)
        layers = list(dict.fromkeys(layer for per_layer in div.values() for layer in per_layer))
        lines += [f"## BN statistics divergence from the {main} BN (symmetric KL, mean over channels)", ""]
        rows = [[f"`{layer}`", *[f"{div[s].get(layer, float('nan')):.4g}" for s in aux]] for layer in layers]
        lines += [*_table(["layer", *aux], rows), ""]
    return "\n".join(lines)


SUITE_HEADERS = {
    "imagenet-c": "IN-C mCE",
    "imagenet-a": "IN-A",
    "imagenet-r": "IN-R",
    "imagenet-sketch": "IN-Sketch",
    "imagenet-v2": "IN-V2",
    "stylized-imagenet": "SIN",
    "cifar10-c": "C10-C",
    "cifar100-c": "C100-C",
    "folder": "folder",
}
"""Column names of the paper-style table (AdvProp's Table 3 reads: ImageNet, IN-C mCE, IN-A, SIN)."""


def _headline(entry: Mapping[str, Any] | None, kind: str) -> float | None:
    """A suite's number in the paper's table: ImageNet-C's mCE (lower is better), else top-1 (the -C mean)."""
    if not entry:
        return None
    if kind == "imagenet-c":  # the column is mCE: nothing when it could not be computed (a partial suite)
        return None if entry.get("mce") is None else float(entry["mce"])
    return None if entry.get("top1") is None else float(entry["top1"])


def paper_table(rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One row per model, laid out like AdvProp's robustness table: clean top-1, then each suite's headline.

    ImageNet-C gives mCE (%, lower is better, AlexNet = 100; "-" unless all 15 corruptions x 5 severities were
    scored), every other suite top-1 accuracy (%; the -C suites their mean over corruptions and severities, marked
    "(partial)" when fewer than the whole benchmark). A suite scored with ``--bn-adapt`` gets a second column.

    Args:
        rows: ``{model name: eval.json content}``.

    Returns:
        Markdown lines (a header, a rule, one line per model).
    """
    keys: list[str] = list(dict.fromkeys(k for r in rows.values() for k in (r.get("suites") or {})))
    kinds = {k: next(r["suites"][k]["kind"] for r in rows.values() if k in (r.get("suites") or {})) for k in keys}
    columns: list[tuple[str, str, bool]] = []
    for key in keys:
        name = SUITE_HEADERS.get(kinds[key], key) + ("" if key == kinds[key] else f" ({key})")
        columns.append((key, name, False))
        if any(((r.get("suites") or {}).get(key) or {}).get("bn_adapt") for r in rows.values()):
            columns.append((key, f"{name} + BN adapt", True))
    header = ["model", "clean", *[name for _, name, _ in columns]]
    body = []
    for model, result in rows.items():
        cells = [model, _pct(result.get("clean_acc"))]
        for key, _, adapted in columns:
            entry = (result.get("suites") or {}).get(key)
            value = _pct(_headline(entry.get("bn_adapt") if adapted and entry else entry, kinds[key]))
            partial = entry is not None and entry.get("complete") is False and value != "-"
            cells.append(value + (" (partial)" if partial else ""))
        body.append(cells)
    return _table(header, body)


def _suites_markdown(result: Mapping[str, Any], suites: Mapping[str, Any]) -> list[str]:
    bns = {entry.get("bn") for entry in suites.values()}
    lines = [f"## Robustness suites (through the {', '.join(sorted(map(str, bns)))} BN)", ""]
    lines += [*paper_table({"this run": result}), ""]
    lines.append("IN-C: mCE against AlexNet (lower is better); other columns: top-1 accuracy (%).")
    lines.append("")
    rows = []
    for key, entry in suites.items():
        adapt, auto = entry.get("bn_adapt") or {}, entry.get("bn_route_auto") or {}
        classes = str(entry["num_classes"]) + (" (subset)" if entry.get("restricted") else "")
        rows.append([
            key, entry["kind"], str(entry["num_images"]), classes,
            _pct(entry.get("top1")), _pct(entry.get("top5")), _pct(adapt.get("top1")), _pct(auto.get("top1")),
        ])  # fmt: skip
    header = ["suite", "kind", "images", "classes", "top-1", "top-5", "top-1, BN adapted", "top-1, auto BN"]
    lines += [*_table(header, rows), ""]
    for key, entry in suites.items():
        if not entry.get("corruptions"):
            continue
        severities = sorted({s for row in entry["corruptions"].values() for s in row}, key=int)
        ce = entry.get("ce") or {}
        adapted = (entry.get("bn_adapt") or {}).get("per_corruption_mean") or {}
        lines += [f"### {key}: accuracy per corruption and severity (%)", ""]
        if entry.get("mce") is not None:
            lines += [f"mCE **{_pct(entry['mce'])}** against {entry.get('mce_reference')}.", ""]
        head = ["corruption", *[f"s{s}" for s in severities], "mean", *(["CE"] if ce else []),
                *(["mean, BN adapted"] if adapted else [])]  # fmt: skip
        body = [
            [name, *[_pct(row.get(s)) for s in severities], _pct(entry["per_corruption_mean"][name])]
            + ([_pct(ce.get(name))] if ce else [])
            + ([_pct(adapted.get(name))] if adapted else [])
            for name, row in entry["corruptions"].items()
        ]
        lines += [*_table(head, body), ""]
        for note in entry.get("notes") or []:
            lines += [f"Note: {note}.", ""]
    return lines


# -------------------------------------------------------------------------------------------------- plots


def _figure(ncols: int = 1, width: float = 6.0, height: float = 4.0) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, axes[0]


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def plot_robustness(adversarial: Mapping[str, Any], clean_acc: float | None, path: Path) -> None:
    """Robust accuracy against eps, one panel for L-inf (0-255 units) and one for L2; clean accuracy at eps 0.

    Args:
        adversarial: The ``adversarial`` section of ``eval.json``.
        clean_acc: Clean accuracy drawn at eps 0 (skipped when None).
        path: Output PNG.
    """
    fig, axes = _figure(2)
    for ax, norm, unit in ((axes[0], "linf", "L-inf eps (x/255)"), (axes[1], "l2", "L2 eps ([0,1] pixels)")):
        points = sorted((float(e), a) for e, a in adversarial.get(norm, {}).items())
        if clean_acc is not None:
            points = [(0.0, clean_acc), *[p for p in points if p[0] != 0.0]]
        if points:
            ax.plot([p[0] for p in points], [100 * p[1] for p in points], "o-", label=f"PGD-{adversarial['steps']}")
        if norm == "linf" and adversarial.get("autoattack"):
            aa = sorted((float(e), a) for e, a in adversarial["autoattack"].items())
            ax.plot([p[0] for p in aa], [100 * p[1] for p in aa], "s", color="C3", label="AutoAttack")
        ax.set(xlabel=unit, ylabel="accuracy (%)", ylim=(0, 100), title=f"{norm} robustness ({adversarial['bn']} BN)")
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def plot_corruptions(corruptions: Mapping[str, Any], path: Path) -> None:
    """Accuracy per corruption, one bar per severity, with the per-corruption mean as a marker.

    Args:
        corruptions: The ``corruptions`` section of ``eval.json``.
        path: Output PNG.
    """
    table = corruptions["accuracy"]
    names = list(table)
    severities = list(next(iter(table.values())).keys()) if names else []
    fig, axes = _figure(1, width=max(6.0, 0.7 * len(names) + 2), height=4.5)
    ax = axes[0]
    width = 0.8 / max(len(severities), 1)
    for j, sev in enumerate(severities):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(names))]
        ax.bar(xs, [100 * table[n][sev] for n in names], width, label=f"severity {sev}", color=f"C{j}")
    means = corruptions["per_corruption_mean"]
    ax.plot(range(len(names)), [100 * means[n] for n in names], "k_", markersize=14, label="mean")
    ax.axhline(100 * corruptions["mean_acc"], color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(names)), [n.replace("_", "\n", 1) for n in names], fontsize=7)
    skipped = corruptions.get("skipped") or {}
    over = f" over {corruptions_evaluated(corruptions)}; {', '.join(skipped)} skipped" if skipped else ""
    ax.set(
        ylabel="accuracy (%)",
        ylim=(0, 100),
        title=f"Corruption accuracy (mean {100 * corruptions['mean_acc']:.1f}%{over})",
    )
    ax.legend(fontsize=7, ncol=3)
    _save(fig, path)


def plot_bn_divergence(divergence: Mapping[str, Mapping[str, float]], path: Path) -> None:
    """Per-layer divergence of every auxiliary BN from the main BN, layers in model order (log scale).

    Args:
        divergence: The ``divergence`` section of ``eval.json`` (``{source: {layer: value}}``).
        path: Output PNG.
    """
    layers = list(dict.fromkeys(layer for per_layer in divergence.values() for layer in per_layer))
    fig, axes = _figure(1, width=max(6.0, 0.25 * len(layers) + 2), height=4.5)
    ax = axes[0]
    for source, per_layer in divergence.items():
        ax.plot([layers.index(k) for k in per_layer], list(per_layer.values()), "o-", label=source, markersize=3)
    ax.set_xticks(range(len(layers)), layers, rotation=90, fontsize=6)
    if all(v > 0 for per_layer in divergence.values() for v in per_layer.values()):
        ax.set_yscale("log")
    ax.set(ylabel="symmetric KL to main BN", title="BN statistics divergence per layer")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def write_report(result: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Write ``eval.json``, ``eval.md`` and the plots of the sections that hold results into ``out_dir``.

    Args:
        result: The full ``eval.json`` content.
        out_dir: Destination directory (created if needed).

    Returns:
        The paths written.
    """
    out_dir = Path(out_dir)
    written = [out_dir / "eval.json", out_dir / "eval.md"]
    text = json.dumps(result, indent=2) + "\n"
    atomic_write_text(written[0], text)
    markdown = render_markdown(result)
    atomic_write_text(written[1], markdown)
    if result.get("adversarial"):
        plot_robustness(result["adversarial"], result.get("clean_acc"), out_dir / PLOT_FILES["adversarial"])
        written.append(out_dir / PLOT_FILES["adversarial"])
    if result.get("corruptions"):
        plot_corruptions(result["corruptions"], out_dir / PLOT_FILES["corruptions"])
        written.append(out_dir / PLOT_FILES["corruptions"])
    if result.get("divergence"):
        plot_bn_divergence(result["divergence"], out_dir / PLOT_FILES["divergence"])
        written.append(out_dir / PLOT_FILES["divergence"])
    return written
