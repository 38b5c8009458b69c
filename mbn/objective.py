"""What a domain's batch is scored by: one head of the model and a loss on that head's logits.

AdvProp scores every source with the classifier and cross-entropy (Xie et al. 2020, Alg. 1). A
self-supervised source is scored by its own head (rotation prediction, Gidaris et al., ICLR 2018;
Hendrycks et al., NeurIPS 2019) and a soft-label source (mixup, cutmix) by cross-entropy against
probability targets. The trainer minimises a domain's objective and an attack domain maximises the
same one, so what is attacked is what is trained.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

#: Name of the model's own classifier head.
CLASSES = "classes"


@dataclass(frozen=True)
class Objective:
    """A head and the cross-entropy that scores it.

    Targets are class indices ``(N,)`` (int64) or probabilities ``(N, K)`` (float, rows summing to 1).

    Args:
        head: the head whose logits are scored (``classes``: the model's classifier).
        label_smoothing: as in :func:`torch.nn.functional.cross_entropy`.

    Examples:
        >>> import torch
        >>> obj = Objective(label_smoothing=0.1)
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> obj.correct(logits, torch.tensor([0, 0])).tolist()
        [1.0, 0.0]
        >>> obj.correct(logits, torch.tensor([[0.7, 0.3], [0.2, 0.8]])).tolist()
        [1.0, 1.0]
    """

    head: str = CLASSES
    label_smoothing: float = 0.0

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy of ``logits`` (computed in float32) against hard or soft ``targets``."""
        logits = logits.float()
        if targets.is_floating_point():
            targets = targets.to(logits.dtype)
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    def correct(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Per-sample hits as float32: top-1 of ``logits`` equals the target (the argmax of soft targets)."""
        hard = targets.argmax(1) if targets.is_floating_point() else targets
        return (logits.argmax(1) == hard).to(torch.float32)
