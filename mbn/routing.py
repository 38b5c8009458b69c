"""Routing: choose which source's BatchNorm every MultiSourceBatchNorm in a model uses.

Routing is state on each :class:`~mbn.norm.MultiSourceBatchNorm`, set for the duration of a ``with``
block and restored afterwards, so contexts nest. It holds in ``eval()`` mode too: an attack that calls
``model.eval()`` inside ``use_source(model, "adv")`` normalises with the ``adv`` running statistics
(timm's SplitBatchNorm2d silently falls back to the main BN there).

Under ``torch.compile`` the routing attributes are guarded: each distinct source (or split layout)
compiles its own graph once, after which switching between them costs a guard check.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from torch import nn

from mbn.norm import MultiSourceBatchNorm


def multi_source_norms(model: nn.Module) -> list[MultiSourceBatchNorm]:
    """All MultiSourceBatchNorm layers of ``model`` (looks through DDP/compile wrappers)."""
    return [m for m in model.modules() if isinstance(m, MultiSourceBatchNorm)]


def model_sources(model: nn.Module) -> tuple[str, ...]:
    """The source names of a converted model, main source first.

    Raises:
        ValueError: if the model has no MultiSourceBatchNorm or its layers disagree on the sources.
    """
    return _sources_of(multi_source_norms(model))


def _sources_of(norms: list[MultiSourceBatchNorm]) -> tuple[str, ...]:
    if not norms:
        raise ValueError("model has no MultiSourceBatchNorm layers; convert it with mbn.convert_model first")
    sources = norms[0].sources
    for norm in norms[1:]:
        if norm.sources != sources:
            raise ValueError(f"inconsistent sources across layers: {list(sources)} vs {list(norm.sources)}")
    return sources


@contextmanager
def _set_on(norms: list[MultiSourceBatchNorm], **values: object) -> Iterator[None]:
    """Set routing attributes on every layer for the block, then restore each layer's previous values."""
    saved = [{key: getattr(n, key) for key in values} for n in norms]
    for n in norms:
        for key, value in values.items():
            setattr(n, key, value)
    try:
        yield
    finally:
        for n, previous in zip(norms, saved, strict=True):
            for key, value in previous.items():
                setattr(n, key, value)


def _check_known(model: nn.Module, names: list[str]) -> list[MultiSourceBatchNorm]:
    norms = multi_source_norms(model)
    sources = _sources_of(norms)
    for name in names:
        if name not in sources:
            raise ValueError(f"unknown source {name!r}; registered sources: {list(sources)}")
    return norms


@contextmanager
def use_source(model: nn.Module, name: str) -> Iterator[nn.Module]:
    """Normalise with source ``name`` in every MultiSourceBatchNorm of ``model``, train and eval mode.

    Examples:
        >>> import mbn, torch
        >>> net = mbn.convert_model(torch.nn.Sequential(torch.nn.BatchNorm1d(3)), sources=("clean", "adv"))
        >>> with mbn.use_source(net, "adv"):
        ...     out = net(torch.randn(4, 3))
    """
    with _set_on(_check_known(model, [name]), active=name, split=None):
        yield model


@contextmanager
def split_sources(model: nn.Module, sizes: Mapping[str, int]) -> Iterator[nn.Module]:
    """Route consecutive chunks of one concatenated batch to their sources' BNs.

    ``sizes`` maps source names to chunk lengths, in batch order; every layer splits its input along
    dim 0, normalises each chunk with its source and concatenates. Outputs, running statistics and
    gradients equal separate forwards per source.

    Examples:
        >>> import mbn, torch
        >>> net = mbn.convert_model(torch.nn.Sequential(torch.nn.BatchNorm1d(3)), sources=("clean", "adv"))
        >>> with mbn.split_sources(net, {"clean": 4, "adv": 2}):
        ...     net(torch.randn(6, 3)).shape
        torch.Size([6, 3])
    """
    layout = tuple((str(k), int(v)) for k, v in sizes.items())
    norms = _check_known(model, [k for k, _ in layout])
    for name, size in layout:
        if size < 0:
            raise ValueError(f"split size for source {name!r} must be >= 0, got {size}")
    with _set_on(norms, split=layout):
        yield model


@contextmanager
def frozen_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Train-mode forwards use batch statistics but leave every source's running statistics untouched.

    This is the ``attack_bn: train`` mode of the attack domains (as in the Fast AdvProp code).
    """
    with _set_on(multi_source_norms(model), update_stats=False):
        yield model


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore each module's previous mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
