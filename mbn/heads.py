"""Auxiliary heads: extra linear heads on a classifier's penultimate features (e.g. rotation prediction).

The model's own classifier is the ``classes`` head. :func:`attach_heads` adds named linear heads that
read the classifier's input, the penultimate features, as the rotation head of Hendrycks et al.
(NeurIPS 2019) does; a forward pre-hook on the classifier captures those features, so one backbone pass
serves every head. The heads live under ``<model>.aux_heads`` (state-dict keys
``aux_heads.<name>.weight/bias``); :func:`mbn.export_model` drops them, so an exported model's keys
equal the unconverted model's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from mbn.objective import CLASSES
from mbn.validators import is_int

HEADS_ATTR = "aux_heads"


class AuxiliaryHeads(nn.ModuleDict):
    """Named linear heads reading the features captured at the classifier's input."""

    def __init__(self, heads: Mapping[str, nn.Module]) -> None:
        super().__init__(heads)
        self.features: Tensor | None = None

    def capture(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        """Forward pre-hook of the classifier: keep its input for the auxiliary heads."""
        self.features = args[0]


def find_classifier(model: nn.Module) -> tuple[str, nn.Linear]:
    """Name and module of ``model``'s classifier: timm's ``get_classifier()``, else the last ``nn.Linear``.

    Raises:
        ValueError: the model has no linear classifier.
    """
    named = list(model.named_modules())
    getter = next((m.get_classifier for _, m in named if callable(getattr(m, "get_classifier", None))), None)
    if getter is not None:
        head = getter()
        found = next((n for n, m in named if m is head), None)
        if isinstance(head, nn.Linear) and found is not None:
            return found, head
    for name, module in reversed(named):
        if isinstance(module, nn.Linear):
            return name, module
    raise ValueError("the model has no nn.Linear classifier whose input could feed auxiliary heads")


def _bank(model: nn.Module) -> AuxiliaryHeads | None:
    direct = getattr(model, HEADS_ATTR, None)  # the common case: no walk through the modules every step
    if isinstance(direct, AuxiliaryHeads):
        return direct
    return next((m for m in model.modules() if isinstance(m, AuxiliaryHeads)), None)


def attach_heads(model: nn.Module, heads: Mapping[str, int]) -> nn.Module:
    """Add a linear head per ``name -> outputs`` on the classifier's input features, in place.

    Examples:
        >>> import mbn, torch, torchvision
        >>> net = mbn.attach_heads(torchvision.models.resnet18(num_classes=10), {"rotation": 4})
        >>> {k: v.shape for k, v in mbn.forward_heads(net, torch.rand(2, 3, 32, 32), ["classes", "rotation"]).items()}
        {'classes': torch.Size([2, 10]), 'rotation': torch.Size([2, 4])}

    Raises:
        ValueError: a bad head name or size, heads already attached, or no linear classifier.
    """
    for name, outputs in heads.items():
        if not isinstance(name, str) or not name.isidentifier() or name == CLASSES:
            raise ValueError(f"head name {name!r}: expected an identifier other than {CLASSES!r}")
        if not is_int(outputs, low=1):
            raise ValueError(f"head {name!r}: expected a positive number of outputs, got {outputs!r}")
    if _bank(model) is not None:
        raise ValueError("the model already has auxiliary heads")
    if not heads:
        return model
    _, classifier = find_classifier(model)
    bank = AuxiliaryHeads({name: nn.Linear(classifier.in_features, n) for name, n in heads.items()})
    bank.to(device=classifier.weight.device, dtype=classifier.weight.dtype)
    setattr(model, HEADS_ATTR, bank)
    classifier.register_forward_pre_hook(bank.capture)
    return model


def forward_heads(model: nn.Module, x: Tensor, heads: Sequence[str]) -> dict[str, Tensor]:
    """Logits of every head in ``heads`` from one forward of ``model`` (compiled or wrapped models too).

    Raises:
        KeyError: a head the model does not have.
    """
    logits = model(x)
    if all(h == CLASSES for h in heads):
        return {CLASSES: logits}
    bank = _bank(model)
    if bank is None or bank.features is None:
        raise KeyError(f"heads {sorted(set(heads) - {CLASSES})} requested but the model has no auxiliary heads")
    features, bank.features = bank.features, None
    missing = [h for h in heads if h != CLASSES and h not in bank]
    if missing:
        raise KeyError(f"unknown head(s) {missing}; the model has {[CLASSES, *bank.keys()]}")
    return {h: logits if h == CLASSES else bank[h](features) for h in heads}


def drop_heads(model: nn.Module) -> nn.Module:
    """Remove the auxiliary heads and their feature hook from ``model``, in place (export)."""
    bank = _bank(model)
    if bank is None:
        return model
    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if getattr(hook, "__self__", None) is bank:
                del module._forward_pre_hooks[key]
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if child is bank:
                delattr(parent, name)
    return model
