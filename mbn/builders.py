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


def resolve_device(name: str, source: str = "key 'trainer.device'") -> torch.device:
    """``auto`` picks CUDA when available; an unavailable device is a RecipeError naming ``source``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RecipeError(f"{source}: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"{source}: {name!r} requested but CUDA is not available")
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
