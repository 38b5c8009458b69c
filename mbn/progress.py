"""Progress output: a tqdm bar with per-domain losses on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys

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
