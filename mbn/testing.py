"""Contract checks for domain plugins, to run in a plugin's own tests (``from mbn.testing import check_domain``).

:func:`check_domain` runs a domain's ``generate`` the way the trainer does (model in train mode, routed through
the domain's BN, a seeded generator) and checks what the trainer relies on: the output contract the trainer
checks on a domain's first batch (:func:`mbn.domain_checks.check_domain_output`: a pair of tensors, float images
in [0, 1] with the input's channels, size and device, targets that fit the head scoring the domain), then what it
cannot check cheaply: the input is not written in place, parameter gradients are untouched, the output is detached,
and two calls with equally seeded generators return equal batches. A breach raises :class:`DomainContractError`
with one line naming it.

This module imports nothing from pytest; ``import mbn`` does not import it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from mbn.convert import convert_model
from mbn.domain import Domain, DomainContext
from mbn.domain_checks import check_domain_output
from mbn.errors import DomainError
from mbn.heads import attach_heads
from mbn.objective import CLASSES, Objective
from mbn.registry import create_domain

__all__ = ["DomainContractError", "TinyNet", "check_domain", "default_context", "tiny_model"]


class DomainContractError(AssertionError):
    """A domain broke the plugin contract; the message names the domain and the breach in one line."""


class TinyNet(nn.Module):
    """conv, BN, ReLU, global pooling, linear classifier (``fc``): a model for plugin tests."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` of images ``(N, C, H, W)``."""
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def tiny_model(
    in_channels: int, num_classes: int, sources: tuple[str, ...], heads: dict[str, int] | None = None
) -> nn.Module:
    """A :class:`TinyNet` with one BN per source (:func:`mbn.convert_model`) and the auxiliary ``heads``.

    Examples:
        >>> import torch
        >>> tiny_model(3, 10, ("clean",))(torch.rand(2, 3, 8, 8)).shape
        torch.Size([2, 10])
    """
    net = TinyNet(in_channels, num_classes)
    attach_heads(net, dict(heads or {}))
    return convert_model(net, sources)


def _scoring_head(domain: Domain, num_classes: int) -> tuple[Objective, int]:
    """The domain's objective and the number of outputs of the head that scores it (K)."""
    objective = domain.objective(Objective())
    if objective.head == CLASSES:
        return objective, num_classes
    heads = domain.heads()
    if objective.head not in heads:
        raise DomainContractError(
            f"domain {domain.name!r}: scored by head {objective.head!r}, which heads() does not declare ({heads})"
        )
    return objective, int(heads[objective.head])


def default_context(
    domain: Domain, images: Tensor, *, num_classes: int = 10, seed: int = 0, bn: str | None = None
) -> DomainContext:
    """The context the trainer would give ``domain``, on a :func:`tiny_model` in train mode.

    The model has one BN source, ``bn`` (default: the domain's registered name, else ``"domain"``), the heads
    ``domain.heads()`` asks for, and lives on ``images``' device and floating dtype; the generator is a
    ``torch.Generator`` on that device seeded with ``seed``, and ``ctx.seed`` (the trainer's host-side seed) is
    ``seed`` too. ``ctx.reuse_gradient`` works (it returns the input gradient, accumulating nothing).
    """
    source = bn or (domain.name if domain.name.isidentifier() else "domain")
    objective, _ = _scoring_head(domain, num_classes)
    with torch.random.fork_rng(devices=[]):  # the model's initial weights, leaving the caller's CPU RNG as it was
        torch.manual_seed(seed)
        model = tiny_model(images.shape[1], num_classes, (source,), domain.heads())
    dtype = images.dtype if images.is_floating_point() else torch.float32
    model.to(device=images.device, dtype=dtype).train()

    def accumulate(loss: Tensor, x: Tensor, weight: float, bn_name: str) -> Tensor:
        return torch.autograd.grad(loss, x)[0]

    return DomainContext(
        model=model,
        bn=source,
        generator=torch.Generator(device=images.device).manual_seed(seed),
        seed=seed,
        num_classes=num_classes,
        objective=objective,
        accumulate=accumulate,
    )


