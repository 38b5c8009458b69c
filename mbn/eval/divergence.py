"""Divergence between the sources' BN running statistics, layer by layer.

AdvProp's premise (Xie et al. 2020, §3-4) is that clean and adversarial images have different
feature statistics; this measures it on a trained model. For each MultiSourceBatchNorm layer and
each auxiliary source, the per-channel Gaussians N(mean, var) of that source and of the main source
are compared with the symmetric KL divergence, averaged over channels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from mbn.norm import MultiSourceBatchNorm


def symmetric_kl(mean_a: Tensor, var_a: Tensor, mean_b: Tensor, var_b: Tensor) -> Tensor:
    """Per-channel symmetric KL between N(mean_a, var_a) and N(mean_b, var_b)."""
    diff2 = (mean_a - mean_b).square()
    return 0.5 * ((var_a + diff2) / var_b + (var_b + diff2) / var_a) - 1.0


def bn_divergence(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per-layer mean symmetric KL of every auxiliary source's statistics against the main source's.

    Returns:
        ``{source: {layer_name: divergence}}`` for every non-main source, layers in model order.
    """
    out: dict[str, dict[str, float]] = {}
    for layer, norm in model.named_modules():
        if not isinstance(norm, MultiSourceBatchNorm) or norm.share_stats:
            continue
        main = norm.bns[norm.main_source]
        if main.running_mean is None:
            continue
        for source, bn in norm.bns.items():
            if source == norm.main_source:
                continue
            assert isinstance(bn, _BatchNorm) and isinstance(main, _BatchNorm)
            with torch.no_grad():
                kl = symmetric_kl(bn.running_mean, bn.running_var, main.running_mean, main.running_var)  # type: ignore[arg-type]
            out.setdefault(source, {})[layer] = float(kl.float().mean())
    return out
