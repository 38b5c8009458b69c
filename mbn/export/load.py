"""Load an export folder back: the plain network and its evaluation transform, with or without timm's tools."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from mbn.export.preprocessing import Preprocessing
from mbn.export.trained import ExportError


def read_config(folder: Path) -> dict[str, Any]:
    """An export folder's ``config.json``.

    Raises:
        ExportError: no folder, no or malformed ``config.json``.
    """
    path = Path(folder) / "config.json"
    if not Path(folder).is_dir():
        raise ExportError(f"{folder}: no such export folder")
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path}: not found; expected a folder written by mbn-export or timm's save_for_hf") from None
    except (OSError, ValueError) as err:
        raise ExportError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise ExportError(f"{path}: expected an object with an 'architecture' entry")
    if not isinstance(config.get("pretrained_cfg"), dict):
        raise ExportError(f"{path}: expected a 'pretrained_cfg' object (mean, std, input_size)")
    return config


def load_exported(folder: str | Path) -> tuple[nn.Module, Callable[[Any], Any]]:
    """The network of an ``mbn-export`` folder in eval mode, and the transform its inputs need.

    The transform takes a PIL image or a uint8 CHW tensor and returns the normalised float tensor: mbn's own
    evaluation transform (exactly, on uint8 tensors). timm models and mbn's CIFAR ResNets are built through
    ``timm.create_model("local-dir:...")``; torchvision models through ``torchvision.models.get_model``.

    Raises:
        ExportError: not an export folder, or weights that do not fit its architecture.

    Examples:
        >>> model, transform = mbn.load_exported("exported/")  # doctest: +SKIP
        >>> logits = model(transform(image).unsqueeze(0))  # doctest: +SKIP
    """
    folder = Path(folder)
    config = read_config(folder)
    try:
        prep = Preprocessing.from_pretrained_cfg(config["pretrained_cfg"])
        transform = prep.transform()
    except ValueError as err:
        raise ExportError(f"{folder / 'config.json'}: pretrained_cfg: {err}") from None
    arch = config["architecture"]
    try:
        net = _torchvision(folder, config) if arch.startswith("torchvision.") else _timm(folder)
    except ExportError:
        raise
    except Exception as err:
        lines = [line for line in str(err).splitlines() if line.strip()]
        detail = lines[-1].strip() if lines else type(err).__name__
        detail = detail if len(detail) <= 240 else detail[:240] + " ..."
        raise ExportError(f"{folder}: cannot load {arch!r} ({type(err).__name__}: {detail})") from None
    return net.eval(), transform


def _timm(folder: Path) -> nn.Module:
    import timm

    from mbn.timm_models import register

    register()
    return timm.create_model(f"local-dir:{folder.resolve()}", pretrained=True)


def _torchvision(folder: Path, config: dict[str, Any]) -> nn.Module:
    import torchvision
    from safetensors.torch import load_file

    name = config["architecture"].removeprefix("torchvision.")
    if name not in torchvision.models.list_models():
        raise ExportError(f"{folder / 'config.json'}: unknown torchvision model {name!r}")
    net = torchvision.models.get_model(name, **dict(config.get("model_args") or {}))
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ExportError(f"{weights}: not found")
    net.load_state_dict(load_file(str(weights)))
    return net
