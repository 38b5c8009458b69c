"""Gradient attacks in pixel space: PGD (L-inf / L2), FGSM and unsigned gradient descent.

Plain functions shared by the attack domains (:mod:`domains.pgd`) and robustness evaluation. ``model``
is any callable mapping ``(N, C, H, W)`` images in [0, 1] to logits (e.g. ``DomainContext.forward``);
``eps`` and ``step_size`` are in [0, 1] pixel units, as in torchattacks.

References:
    * PGD: Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018;
      update and L2 projection follow torchattacks' ``PGD`` / ``PGDL2`` (Kim, 2020).
    * FGSM: Goodfellow et al., ICLR 2015; with ``random_start`` it is the RS-FGSM of Wong et al.,
      "Fast is better than free", ICLR 2020 (uniform start in the ball, step ``1.25 * eps``).
    * GD and FGSM as alternative AdvProp attackers: Xie et al., CVPR 2020, §5.4 / Table 5.
    * Random wrong target class: Xie et al.'s ImageNet-Adversarial-Training ``PGDAttacker``.

Every result lies inside the ``eps`` ball around ``images`` and inside the [0, 1] box; L-inf results
satisfy ``(adv - images).abs() <= eps`` exactly in the input's dtype. Gradients are taken with
``torch.autograd.grad`` w.r.t. the input only, so parameter ``.grad`` fields are never touched.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.functional import cross_entropy

from mbn import rng
from mbn.validators import check_choice, check_int, check_number, check_probability, is_int

Model = Callable[[Tensor], Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
#: A further term the attack ascends, computed from the current adversarial images (e.g. a weighted
#: rotation-prediction loss of the rotated images, Hendrycks et al. 2019).
ExtraObjective = Callable[[Tensor], Tensor]
#: ``(ascended loss, adversarial images) -> d loss / d images``; the default is ``torch.autograd.grad`` on the
#: images only. The trainer's gradient reuse (Fast AdvProp) passes one that also keeps the parameter gradients.
InputGrad = Callable[[Tensor, Tensor], Tensor]
NORMS: tuple[str, ...] = ("linf", "l2")

# Guards the per-sample divisions by gradient / perturbation norms (torchattacks uses the same value).
_TINY = 1e-10


def pgd(
    model: Model,
    images: Tensor,
    labels: Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float,
    norm: str = "linf",
    random_start: bool | float = False,
    loss_fn: LossFn | None = None,
    targeted: bool = False,
    generator: torch.Generator | None = None,
    extra_objective: ExtraObjective | None = None,
    input_grad: InputGrad | None = None,
) -> Tensor:
    """Projected gradient ascent on the loss (Madry et al. 2018).

    L-inf steps move by ``step_size * sign(grad)``; L2 steps by ``step_size`` along the per-sample
    L2-normalised gradient. Each step is projected onto the ``eps`` ball and the [0, 1] box.

    Args:
        model: callable mapping images in [0, 1] to logits.
        images: clean images ``(N, C, H, W)`` in [0, 1]; their dtype is kept.
        labels: true labels ``(N,)``, or target labels when ``targeted``.
        eps: radius of the ball, in [0, 1] pixel units.
        steps: number of gradient steps (>= 1).
        step_size: step length, in [0, 1] pixel units.
        norm: ``"linf"`` or ``"l2"``.
        random_start: ``True``/``False``, or the per-sample probability of starting from a random
            point of the ball (uniform per pixel for L-inf; a Gaussian direction with radius
            ``U(0, 1) * eps`` for L2, as torchattacks) instead of the clean image.
        loss_fn: ``(logits, labels) -> scalar``; cross-entropy by default.
        targeted: ``labels`` are targets and the loss is minimised instead of maximised.
        generator: RNG for the random start.
        extra_objective: ``adv -> scalar`` added to the ascended objective (not negated when targeted).
        input_grad: how the gradient w.r.t. the images is taken (see :data:`InputGrad`); the attack uses only
            its direction, so a scaled gradient gives the same result.

    Returns:
        Detached adversarial images, same shape, dtype and device as ``images``.

    Raises:
        ValueError: on a negative ``eps`` / ``step_size``, ``steps < 1``, an unknown ``norm`` or a
            ``random_start`` outside [0, 1].
    """
    return _iterate(
        model,
        images,
        labels,
        eps=eps,
        steps=steps,
        step_size=step_size,
        norm=norm,
        random_start=random_start,
        loss_fn=loss_fn,
        targeted=targeted,
        generator=generator,
        extra_objective=extra_objective,
        input_grad=input_grad,
        signed=True,
    )


def fgsm(
    model: Model,
    images: Tensor,
    labels: Tensor,
    *,
    eps: float,
    random_start: bool | float = False,
    step_size: float | None = None,
    norm: str = "linf",
    loss_fn: LossFn | None = None,
    targeted: bool = False,
    generator: torch.Generator | None = None,
    extra_objective: ExtraObjective | None = None,
    input_grad: InputGrad | None = None,
) -> Tensor:
    """One projected gradient step: FGSM, or RS-FGSM ("Fast is better than free") with ``random_start``.

    Args:
        model: callable mapping images in [0, 1] to logits.
        images: clean images ``(N, C, H, W)`` in [0, 1].
        labels: true labels ``(N,)``, or target labels when ``targeted``.
        eps: radius of the ball, in [0, 1] pixel units.
        random_start: as in :func:`pgd`; Wong et al. 2020 use ``True``.
        step_size: defaults to ``eps``, or ``1.25 * eps`` when ``random_start`` is non-zero (Wong et al.).
        norm: ``"linf"`` (FGSM) or ``"l2"`` (fast gradient method with a normalised gradient).
        loss_fn: ``(logits, labels) -> scalar``; cross-entropy by default.
        targeted: ``labels`` are targets and the loss is minimised.
        generator: RNG for the random start.
        extra_objective: as in :func:`pgd`.
        input_grad: as in :func:`pgd`.

    Returns:
        Detached adversarial images inside the ``eps`` ball and the [0, 1] box.
    """
    check_number("eps", eps, low=0)
    probability = check_probability("random_start", random_start)
    if step_size is None:
        step_size = 1.25 * eps if probability > 0 else eps
    return _iterate(
        model,
        images,
        labels,
        eps=eps,
        steps=1,
        step_size=step_size,
        norm=norm,
        random_start=probability,
        loss_fn=loss_fn,
        targeted=targeted,
        generator=generator,
        extra_objective=extra_objective,
        input_grad=input_grad,
        signed=True,
    )


def gd(
    model: Model,
    images: Tensor,
    labels: Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float,
    norm: str = "linf",
    random_start: bool | float = False,
    loss_fn: LossFn | None = None,
    targeted: bool = False,
    generator: torch.Generator | None = None,
    extra_objective: ExtraObjective | None = None,
    input_grad: InputGrad | None = None,
) -> Tensor:
    """Projected gradient ascent along the raw gradient direction, without the sign.

    The gradient is L2-normalised per sample and scaled so that a step has the same L2 length as a
    signed step of the same ``step_size``: ``step_size * sqrt(C*H*W)`` for ``linf`` (a sign step's
    length; per-pixel RMS equals ``step_size``), ``step_size`` for ``l2`` (where it coincides with
    :func:`pgd`). Only the direction differs from PGD, which makes it the weaker, "GD" attacker of
    AdvProp §5.4. Arguments are those of :func:`pgd`.

    Returns:
        Detached adversarial images inside the ``eps`` ball and the [0, 1] box.
    """
    return _iterate(
        model,
        images,
        labels,
        eps=eps,
        steps=steps,
        step_size=step_size,
        norm=norm,
        random_start=random_start,
        loss_fn=loss_fn,
        targeted=targeted,
        generator=generator,
        extra_objective=extra_objective,
        input_grad=input_grad,
        signed=False,
    )


def random_wrong_labels(
    labels: Tensor, num_classes: int, generator: torch.Generator | None = None, *, check_labels: bool = True
) -> Tensor:
    """A target class drawn uniformly among the ``num_classes - 1`` wrong classes of each sample.

    The offset is drawn from ``1 .. num_classes - 1`` (never 0), as in Xie et al.'s
    ImageNet-Adversarial-Training attacker, so the target is never the true label.

    ``check_labels=False`` skips the label range check, which reads the labels on the host (a device
    synchronisation); the trainer's labels are checked once when the data is loaded.

    Raises:
        ValueError: if ``num_classes < 2`` or a label lies outside ``[0, num_classes)``.
    """
    if not is_int(num_classes, low=2):
        raise ValueError(f"num_classes must be an int >= 2 to draw a wrong class, got {num_classes!r}")
    if labels.is_floating_point():
        raise ValueError(f"labels must be class indices to draw a wrong class, got {labels.dtype} labels")
    if check_labels and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{int(labels.min())}, {int(labels.max())}]")
    offset = rng.randint(1, num_classes, labels.shape, generator=generator, device=labels.device)
    return (labels + offset) % num_classes


def _validate(eps: float, steps: int, step_size: float, norm: str, random_start: bool | float) -> float:
    """Check the shared attack arguments; return the random-start probability."""
    check_number("eps", eps, low=0)
    check_int("steps", steps, low=1)
    check_number("step_size", step_size, low=0)
    check_choice("norm", norm, NORMS)
    return check_probability("random_start", random_start)


def _rand(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None, *, normal: bool = False) -> Tensor:
    """Uniform [0, 1) (or standard normal) draws on the generator's device, moved to ``like``'s."""
    draw = rng.randn if normal else rng.rand
    return draw(shape, generator=generator, device=like.device, dtype=like.dtype)


@functools.lru_cache(maxsize=64)
def _radius(eps: float, dtype: torch.dtype) -> Tensor:
    """``eps`` in ``dtype`` (a CPU scalar, built once), rounded down so comparisons against the float hold too."""
    radius = torch.tensor(eps, dtype=torch.float64).to(dtype)
    if float(radius) > eps:
        radius = torch.nextafter(radius, torch.zeros_like(radius))
    return radius


def _per_sample_norm(x: Tensor) -> Tensor:
    """L2 norm of each sample, shaped ``(N, 1, ..., 1)`` for broadcasting."""
    return x.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (x.dim() - 1)))


def _project(adv: Tensor, images: Tensor, eps: float, norm: str) -> Tensor:
    """Project ``adv`` onto the ``eps`` ball around ``images`` intersected with the [0, 1] box."""
    if norm == "l2":
        delta = adv - images
        factor = torch.clamp(eps / (_per_sample_norm(delta) + _TINY), max=1.0)
        # Clamping to the box after the ball only moves pixels towards ``images``, so the norm can only shrink.
        return torch.clamp(images + delta * factor, 0.0, 1.0)
    radius = _radius(eps, images.dtype)
    low = torch.clamp(images - radius, min=0.0)
    high = torch.clamp(images + radius, max=1.0)
    adv = torch.clamp(adv, low, high)
    # images +/- eps is rounded, so adv - images can exceed eps by at most an ulp of adv; one step of those
    # pixels towards the clean value (which stays in the box) restores the ball exactly in this dtype (a
    # difference that is exactly <= eps cannot round above the representable eps). Two passes, no host check:
    # the attack never waits on the device.
    for _ in range(2):
        outside = (adv - images).abs() > radius
        adv = torch.where(outside, torch.nextafter(adv, images), adv)
    return adv


def _random_start(
    images: Tensor, eps: float, norm: str, probability: float, generator: torch.Generator | None
) -> Tensor:
    """Per sample, a random point of the ball with ``probability``, else the clean image."""
    if probability == 0.0 or eps == 0:
        return images.clone()
    if norm == "linf":
        delta = (2.0 * _rand(tuple(images.shape), images, generator) - 1.0) * eps
    else:
        direction = _rand(tuple(images.shape), images, generator, normal=True)
        radius = _rand((images.shape[0],), images, generator).view(-1, *([1] * (images.dim() - 1)))
        delta = direction / (_per_sample_norm(direction) + _TINY) * radius * eps
    if probability < 1.0:
        chosen = _rand((images.shape[0],), images, generator) < probability
        delta = delta * chosen.view(-1, *([1] * (images.dim() - 1))).to(delta.dtype)
    return _project(images + delta, images, eps, norm)


def _iterate(
    model: Model,
    images: Tensor,
    labels: Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float,
    norm: str,
    random_start: bool | float,
    loss_fn: LossFn | None,
    targeted: bool,
    generator: torch.Generator | None,
    signed: bool,
    extra_objective: ExtraObjective | None = None,
    input_grad: InputGrad | None = None,
) -> Tensor:
    """The projected-gradient loop shared by :func:`pgd`, :func:`fgsm` and :func:`gd`."""
    probability = _validate(eps, steps, step_size, norm, random_start)
    if not images.is_floating_point():
        raise ValueError(f"images must be a floating-point tensor in [0, 1], got dtype {images.dtype}")
    if labels.shape[:1] != images.shape[:1]:
        raise ValueError(f"labels must have one entry per image: {tuple(labels.shape)} vs {tuple(images.shape)}")
    loss_fn = cross_entropy if loss_fn is None else loss_fn
    images = images.detach()
    sign = -1.0 if targeted else 1.0
    # A signed step has L2 length step_size * sqrt(d); gd matches it for linf (see gd's docstring).
    unsigned_scale = step_size * math.sqrt(math.prod(images.shape[1:])) if norm == "linf" else step_size

    adv = _random_start(images, eps, norm, probability, generator)
    for _ in range(steps):
        adv.requires_grad_(True)
        with torch.enable_grad():
            loss = sign * loss_fn(model(adv), labels)
            if extra_objective is not None:  # always ascended, targeted or not
                loss = loss + extra_objective(adv)
            grad = torch.autograd.grad(loss, adv)[0] if input_grad is None else input_grad(loss, adv)
        adv = adv.detach()
        if signed and norm == "linf":
            adv = adv + step_size * grad.sign()
        else:
            unit = grad / (_per_sample_norm(grad) + _TINY)
            adv = adv + (step_size if signed else unsigned_scale) * unit
        adv = _project(adv, images, eps, norm)
    return adv.detach()
