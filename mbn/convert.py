"""Model conversion: plain BatchNorm <-> MultiSourceBatchNorm, and per-source SyncBatchNorm.

``convert_model`` follows timm's ``convert_splitbn_model`` (recursive replacement that copies weights
and running statistics, so pretrained models carry over); ``export_model`` is how AdvProp drops the
auxiliary BNs at test time (Xie et al. 2020, §4.2): it returns a plain model holding one source.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mbn.heads import drop_heads
from mbn.norm import MultiSourceBatchNorm, validate_source_names
from mbn.routing import model_sources, multi_source_norms


def convert_model(
    model: nn.Module,
    sources: Sequence[str] = ("clean", "adv"),
    *,
    share_affine: bool = False,
    share_stats: bool = False,
) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d and SyncBatchNorm in ``model`` with a MultiSourceBatchNorm, in place.

    Every source starts as a copy of the original BN (weights, bias, running statistics and
    ``num_batches_tracked``). InstanceNorm and other norms are left alone.

    Args:
        model: any ``nn.Module`` (torchvision, timm, your own).
        sources: ordered source names; the first is the main source used at inference.
        share_affine: one affine pair for all sources (separate statistics only).
        share_stats: one set of running statistics for all sources (separate affine only).

    Returns:
        The same ``model`` object, converted.

    Raises:
        ValueError: if ``model`` is already converted, has no BatchNorm layer, or ``sources`` is invalid.

    Examples:
        >>> import mbn, torchvision
        >>> net = mbn.convert_model(torchvision.models.resnet18(num_classes=10), sources=("clean", "adv"))
        >>> mbn.model_sources(net)
        ('clean', 'adv')
    """
    names = validate_source_names(sources)
    if multi_source_norms(model):
        raise ValueError("model is already converted (it has MultiSourceBatchNorm layers); export it first")
    if not has_batchnorm(model):
        raise ValueError(no_batchnorm_message(model))
    return _convert(model, names, share_affine, share_stats)


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer to convert."""
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def no_batchnorm_message(model: nn.Module) -> str:
    """Why a model without BatchNorm cannot be converted, in one line."""
    return (
        f"{type(model).__name__} has no BatchNorm layer to give one BN per source (LayerNorm/GroupNorm "
        "networks such as ConvNeXt or ViT cannot be trained with N BNs); choose a BatchNorm network"
    )


def _convert(model: nn.Module, names: tuple[str, ...], share_affine: bool, share_stats: bool) -> nn.Module:
    if isinstance(model, _BatchNorm):
        return MultiSourceBatchNorm(model, names, share_affine=share_affine, share_stats=share_stats)
    for name, child in list(model.named_children()):
        if isinstance(child, _BatchNorm):
            setattr(model, name, MultiSourceBatchNorm(child, names, share_affine=share_affine, share_stats=share_stats))
        else:
            _convert(child, names, share_affine, share_stats)
    return model


def export_model(model: nn.Module, source: str | None = None) -> nn.Module:
    """A deep copy of ``model`` with plain BN layers holding ``source``'s parameters and statistics.

    Auxiliary heads (:func:`mbn.attach_heads`) are dropped too. The copy's state-dict keys equal the
    unconverted model's, so it loads into a fresh instance of the original architecture with identical
    eval outputs. ``source`` defaults to the main source.

    Examples:
        >>> import mbn, torch, torchvision
        >>> net = mbn.convert_model(torchvision.models.resnet18(num_classes=10))
        >>> plain = mbn.export_model(net, "clean")
        >>> torchvision.models.resnet18(num_classes=10).load_state_dict(plain.state_dict())
        <All keys matched successfully>
    """
    sources = model_sources(model)
    source = sources[0] if source is None else source
    if source not in sources:
        raise ValueError(f"unknown source {source!r}; registered sources: {list(sources)}")
    exported = drop_heads(copy.deepcopy(model))
    if isinstance(exported, MultiSourceBatchNorm):
        return _plain_bn(exported, source)
    for parent in list(exported.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MultiSourceBatchNorm):
                setattr(parent, name, _plain_bn(child, source))
    return exported


def _plain_bn(norm: MultiSourceBatchNorm, source: str) -> _BatchNorm:
    bn = norm.bns[source]
    assert isinstance(bn, _BatchNorm)
    bn.train(norm.training)
    return bn


def convert_sync_batchnorm(model: nn.Module, process_group: object | None = None) -> nn.Module:
    """Give every source of every MultiSourceBatchNorm its own ``SyncBatchNorm`` (for DDP).

    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` also works on converted models, because each
    source is a child BN module. This helper uses timm's converter instead, which also keeps the fused
    activation of timm's ``BatchNormAct2d`` (torch's turns it into a plain SyncBatchNorm, dropping it),
    and re-ties tensors shared with ``share_affine``/``share_stats``.
    """
    from timm.layers import convert_sync_batchnorm as timm_convert_sync_batchnorm  # timm imports slowly

    model = timm_convert_sync_batchnorm(model, process_group)
    for norm in multi_source_norms(model):
        norm.tie_shared()
    return model
