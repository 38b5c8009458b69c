"""Test-set accuracy through a chosen BN source (the paper evaluates with the main BN only)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from mbn.routing import eval_mode, use_source

Batch = tuple[Tensor, Tensor]


@torch.no_grad()
def accuracy(
    model: nn.Module,
    batches: Iterable[Batch],
    source: str,
    to_device: Callable[[Batch], Batch],
    autocast: Callable[[], object] | None = None,
) -> float:
    """Top-1 accuracy of ``model`` in eval mode, normalising with ``source``'s running statistics."""
    correct = total = 0
    with eval_mode(model), use_source(model, source):
        for batch in batches:
            images, labels = to_device(batch)
            if autocast is None:
                logits = model(images)
            else:
                with autocast():  # type: ignore[attr-defined]
                    logits = model(images)
            correct += int((logits.argmax(1) == labels).sum())
            total += labels.numel()
    return correct / max(total, 1)
