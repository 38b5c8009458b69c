"""Per-domain training statistics kept on the training device and read on logging steps only.

Every step adds the domains' losses and accuracies to one device tensor and notes, still on the device, the
first step at which a domain's loss or images were not finite; nothing is copied to the host. :meth:`read`
(a logging step) and :meth:`check_finite` (before every checkpoint and at the end) are the only host
synchronisations, so a NaN in a non-logging step still stops the run, naming the domain and its first bad step,
before a checkpoint could store the damage.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from mbn.distributed import DistContext


class NonFiniteError(RuntimeError):
    """A domain's loss (or images) became NaN/inf; ``domains`` and ``step`` say where it started."""

    def __init__(self, domains: list[str], step: int, what: str) -> None:
        names = ", ".join(f"'{n}'" for n in domains)
        super().__init__(f"non-finite {what} in domain {names} at step {step}")
        self.domains, self.step, self.what = domains, step, what


class StepMeter:
    """Running sums of per-domain loss and accuracy over a logging window, on ``device``.

    Args:
        domains: every domain name of the recipe (an inactive domain simply adds nothing).
        device: the training device.
        dist: the ranks whose windows are averaged (a single process by default).
    """

    def __init__(self, domains: Sequence[str], device: torch.device, dist: DistContext | None = None) -> None:
        self.dist = dist or DistContext()
        self.domains = list(domains)
        self.index = {name: i for i, name in enumerate(self.domains)}
        n = len(self.domains)
        self.sums = torch.zeros(2, n, dtype=torch.float64, device=device)  # [loss, acc] x domain
        self.counts = [0] * n  # host-side: how many steps each domain contributed to the window
        self.first_bad = torch.full((2, n), -1, dtype=torch.long, device=device)  # [loss, images] x domain
        self._columns: dict[tuple[str, ...], Tensor] = {}  # built once per set of active domains (no copy per step)

    def add(self, step: int, losses: Mapping[str, Tensor], accs: Mapping[str, Tensor], images_finite: Tensor) -> None:
        """Add one step's ``{domain: scalar}`` losses and accuracies; ``images_finite`` is (len(losses),) bool.

        ``step`` is the optimisation step's number as logs and checkpoints count it (the first step is 1).
        """
        names = tuple(losses)
        cols = [self.index[name] for name in names]
        if names not in self._columns:
            self._columns[names] = torch.tensor(cols, device=self.sums.device)
        idx = self._columns[names]
        values = torch.stack([torch.stack([losses[n].detach().double(), accs[n].double()]) for n in names], 1)
        self.sums.index_add_(1, idx, values)
        for c in cols:
            self.counts[c] += 1
        bad = torch.zeros_like(self.first_bad, dtype=torch.bool)
        bad[0, idx] = ~torch.isfinite(values[0])
        bad[1, idx] = ~images_finite
        self.first_bad.masked_fill_(bad & (self.first_bad < 0), step)

    def read(self, reset: bool = True) -> dict[str, float]:
        """The window's means ``{"loss/<domain>": ..., "acc/<domain>": ...}`` (one host sync).

        ``reset`` starts a new window; without it the window stays open (a peek). Under torchrun the means are
        over every rank's samples (a collective: every rank calls it at the same step).
        """
        sums = self.dist.mean_over_ranks(self.sums.clone()).tolist()
        out: dict[str, float] = {}
        for i, name in enumerate(self.domains):
            if self.counts[i]:
                out[f"loss/{name}"] = sums[0][i] / self.counts[i]
                out[f"acc/{name}"] = sums[1][i] / self.counts[i]
        if reset:
            self.sums.zero_()
            self.counts = [0] * len(self.domains)
        return out

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteError` if any step so far had a non-finite loss (one host sync).

        Under torchrun a NaN on any rank raises on every rank (a collective: every rank calls it at the same step).
        """
        never = torch.iinfo(torch.long).max
        first_bad = self.dist.min_over_ranks(self.first_bad.masked_fill(self.first_bad < 0, never))
        first = first_bad.masked_fill(first_bad == never, -1).tolist()
        bad_loss = [(s, n) for s, n in zip(first[0], self.domains, strict=True) if s >= 0]
        if not bad_loss:
            return
        step = min(s for s, _ in bad_loss)
        bad_images = [n for s, n in zip(first[1], self.domains, strict=True) if 0 <= s <= step]
        if bad_images:  # domains sharing a BN spread NaN through its statistics: blame the source
            raise NonFiniteError(bad_images, step, "images")
        raise NonFiniteError([n for s, n in bad_loss if s == step], step, "loss")

    def state_dict(self) -> dict[str, Any]:
        """The open window, so a resumed run logs the same means as an uninterrupted one (averaged over ranks)."""
        sums = self.dist.mean_over_ranks(self.sums.clone())
        return {"domains": list(self.domains), "sums": sums.tolist(), "counts": list(self.counts)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (ignored when the domains differ)."""
        if list(state.get("domains", [])) != self.domains:
            return
        self.sums.copy_(torch.tensor(state["sums"], dtype=torch.float64))
        self.counts = [int(c) for c in state["counts"]]


class TrainClock:
    """Training time and images per domain, measured honestly.

    A timing window opens when training steps start and closes at a logging step, before an evaluation and
    before a checkpoint; the device is synchronised when it closes, so queued GPU work is counted. Images of
    every domain count (an adversarial batch is images the model trained on), on every rank under torchrun
    (``world_size`` x this rank's, as the ranks train equal batches). The first window of each session
    (compilation, allocator and kernel warm-up) is left out of the throughput but counted in ``train_time``.
    Logging (:meth:`paused`: scalars, image grids, divergence, to every logger) is counted in neither.
    """

    def __init__(self, device: torch.device, world_size: int = 1) -> None:
        self.device, self.world_size = device, world_size
        self.train_time = 0.0
        self.images: dict[str, int] = {}  # every trained image, per domain, over the whole run
        self._timed_time = 0.0
        self._timed_images: dict[str, int] = {}
        self._window: dict[str, int] = {}
        self._tic: float | None = None
        self._laps = 0  # windows closed in this session
        self._warmup: tuple[float, dict[str, int]] = (0.0, {})

    def start(self) -> None:
        """Open a window if none is open."""
        if self._tic is None:
            self._tic = time.perf_counter()

    def count(self, images: Mapping[str, int]) -> None:
        """Images each domain trained on in one step (on every rank: ranks train equal batches)."""
        for name, n in images.items():
            self._window[name] = self._window.get(name, 0) + n * self.world_size

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Leave what runs inside out of the open window (logging: TensorBoard, trackers, image grids)."""
        tic = time.perf_counter()
        try:
            yield
        finally:
            if self._tic is not None:
                self._tic += time.perf_counter() - tic

    def lap(self) -> None:
        """Close the window (synchronising the device) and open the next."""
        self.stop()
        self.start()

    def stop(self) -> None:
        """Close the window, if one is open."""
        if self._tic is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - self._tic
        self._tic = None
        self.train_time += elapsed
        if not self._window:  # no step in it (the clock restarted after an evaluation, stopped for a checkpoint)
            return
        _add(self.images, self._window)
        if self._laps == 0:  # the session's first window is warm-up: kept aside, used only if nothing else is timed
            self._warmup = (elapsed, dict(self._window))
        else:
            self._timed_time += elapsed
            _add(self._timed_images, self._window)
        self._laps += 1
        self._window = {}

    def throughput(self) -> dict[str, float]:
        """``throughput/images_per_s`` (all domains) and ``throughput/<domain>`` images per second."""
        seconds, images = self._timed_time, self._timed_images
        if seconds == 0.0 or not images:  # (a checkpoint of 0.3.0 may hold empty windows' time without images)
            seconds, images = self._warmup
        seconds = max(seconds, 1e-9)
        out = {"throughput/images_per_s": sum(images.values()) / seconds}
        out.update({f"throughput/{name}": n / seconds for name, n in images.items()})
        return out

    def summary(self) -> dict[str, Any]:
        """What ``metrics.json`` reports."""
        rates = self.throughput()
        return {
            "images_per_s": rates["throughput/images_per_s"],
            "images_per_s_by_domain": {
                k.split("/", 1)[1]: v for k, v in rates.items() if k != "throughput/images_per_s"
            },
            "images_seen": dict(self.images),
            "train_time_s": self.train_time,
        }

    def state_dict(self) -> dict[str, Any]:
        """Totals carried by checkpoints (a resumed run adds to them)."""
        return {"train_time": self.train_time, "images": dict(self.images),
                "timed_time": self._timed_time, "timed_images": dict(self._timed_images)}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.train_time = float(state.get("train_time", 0.0))
        self.images = {str(k): int(v) for k, v in state.get("images", {}).items()}
        self._timed_time = float(state.get("timed_time", 0.0))
        self._timed_images = {str(k): int(v) for k, v in state.get("timed_images", {}).items()}


def _add(total: dict[str, int], more: Mapping[str, int]) -> None:
    for name, n in more.items():
        total[name] = total.get(name, 0) + n
