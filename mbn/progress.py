"""Progress output: a tqdm bar with per-domain losses on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

from tqdm import tqdm


class Progress:
    """Reports training progress.

    Args:
        mode: ``auto`` (bar on a TTY, plain lines otherwise), ``bar``, ``plain`` or ``none``.
        total: planned optimisation steps.
    """

    def __init__(self, mode: str, total: int) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "plain"
        self.mode = mode
        self.bar = tqdm(total=total, dynamic_ncols=True, unit="step") if mode == "bar" else None

    def update(self) -> None:
        """Advance one step."""
        if self.bar is not None:
            self.bar.update(1)

    def show(self, losses: dict[str, float]) -> None:
        """Show the last logging window's per-domain losses on the bar."""
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()}, refresh=False)

    def log(self, line: str) -> None:
        """A log line (printed above the bar, or plainly)."""
        if self.mode == "none":
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        """Close the bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


#: Widest plain progress line: readable in a 100-column terminal.
LINE_WIDTH = 100


def step_line(epoch: int, step: int, losses: Mapping[str, float], lr: float, images_per_s: float | None) -> str:
    """One logging window in at most :data:`LINE_WIDTH` characters: each domain's loss, learning rate, speed.

    ``epoch 0 step 40: loss clean 2.041 adv 2.299 | lr 0.1 | 812 img/s`` (``step N:`` as in every line about a
    step, for scripts that follow a run's output). Accuracies, the total and the
    per-domain throughput are in TensorBoard and ``scalars.csv``. Domain names are shortened (keeping them
    distinct) when the line would be wider, then the learning rate and speed are left out.
    """
    head = f"epoch {epoch} step {step}: loss"
    extras = [f"lr {lr:.3g}"] + ([f"{images_per_s:.0f} img/s"] if images_per_s is not None else [])
    return fit_line(head, [("", losses)], extras)


def accuracy_line(step: int, acc: Mapping[str, float], ema: Mapping[str, float]) -> str:
    """Test accuracy per BN (and of the EMA weights) in at most :data:`LINE_WIDTH` characters.

    ``step 390: test acc clean 0.4312 adv 0.3921, EMA clean 0.4401 adv 0.4012``.
    """
    groups = [("", acc)] + ([("EMA", ema)] if ema else [])
    return fit_line(f"step {step}: test acc", groups, [])


def fit_line(head: str, groups: Sequence[tuple[str, Mapping[str, float]]], extras: Sequence[str]) -> str:
    """``head name value ... | label name value ... | extra | extra``, fitted into :data:`LINE_WIDTH` characters.

    Names are cut to fewer characters (kept distinct) until the line fits; then ``extras`` are left out from the
    last; a line that still does not fit ends in an ellipsis.
    """
    names = sorted({name for _, values in groups for name in values}, key=len, reverse=True)
    longest = len(names[0]) if names else 0
    for keep in range(len(extras), -1, -1):
        for width in range(longest, 2, -1) if longest > 2 else [longest]:
            short = _shortened(names, width)
            if short is None:
                continue
            line = _join(head, groups, extras[:keep], short)
            if len(line) <= LINE_WIDTH:
                return line
    line = _join(head, groups, [], _shortened(names, 3) or {n: n for n in names})
    return line if len(line) <= LINE_WIDTH else line[: LINE_WIDTH - 1] + "…"


def _shortened(names: Sequence[str], width: int) -> dict[str, str] | None:
    """Each name in at most ``width`` characters, all distinct (None when they cannot be).

    Cut at the end (``adversarial`` -> ``adver``) when that keeps them apart, else in the middle so that their
    different ends show (``autoaugment_1`` -> ``auto…_1``).
    """
    for tail in range(0, min(3, width - 2) + 1):
        short = {name: _cut(name, width, tail) for name in names}
        if len(set(short.values())) == len(short):
            return short
    return None


def _cut(name: str, width: int, tail: int) -> str:
    if len(name) <= width:
        return name
    return name[:width] if tail == 0 else name[: width - 1 - tail] + "…" + name[-tail:]


def _join(
    head: str, groups: Sequence[tuple[str, Mapping[str, float]]], extras: Sequence[str], short: dict[str, str]
) -> str:
    parts = []
    for label, values in groups:
        items = " ".join(f"{short[name]} {value:.4g}" for name, value in values.items())
        parts.append(f"{label} {items}".strip())
    return " | ".join([f"{head} {', '.join(parts)}".rstrip(), *extras])
