"""The per-layer BN divergence of an auxiliary source as a bar plot (an image for TensorBoard and the trackers)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

#: Most layer names written under the bars; deeper models get every k-th name.
_MAX_LABELS = 40


def divergence_plot(source: str, layers: Mapping[str, float], step: int) -> Any:
    """An RGB (H, W, 3) uint8 bar plot of the per-layer divergence, drawn with Agg (no pyplot, no global state)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names, values = _short_names(list(layers)), [float(v) for v in layers.values()]
    n = len(names)
    finite = [v for v in values if math.isfinite(v)]
    positive = [v for v in finite if v > 0]
    log = bool(positive) and len(positive) == len(finite) and max(positive) / min(positive) >= 100
    fig = Figure(figsize=(min(16.0, max(7.0, 0.2 * n + 2.5)), 5.0), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(range(n), [v if math.isfinite(v) else math.nan for v in values], color="tab:blue", width=0.8)
    if log:
        ax.set_yscale("log")
    every = max(1, math.ceil(n / _MAX_LABELS))
    ticks = list(range(0, n, every))
    ax.set_xticks(ticks, [f"{i}: {names[i]}" if every > 1 else names[i] for i in ticks], rotation=90, fontsize=7)
    ax.set_xlim(-0.6, n - 0.4)
    mean = sum(finite) / len(finite) if finite else math.nan
    ax.set_xlabel("layer, in model order" + (f" (one in {every} named)" if every > 1 else ""))
    ax.set_ylabel("symmetric KL to the main BN" + (" (log scale)" if log else ""))
    ax.set_title(f"BN divergence of '{source}' per layer, step {step}\nmean over {n} layers: {mean:.3g}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _short_names(names: list[str]) -> list[str]:
    """Layer names without the dotted prefix they all share (``net.``)."""
    parts = [name.split(".") for name in names]
    shared = 0
    while all(len(p) > shared + 1 and p[shared] == parts[0][shared] for p in parts):
        shared += 1
    return [".".join(p[shared:]) for p in parts]
