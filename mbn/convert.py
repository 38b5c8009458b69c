"""Model conversion: plain BatchNorm <-> MultiSourceBatchNorm, and per-source SyncBatchNorm.

``convert_model`` follows timm's ``convert_splitbn_model`` (recursive replacement that copies weights
and running statistics, so pretrained models carry over); ``export_model`` is how AdvProp drops the
auxiliary BNs at test time (Xie et al. 2020, §4.2): it returns a plain model holding one source.
"""

from __future__ import annotations

import argparse
import copy
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
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


# ------------------------------------------------------------------------------------------- timm's --split-bn

_AUX_KEY = re.compile(r"^(?P<path>.+)\.aux_bn\.(?P<index>\d+)\.(?P<leaf>[^.]+)$")
_BN_LEAVES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def split_bn_count(state: Mapping[str, Tensor]) -> int:
    """How many BNs each layer of a timm ``--split-bn`` state dict holds (1 + its ``aux_bn`` layers; 1 if none)."""
    indices = [int(m["index"]) for m in map(_AUX_KEY.match, state) if m is not None]
    return 1 + (max(indices) + 1 if indices else 0)


@dataclass
class TimmCheckpoint:
    """What mbn reads of a checkpoint of timm's ``train.py``: the model state, the architecture, the command line."""

    state: dict[str, Tensor]
    arch: str | None = None  # timm's model name (``args.model``)
    args: dict[str, Any] = field(default_factory=dict)  # timm's argparse namespace, as a dict


def read_timm_checkpoint(path: str | Path, *, ema: bool = False) -> TimmCheckpoint:
    """The model state dict of a checkpoint written by timm's ``train.py`` (or a bare state dict).

    Read with ``weights_only=True``; timm stores its command line as an ``argparse.Namespace``, the one object
    allowed besides tensors and containers. A ``module.`` prefix (DDP) is removed.

    Args:
        path: ``checkpoint-*.pth.tar``, ``model_best.pth.tar``, ``last.pth.tar``, a saved state dict, or a
            ``.safetensors`` file.
        ema: the ``state_dict_ema`` entry (timm's ``--model-ema``) instead of ``state_dict``.

    Raises:
        ValueError: unreadable file, or no such entry; the message names the file.
    """
    path = Path(path)
    ckpt: Any
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            ckpt = load_file(str(path))
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such checkpoint") from None
    except pickle.UnpicklingError as err:
        refused = "GLOBAL" in str(err) or "allowed global" in str(err)
        reason = (
            "it holds objects besides tensors, containers and timm's argparse.Namespace; mbn runs no code from a file"
            if refused
            else "not a file torch.save wrote, or a damaged one"
        )
        raise ValueError(f"{path}: not a readable checkpoint ({reason})") from None
    except Exception as err:
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__})") from None
    key = "state_dict_ema" if ema else "state_dict"
    state: dict[str, Tensor]
    if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
        state, arch, args = ckpt[key], ckpt.get("arch"), ckpt.get("args")
    elif isinstance(ckpt, dict) and ckpt and not ema and all(isinstance(v, Tensor) for v in ckpt.values()):
        state, arch, args = ckpt, None, None
    else:
        raise ValueError(f"{path}: no {key!r} entry (a checkpoint of timm's train.py was expected)")
    return TimmCheckpoint(
        {k.removeprefix("module."): v for k, v in state.items()},
        arch if isinstance(arch, str) else None,
        vars(args) if isinstance(args, argparse.Namespace) else dict(args) if isinstance(args, dict) else {},
    )


def load_split_bn(
    model: nn.Module, state: Mapping[str, Tensor], sources: Sequence[str] | None = None, *, strict: bool = True
) -> nn.Module:
    """Convert ``model`` to one BN per source and load a state dict trained with timm's ``--split-bn``.

    timm's ``SplitBatchNorm2d`` normalises split 0 of each batch with the layer's own BN (keys ``<layer>.weight``,
    ...) and split ``i`` with ``<layer>.aux_bn.<i-1>``; with ``--aug-splits`` split 0 holds the clean images.
    Here split ``i`` becomes source ``sources[i]``: each source's BN holds that split's affine pair and running
    statistics, so ``mbn.split_sources`` / ``use_source`` reproduce timm's training forward per split, and
    ``mbn-eval`` can compare the BNs (``--bn``, per-BN accuracy).

    Args:
        model: the *plain* architecture the checkpoint was trained with (e.g. ``timm.create_model("resnet50")``).
        state: the checkpoint's state dict (:func:`read_timm_checkpoint` ``.state``).
        sources: one name per split, main first (default: ``clean``, ``aug1``, ``aug2``, ...).
        strict: every key must match, as ``load_state_dict(strict=True)``.

    Returns:
        ``model``, converted in place, holding the weights.

    Raises:
        ValueError: ``sources`` of another length than the splits, or keys or shapes that do not fit the model
            (then ``model`` is converted but only partly loaded: build a fresh one).
    """
    splits = split_bn_count(state)
    names = validate_source_names(sources or ("clean", *(f"aug{i}" for i in range(1, splits))))
    if len(names) != splits:
        raise ValueError(f"sources: the checkpoint has {splits} BNs per layer, got {len(names)} names {list(names)}")
    convert_model(model, names)
    norm_paths = {name for name, module in model.named_modules() if isinstance(module, MultiSourceBatchNorm)}
    renamed: dict[str, Tensor] = {}
    for key, value in state.items():
        aux = _AUX_KEY.match(key)
        path, _, leaf = key.rpartition(".")
        if aux is not None:
            index = int(aux["index"])
            renamed[f"{aux['path']}.bns.{names[index + 1]}.{aux['leaf']}"] = value
        elif path in norm_paths and leaf in _BN_LEAVES:
            renamed[f"{path}.bns.{names[0]}.{leaf}"] = value
        else:
            renamed[key] = value
    try:
        result = model.load_state_dict(renamed, strict=False)
    except RuntimeError as err:  # shapes: another width or number of classes
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise ValueError(f"the state dict does not fit the model ({lines[-1][:240]})") from None
    if strict and (result.missing_keys or result.unexpected_keys):
        kind, keys = ("missing", result.missing_keys) if result.missing_keys else ("unexpected", result.unexpected_keys)
        raise ValueError(f"the state dict does not fit the model ({kind} keys, e.g. {', '.join(keys[:3])})")
    return model
