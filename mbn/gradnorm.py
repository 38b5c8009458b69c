"""``optim.grad_normalization=sample_mean``: each gradient is a weighted mean over the samples that reached it.

This is the normalisation of Fast AdvProp (Mei et al. 2022, "re-balancing training samples").

With ``domain_mean`` (the default) the step minimises ``sum_d weight_d * mean loss_d``. With ``sample_mean`` it
backpropagates ``sum_d weight_d * sum loss_d`` and then divides each parameter's gradient by the weighted
sample count of the domains whose forward reached it: a BN source's affine parameters by the count of the
domains routed through that source, an auxiliary head's by the domains it scores, every other parameter by all
domains (the class head too: a simplification when a domain is scored by another head). Reused attack
gradients count as their own samples, as in the official code.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from mbn.norm import MultiSourceBatchNorm

SHARED = ("shared", "")
Owner = tuple[str, str]  # ("shared", ""), ("bn", source) or ("head", name)


class SampleMeanGradients:
    """The parameter groups of ``model`` by owner, built once; :meth:`divide` normalises one step's gradients."""

    def __init__(self, model: nn.Module) -> None:
        owners: dict[int, set[Owner]] = {}
        for module in model.modules():
            if isinstance(module, MultiSourceBatchNorm):
                for source, bn in module.bns.items():
                    for p in bn.parameters(recurse=False):
                        owners.setdefault(id(p), set()).add(("bn", source))
        heads = getattr(model, "aux_heads", None)
        if isinstance(heads, nn.ModuleDict):
            for name, head in heads.items():
                for p in head.parameters():
                    owners.setdefault(id(p), set()).add(("head", name))
        self.groups: dict[Owner, list[nn.Parameter]] = {}
        for p in model.parameters():
            mine = owners.get(id(p), set())
            owner = next(iter(mine)) if len(mine) == 1 else SHARED  # a shared affine pair belongs to every source
            self.groups.setdefault(owner, []).append(p)

    def divide(self, counts: Mapping[Owner, float]) -> None:
        """Divide each group's gradients by its weighted sample count (groups no sample reached have none)."""
        for owner, params in self.groups.items():
            count = counts.get(owner, 0.0)
            if count <= 0:
                continue
            for p in params:
                if p.grad is not None:
                    p.grad.div_(count)
