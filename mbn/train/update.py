"""The weight update of one optimisation step, after its micro-batches' backward passes.

``begin`` zeroes the gradients before any domain runs (an attack may add reused gradients to them) and opens the
step's :class:`~mbn.train.step.UpdateLedger`; ``apply`` averages the attack gradients kept aside under DDP,
normalises per sample (``optim.grad_normalization=sample_mean``), clips, steps the optimiser through the AMP
scaler, steps the schedule and updates the weight average.
"""

from __future__ import annotations

import torch
from torch import nn

from mbn.distributed import DistContext
from mbn.ema import WeightEma
from mbn.gradnorm import SampleMeanGradients
from mbn.optim import StepSchedule
from mbn.train.step import UpdateLedger


class Update:
    """Optimiser, schedule, AMP scaler, clipping, per-sample normalisation and weight EMA of one run."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: StepSchedule,
        scaler: torch.amp.GradScaler,
        dist: DistContext,
        *,
        grad_clip: float | None = None,
        normalizer: SampleMeanGradients | None = None,
        ema: WeightEma | None = None,
    ) -> None:
        self.model, self.optimizer, self.scheduler, self.scaler, self.dist = model, optimizer, scheduler, scaler, dist
        self.grad_clip, self.normalizer, self.ema = grad_clip, normalizer, ema

    def begin(self) -> UpdateLedger:
        """Zero the gradients (before the domains: an attack may add reused gradients) and open a ledger."""
        self.optimizer.zero_grad(set_to_none=True)
        return UpdateLedger()

    def apply(self, ledger: UpdateLedger, step: int) -> None:
        """Apply the accumulated gradients as update number ``step`` (1-based)."""
        if ledger.reused:
            self.dist.add_mean_over_ranks(ledger.reused)
        if self.normalizer is not None:
            self.normalizer.divide(ledger.counts)
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model, step)

    @property
    def lr(self) -> float:
        """The learning rate of the first parameter group."""
        return float(self.optimizer.param_groups[0]["lr"])
