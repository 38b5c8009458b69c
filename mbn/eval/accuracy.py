"""Test-set accuracy through a chosen BN source (the paper evaluates with the main BN only): top-1 and top-5.

One pass over the test set gives both (:func:`topk_accuracy`); top-5 is ``None`` when five classes or fewer compete
(it would always be right), as for the robustness suites (:mod:`mbn.eval.suite_eval`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mbn.routing import eval_mode, use_source

Batch = tuple[Tensor, Tensor]

#: Fewest classes for which top-5 accuracy is reported (with five or fewer, every prediction is in the top 5).
TOP5_MIN_CLASSES = 6


@dataclass(frozen=True)
class TopK:
    """Top-1 and top-5 accuracy as fractions; ``top5`` is ``None`` with fewer than :data:`TOP5_MIN_CLASSES` classes."""

    top1: float
    top5: float | None


def topk_hits(logits: Tensor, labels: Tensor) -> tuple[int, int | None]:
    """``(top-1 hits, top-5 hits)`` of a batch of ``logits`` (N, C); top-5 hits are ``None`` when C < 6.

    Top-1 is the argmax (as :func:`accuracy` always was); a top-1 hit counts as a top-5 hit whatever the ties.
    """
    hit1 = logits.argmax(1) == labels
    if logits.shape[1] < TOP5_MIN_CLASSES:
        return int(hit1.sum()), None
    hit5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(1) | hit1
    return int(hit1.sum()), int(hit5.sum())


@torch.no_grad()
def topk_accuracy(
    model: nn.Module,
    batches: Iterable[Batch],
    source: str,
    to_device: Callable[[Batch], Batch],
    autocast: Callable[[], object] | None = None,
) -> TopK:
    """Top-1 and top-5 accuracy of ``model`` in eval mode through ``source``'s BN, in one pass over ``batches``."""
    correct = total = 0
    correct5: int | None = 0
    with eval_mode(model), use_source(model, source):
        for batch in batches:
            images, labels = to_device(batch)
            if autocast is None:
                logits = model(images)
            else:
                with autocast():  # type: ignore[attr-defined]
                    logits = model(images)
            hits1, hits5 = topk_hits(logits, labels)
            correct += hits1
            correct5 = None if hits5 is None or correct5 is None else correct5 + hits5
            total += labels.numel()
    top5 = None if correct5 is None or total == 0 else correct5 / total
    return TopK(correct / max(total, 1), top5)


def accuracy(
    model: nn.Module,
    batches: Iterable[Batch],
    source: str,
    to_device: Callable[[Batch], Batch],
    autocast: Callable[[], object] | None = None,
) -> float:
    """Top-1 accuracy of ``model`` in eval mode, normalising with ``source``'s running statistics."""
    return topk_accuracy(model, batches, source, to_device, autocast).top1
