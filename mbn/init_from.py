"""Initialise a model from another run's checkpoint: self-supervised pre-training, then adversarial training.

Every tensor of the new model whose key is in the checkpoint with the same shape is loaded: the backbone,
and the heads whose shapes match (Kucer et al. 2021 pre-train with rotation prediction, then train
adversarially from those weights). A BN source the checkpoint does not have starts from the checkpoint's
main source, as :func:`mbn.convert_model` starts every source from the plain BN. Everything else stays
freshly initialised, and the report says what.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

_SOURCE_KEY = re.compile(r"^(?P<prefix>.*\.bns\.)(?P<source>[^.]+)(?P<suffix>\..+)$")


@dataclass
class InitReport:
    """Keys loaded from the checkpoint, and keys left fresh with the reason."""

    loaded: list[str] = field(default_factory=list)
    fresh: dict[str, str] = field(default_factory=dict)

    def summary(self, path: object) -> str:
        """One line: counts, and the fresh keys (the first few)."""
        line = f"model.init_from: loaded {len(self.loaded)} of {len(self.loaded) + len(self.fresh)} tensors from {path}"
        if self.fresh:
            shown = [f"{k} ({why})" for k, why in list(self.fresh.items())[:6]]
            more = f", ... {len(self.fresh) - 6} more" if len(self.fresh) > 6 else ""
            line += "; left fresh: " + ", ".join(shown) + more
        return line


def _source_fallback(key: str, main: str | None) -> str | None:
    match = _SOURCE_KEY.match(key)
    if match is None or main is None:
        return None
    return f"{match['prefix']}{main}{match['suffix']}"


@torch.no_grad()
def init_from_state(model: nn.Module, state: Mapping[str, Tensor], sources: Sequence[str] = ()) -> InitReport:
    """Copy every matching tensor of ``state`` into ``model``; ``sources`` are the checkpoint's BN sources.

    Args:
        model: the freshly built model (converted, with its heads).
        state: the checkpoint's model state dict.
        sources: the checkpoint's BN sources, main first (a source the model has and the checkpoint
            lacks is initialised from the checkpoint's main source).

    Returns:
        What was loaded and what was left fresh.
    """
    report = InitReport()
    main = sources[0] if sources else None
    for key, target in model.state_dict().items():
        source_key = key if key in state else _source_fallback(key, main)
        if source_key is None or source_key not in state:
            report.fresh[key] = "not in checkpoint"
            continue
        value = state[source_key]
        if tuple(value.shape) != tuple(target.shape):
            report.fresh[key] = f"shape {tuple(value.shape)} vs {tuple(target.shape)}"
            continue
        target.copy_(value.to(device=target.device, dtype=target.dtype))
        report.loaded.append(key)
    return report