def check_domain(
    domain: Domain | str,
    images: Tensor,
    labels: Tensor,
    ctx: DomainContext | None = None,
    *,
    num_classes: int | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Run ``domain.generate(images, labels, ctx)`` twice and check the plugin contract; returns the first output.

    Args:
        domain: a :class:`~mbn.Domain` instance, or a registered name (built with its default parameters).
        images: a float ``(N, C, H, W)`` batch in [0, 1] on the device to test.
        labels: its labels: int64 ``(N,)`` class indices (or ``(N, K)`` probabilities, as another domain's output).
        ctx: the context to run with; None builds :func:`default_context` (a tiny model, a seeded generator).
            A given context's generator state and model state are restored before the second call.
        num_classes: classes of the task (K); default: ``ctx.num_classes``, else the width of soft ``labels``,
            else 10 (more when a label is larger).
        seed: the seed of the default context's generator and model.

    Raises:
        DomainContractError: the first breach, one line naming the domain and what was expected.

    Examples:
        >>> import torch
        >>> from mbn.testing import check_domain
        >>> images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
        >>> out, targets = check_domain("gaussian_noise", images, labels)
        >>> out.shape, targets.tolist()
        (torch.Size([4, 3, 8, 8]), [0, 1, 2, 3])
    """
    if isinstance(domain, str):
        domain = create_domain(domain)
    name = domain.name or type(domain).__name__
    if not (isinstance(images, Tensor) and images.ndim == 4 and images.is_floating_point()):
        got = f"{type(images).__name__} of shape {tuple(getattr(images, 'shape', ()))}"
        raise ValueError(f"check_domain: images must be a float (N, C, H, W) tensor in [0, 1], got {got}")
    if not (isinstance(labels, Tensor) and labels.ndim in (1, 2) and labels.shape[0] == images.shape[0]):
        got = f"{type(labels).__name__} of shape {tuple(getattr(labels, 'shape', ()))}"
        raise ValueError(f"check_domain: labels must be an int64 (N,) or float (N, K) tensor, got {got}")
    if num_classes is None:
        num_classes = _default_classes(labels, ctx)
    if ctx is None:
        ctx = default_context(domain, images, num_classes=num_classes, seed=seed)
    _, num_targets = _scoring_head(domain, num_classes)

    def fail(problem: str) -> DomainContractError:
        return DomainContractError(f"domain {name!r}: {problem}")

    generator_state = ctx.generator.get_state() if ctx.generator is not None else None
    model_state = copy.deepcopy(ctx.model.state_dict())
    inputs = (images.clone(), labels.clone())
    versions = (images._version, labels._version)
    training = ctx.model.training
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in ctx.model.named_parameters()}

    first = _generate(domain, images, labels, ctx, fail)
    if images._version != versions[0] or not torch.equal(images, inputs[0]):
        raise fail("generate() wrote into its input images in place; return a new tensor (x = x + ..., x.clone())")
    if labels._version != versions[1] or not torch.equal(labels, inputs[1]):
        raise fail("generate() wrote into its input labels in place; return a new tensor")
    try:
        out_images, targets = check_domain_output(name, first, images, num_targets)
    except DomainError as err:
        raise DomainContractError(str(err)) from None
    if out_images.requires_grad or targets.requires_grad:
        raise fail("generate() returned tensors that require grad; detach() what you return")
    touched = [n for n, p in ctx.model.named_parameters() if not _same_grad(grads.get(n), p.grad)]
    if touched:
        raise fail(
            f"generate() wrote parameter gradients ({touched[0]}.grad); compute input gradients with "
            "torch.autograd.grad(loss, x), not loss.backward()"
        )
    if ctx.model.training != training:
        raise fail(f"generate() left the model in {'train' if ctx.model.training else 'eval'} mode")

    if ctx.generator is not None and generator_state is not None:
        ctx.generator.set_state(generator_state)
    ctx.model.load_state_dict(model_state)
    again = _generate(domain, images, labels, ctx, fail)
    same = (
        isinstance(again, (tuple, list))
        and len(again) == 2
        and all(isinstance(t, Tensor) for t in again)
        and again[0].shape == out_images.shape
        and again[1].shape == targets.shape
        and torch.equal(again[0], out_images)
        and torch.equal(again[1], targets)
    )
    if not same:
        raise fail(
            "two calls with equally seeded generators returned different batches; draw all randomness from "
            "ctx.generator (ctx.rand, ctx.randint, ...), not torch's global generator, and base any state the "
            "domain keeps across steps on ctx.step"
        )
    return out_images, targets


def _same_grad(before: Tensor | None, after: Tensor | None) -> bool:
    if before is None or after is None:
        return before is after
    return torch.equal(before, after)


def _default_classes(labels: Tensor, ctx: DomainContext | None) -> int:
    if ctx is not None:
        return ctx.num_classes
    if labels.is_floating_point() and labels.ndim == 2:
        return int(labels.shape[1])
    top = int(labels.max()) + 1 if labels.numel() and not labels.is_floating_point() else 0
    return max(10, top)


def _generate(domain: Domain, images: Tensor, labels: Tensor, ctx: DomainContext, fail: Any) -> Any:
    try:
        return domain.generate(images, labels, ctx)
    except DomainContractError:
        raise
    except Exception as err:
        raise fail(f"generate() raised {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
