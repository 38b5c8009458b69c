"""Test-time BN adaptation: re-estimate one BN source's statistics on unlabelled test images, then score.

Schneider et al., "Improving robustness against common corruptions by covariate shift adaptation" (NeurIPS 2020):
a corrupted test set shifts every layer's input statistics; replacing the training statistics of the BatchNorm
layers by ones estimated on the test images (no labels, no gradient step) recovers much of the lost accuracy.
Their prior-weighted version mixes the two:

    mean = N / (N + n) * mean_train + n / (N + n) * mean_test   (the same for the variance)

with ``n`` the number of test images the statistics come from and ``N`` the prior's strength in images; ``N = 0``
is full re-estimation. Here the test statistics of a set are estimated on all of its images (``n`` = its size, or
``max_images``) the way :func:`torch.optim.swa_utils.update_bn` re-estimates BN statistics: a forward pass in
which only the chosen BN layers are in training mode, averaging the per-batch means and variances
(``momentum=None``), so the estimate depends slightly on the batch size. Schneider et al. estimate per test batch
instead (``n`` = batch size), so the same ``N`` is a much weaker prior here.

Only the chosen source's BN layers change, and only inside :func:`adapted_bn`: the saved statistics are put back
when the block ends, whatever happens, so the model (and any checkpoint it came from) is never altered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from mbn.routing import eval_mode, multi_source_norms, use_source

Batch = tuple[Tensor, Tensor]


def source_bns(model: nn.Module, source: str) -> list[_BatchNorm]:
    """The BatchNorm layer of ``source`` in every MultiSourceBatchNorm of ``model``."""
    with use_source(model, source):  # validates the name
        pass
    bns = [norm.bns[source] for norm in multi_source_norms(model)]
    return [bn for bn in bns if isinstance(bn, _BatchNorm) and bn.running_mean is not None]


@torch.no_grad()
def estimate_statistics(
    model: nn.Module,
    batches: Iterable[Batch],
    source: str,
    to_device: Callable[[Batch], Batch],
    max_images: int | None = None,
) -> int:
    """Replace ``source``'s running statistics by their cumulative average over ``batches``; return the image count.

    Every other module stays in eval mode (dropout off, other sources untouched). Labels are not used.
    """
    bns = source_bns(model, source)
    momenta = [bn.momentum for bn in bns]
    seen = 0
    with eval_mode(model), use_source(model, source):
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over batches, as torch.optim.swa_utils.update_bn
            bn.train()
        try:
            for batch in batches:
                images, _ = to_device(batch)
                if max_images is not None:
                    images = images[: max_images - seen]
                if images.shape[0] < 2:  # a one-image batch has no variance; skip it
                    if max_images is not None and seen >= max_images:
                        break
                    continue
                model(images)
                seen += int(images.shape[0])
                if max_images is not None and seen >= max_images:
                    break
        finally:
            for bn, momentum in zip(bns, momenta, strict=True):
                bn.momentum = momentum
                bn.eval()
    return seen


@contextmanager
def adapted_bn(
    model: nn.Module,
    batches: Iterable[Batch],
    source: str,
    to_device: Callable[[Batch], Batch],
    *,
    prior: float = 0.0,
    max_images: int | None = None,
) -> Iterator[int]:
    """Re-estimate ``source``'s BN statistics on ``batches`` for the block; restore them exactly afterwards.

    The estimate is mixed with the training statistics at weight ``prior / (prior + n)``. Yields ``n``, the number
    of images estimated on.

    Args:
        model: a converted model.
        batches: the unlabelled test images (labels are ignored).
        source: the BN source to adapt (the one the scoring goes through).
        to_device: turns a batch into float images on the model's device.
        prior: ``N`` in ``N / (N + n)``: 0 is full re-estimation.
        max_images: estimate on at most this many images (default: all).
    """
    if prior < 0:
        raise ValueError(f"prior must be >= 0, got {prior}")
    bns = source_bns(model, source)
    saved = [
        (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())  # type: ignore[union-attr]
        for bn in bns
    ]
    try:
        n = estimate_statistics(model, batches, source, to_device, max_images)
        weight = prior / (prior + n) if prior + n > 0 else 1.0
        if n == 0:  # nothing to estimate on: keep the training statistics
            weight = 1.0
        with torch.no_grad():
            for bn, (mean, var, _) in zip(bns, saved, strict=True):
                bn.running_mean.mul_(1 - weight).add_(mean, alpha=weight)  # type: ignore[union-attr]
                bn.running_var.mul_(1 - weight).add_(var, alpha=weight)  # type: ignore[union-attr]
        yield n
    finally:
        with torch.no_grad():
            for bn, (mean, var, tracked) in zip(bns, saved, strict=True):
                bn.running_mean.copy_(mean)  # type: ignore[union-attr]
                bn.running_var.copy_(var)  # type: ignore[union-attr]
                bn.num_batches_tracked.copy_(tracked)  # type: ignore[union-attr]
