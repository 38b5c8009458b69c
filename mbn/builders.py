"""Build a recipe's pieces: the device, the multi-source model with its heads, the domain plugins."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from omegaconf import DictConfig
from torch import nn

from mbn.config import DomainSpec, RecipeError
from mbn.convert import convert_model, has_batchnorm, no_batchnorm_message
from mbn.domain import Domain
from mbn.heads import attach_heads
from mbn.models import ModelConfigError, check_model_config, create_model
from mbn.registry import create_domain


def available_devices() -> list[str]:
    """The ``trainer.device`` values this build of torch can use here: auto, cpu, cuda and cuda:N, mps."""
    devices = ["auto", "cpu"]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count:
        devices += ["cuda", *(f"cuda:{i}" for i in range(count))]
    if _mps_available():
        devices.append("mps")
    return devices


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _offered() -> str:
    """:func:`available_devices` for a message; many GPUs as a range."""
    devices = available_devices()
    cuda = [d for d in devices if d.startswith("cuda:")]
    if len(cuda) > 2:
        devices = [d for d in devices if d not in cuda[1:-1]]
        devices[devices.index(cuda[-1])] = f"... {cuda[-1]}"
    return ", ".join(devices)


def resolve_device(name: str, source: str = "key 'trainer.device'") -> torch.device:
    """``auto`` picks CUDA when available; a device this build cannot use is a RecipeError naming ``source``.

    Accepted: ``auto``, ``cpu``, ``cuda`` and ``cuda:N`` for each visible GPU where torch has CUDA, ``mps`` where
    torch has MPS. Anything else (``gpu``, ``cuda:7`` on a machine with one GPU, ``xpu``, ``meta``) is refused
    here, before a model or a process group is built, in one line listing what this build offers.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shown = repr(name) if len(str(name)) <= 80 else repr(str(name)[:79] + "\u2026")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        device = None
    why = None
    if device is None:
        why = "not a device name"
    elif device.type == "cpu":
        why = None if device.index in (None, 0) else "the cpu device takes no index"
    elif device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if torch.version.cuda is None and torch.version.hip is None:
            why = "this build of torch has no CUDA"
        elif not count:
            why = "no CUDA GPU is visible (CUDA_VISIBLE_DEVICES, the driver?)"
        elif device.index is not None and device.index >= count:
            why = f"{count} CUDA GPU{'s are' if count > 1 else ' is'} visible"
    elif device.type == "mps":
        why = None if _mps_available() else "MPS is not available"
    else:
        why = f"mbn does not train on {device.type} devices"
    if why is not None or device is None:
        raise RecipeError(f"{source}: {shown} cannot be used here: {why}; this build offers {_offered()}")
    return device


def check_model(cfg: DictConfig) -> None:
    """The ``model`` section names a network mbn can build (nothing is built or downloaded)."""
    try:
        check_model_config(cfg.model)
    except ModelConfigError as err:
        raise RecipeError(f"key 'model.{err.field}': {err}") from None


def build_model(
    cfg: DictConfig,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    sources: Sequence[str],
    heads: Mapping[str, int] | None = None,
) -> nn.Module:
    """The recipe's network with its auxiliary ``heads`` and one BN per source (the domains' ``bn`` values)."""
    try:
        model = create_model(cfg.model, num_classes, mean, std)
    except ModelConfigError as err:
        raise RecipeError(f"key 'model.{err.field}': {err}") from None
    attach_heads(model, dict(heads or {}))
    if not has_batchnorm(model):
        raise RecipeError(f"key 'model.name': {cfg.model.name}: {no_batchnorm_message(model)}")
    try:
        return convert_model(model, sources, share_affine=cfg.model.share_affine, share_stats=cfg.model.share_stats)
    except ValueError as err:  # the sources are the domains' bn values
        raise RecipeError(f"key 'domains': BN sources {list(sources)}: {err}") from None


def build_domains(specs: Sequence[DomainSpec]) -> dict[str, Domain]:
    """Instantiate each domain from its recipe entry; errors name the ``domains.<name>`` key."""
    domains = {}
    for spec in specs:
        try:
            domains[spec.name] = create_domain(spec.type, **spec.params)
        except KeyError as err:
            raise RecipeError(f"key 'domains.{spec.name}.type': {err.args[0]}") from None
        except (ValueError, TypeError) as err:
            raise RecipeError(f"key 'domains.{spec.name}': {err}") from None
    return domains
