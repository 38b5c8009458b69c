"""Exponential moving average of a model's weights and BN statistics (``ema.decay``), evaluated beside them.

timm's :class:`~timm.utils.ModelEmaV3` supplies the copy, the decay (with its optional warm-up) and the update;
one change: a tensor several state-dict keys share (``model.share_affine`` / ``share_stats`` tie every source's BN
to the main one) is averaged once per step, not once per key.
"""

from __future__ import annotations

import torch
from timm.utils import ModelEmaV3
from torch import nn


class WeightEma(ModelEmaV3):  # type: ignore[misc]
    """``ema = decay * ema + (1 - decay) * model`` after every optimiser step, for every floating tensor.

    Integer buffers (``num_batches_tracked``) are copied. The average lives on the model's device in the
    model's dtype; ``module`` is the averaged model (eval mode), routed like the model it copies.

    Args:
        model: the trained model (unwrapped: not compiled, not DistributedDataParallel).
        decay: the decay per update, in [0, 1).
        warmup: timm's warm-up, ``min(decay, 1 - (1 + step) ** -2/3)``, for short runs from scratch.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False) -> None:
        super().__init__(model, decay=decay, use_warmup=warmup)
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        """Average ``model`` in; ``step`` (optimisation steps done) drives the warm-up when it is on."""
        decay = self.get_decay(step if self.use_warmup else None)
        ema_values, model_values = [], []
        seen: set[int] = set()
        for ema_v, model_v in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            if ema_v.numel() and ema_v.data_ptr() in seen:  # one tensor under several keys: average it once
                continue
            seen.add(ema_v.data_ptr())
            if ema_v.is_floating_point():
                ema_values.append(ema_v)
                model_values.append(model_v.to(ema_v.dtype))
            else:
                ema_v.copy_(model_v)
        if ema_values:
            torch._foreach_lerp_(ema_values, model_values, weight=1.0 - decay)
