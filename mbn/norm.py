"""MultiSourceBatchNorm: one BatchNorm per data source, routed per batch.

Implements the auxiliary BatchNorm of AdvProp (Xie et al., CVPR 2020, §4.2) generalised to N
sources: every registered source owns a full BatchNorm module (affine pair and running statistics),
stored in ``self.bns[name]``; the first source is the main one, kept for inference. Which source a
forward uses is set from outside by the routing context managers in :mod:`mbn.routing`.

State-dict layout (stable; checkpoints depend on it)::

    <path>.bns.<source>.weight / bias / running_mean / running_var / num_batches_tracked

``share_affine`` / ``share_stats`` tie the affine pair / the running statistics of every source to
the main source's tensors (the keys stay, holding the same values).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

_AFFINE = ("weight", "bias")
_STATS = ("running_mean", "running_var", "num_batches_tracked")


def validate_source_names(sources: Sequence[str]) -> tuple[str, ...]:
    """Check source names are distinct, non-empty identifiers and return them as a tuple."""
    names = tuple(sources)
    if not names:
        raise ValueError("at least one source is required")
    for name in names:
        if not isinstance(name, str) or not name.isidentifier() or hasattr(nn.ModuleDict(), name):
            raise ValueError(
                f"invalid source name {name!r}: expected a Python identifier that is not a ModuleDict attribute"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate source names in {list(names)}")
    return names


class MultiSourceBatchNorm(nn.Module):
    """Holds one BatchNorm per named source and normalises each batch with its source's BN.

    Args:
        bn: the BatchNorm to copy for every source (``BatchNorm1d/2d/3d`` or ``SyncBatchNorm``);
            each source starts as a deep copy of its weights, bias and running statistics.
        sources: ordered source names; the first is the main source used outside any routing.
        share_affine: keep one affine pair for all sources, separating only the statistics.
        share_stats: keep one set of running statistics, separating only the affine pair.

    Shape:
        Same as the wrapped BatchNorm: ``(N, C, *)``.

    Examples:
        >>> import mbn, torch
        >>> norm = mbn.MultiSourceBatchNorm(torch.nn.BatchNorm2d(8), ["clean", "adv"])
        >>> norm(torch.randn(4, 8, 5, 5)).shape
        torch.Size([4, 8, 5, 5])
        >>> norm.sources
        ('clean', 'adv')
    """

    def __init__(
        self,
        bn: _BatchNorm,
        sources: Sequence[str],
        *,
        share_affine: bool = False,
        share_stats: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(bn, _BatchNorm):
            raise TypeError(f"expected a BatchNorm module, got {type(bn).__name__}")
        names = validate_source_names(sources)
        self.bns = nn.ModuleDict({name: _copy_bn(bn) for name in names})
        self.share_affine = share_affine
        self.share_stats = share_stats
        # Routing state, set by mbn.routing; not part of the state dict.
        self.active: str = names[0]
        self.split: tuple[tuple[str, int], ...] | None = None
        self.update_stats: bool = True
        self.tie_shared()
        self.train(bn.training)  # a converted model keeps its train/eval mode

    @property
    def sources(self) -> tuple[str, ...]:
        """Registered source names, main source first."""
        return tuple(self.bns.keys())

    @property
    def main_source(self) -> str:
        """The source used at inference and outside any routing context."""
        return next(iter(self.bns.keys()))

    @property
    def num_features(self) -> int:
        """Channels normalised (as on the wrapped BatchNorm)."""
        return int(self.bns[self.main_source].num_features)  # type: ignore[arg-type]

    def tie_shared(self) -> None:
        """Make every source use the main source's affine pair / statistics when sharing is on.

        Re-run after anything that replaces tensors per module (``Module._apply`` does for buffers).
        """
        main = self.bns[self.main_source]
        for name, bn in self.bns.items():
            if name == self.main_source:
                continue
            if self.share_affine and bn.affine:
                for key in _AFFINE:
                    setattr(bn, key, getattr(main, key))
            if self.share_stats and bn.track_running_stats:
                for key in _STATS:
                    setattr(bn, key, getattr(main, key))

    def _apply(self, fn, recurse: bool = True):
        # .to()/.half() rebuild buffers per module, which would untie shared statistics.
        result = super()._apply(fn, recurse)
        self.tie_shared()
        return result

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x`` with the active source, or split it across sources in split mode."""
        if self.split is None:
            return self._normalize(self.active, x)
        sizes = [size for _, size in self.split]
        if sum(sizes) != x.shape[0]:
            raise ValueError(
                f"split_sources sizes {dict(self.split)} sum to {sum(sizes)}, but the batch has {x.shape[0]} samples"
            )
        chunks = x.split(sizes)
        outs = [
            self._normalize(name, chunk) for (name, _), chunk in zip(self.split, chunks, strict=False) if chunk.shape[0]
        ]
        return torch.cat(outs)  # (sum(sizes), C, *)

    def _normalize(self, source: str, x: Tensor) -> Tensor:
        bn = self.bns[source]
        if self.update_stats or not bn.training:
            return bn(x)
        return _batch_norm_frozen_stats(bn, x)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        """Sources and sharing options, shown in ``print(model)``."""
        return f"sources={list(self.sources)}, share_affine={self.share_affine}, share_stats={self.share_stats}"


def _copy_bn(bn: _BatchNorm) -> _BatchNorm:
    """An independent deep copy of ``bn`` (class, options, fused activation of timm's BatchNormAct2d, tensors)."""
    memo: dict[int, object] = {}
    group = getattr(bn, "process_group", None)
    if group is not None:  # process groups are handles, shared rather than copied
        memo[id(group)] = group
    return copy.deepcopy(bn, memo)


def _batch_norm_frozen_stats(bn: _BatchNorm, x: Tensor) -> Tensor:
    """Training-mode BN (batch statistics) that leaves the running statistics untouched."""
    if isinstance(bn, nn.SyncBatchNorm) and torch.distributed.is_available() and torch.distributed.is_initialized():
        # Cross-process statistics need SyncBatchNorm's own forward; it writes the running estimates in place, so
        # it gets copies: the buffers themselves are never written (nor their version counters bumped).
        names = [n for n in ("running_mean", "running_var", "num_batches_tracked") if bn._buffers.get(n) is not None]
        saved = {n: bn._buffers[n] for n in names}
        for n in names:
            bn._buffers[n] = saved[n].clone()  # type: ignore[union-attr]
        try:
            return bn(x)
        finally:
            bn._buffers.update(saved)
    return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
