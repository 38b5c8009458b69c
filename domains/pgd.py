"""Adversarial domains ``pgd``, ``fgsm`` and ``gd``: AdvProp's on-the-fly adversarial source.

Each domain attacks the current model *through its own BatchNorm* (``ctx.forward``), which is the
point of AdvProp (Xie et al., CVPR 2020, §4): adversarial examples are generated with, and trained
through, the auxiliary BN. The attacks are :mod:`mbn.attacks`.

Recipe parameters are in 0-255 pixel units as the paper writes them (``eps: 4, steps: 5,
step_size: 1`` is AdvProp's PGD5); they are divided by 255 before attacking [0, 1] images, for
``norm: l2`` too (an L2 ``eps`` of 255 is torchattacks' ``eps=1.0``). Defaults, and the reference each
follows, are listed in ``docs/domains.md``. The returned labels are always the true labels, also
for targeted attacks (the classifier is trained on the true class).
"""

from __future__ import annotations

import abc
import math

from torch import Tensor

from mbn import attacks
from mbn.domain import ATTACK_BN_MODES, Domain, DomainContext
from mbn.registry import register_domain

PIXEL_SCALE = 255.0


def _check_number(name: str, value: object, *, allow_zero: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (not allow_zero and value == 0):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a number {bound} in 0-255 pixel units, got {value!r}")
    return float(value)


class _AttackDomain(Domain):
    """Shared validation and the attack call; subclasses pick the attack and its defaults."""

    uses_model = True

    def _set_common(self, eps: float, norm: str, attack_bn: str, targeted: bool, random_start: bool | float) -> None:
        self.eps = _check_number("eps", eps)
        if norm not in attacks.NORMS:
            raise ValueError(f"norm must be one of {list(attacks.NORMS)}, got {norm!r}")
        if attack_bn not in ATTACK_BN_MODES:
            raise ValueError(f"attack_bn must be one of {list(ATTACK_BN_MODES)}, got {attack_bn!r}")
        if not isinstance(targeted, bool):
            raise ValueError(f"targeted must be true or false, got {targeted!r}")
        if not (
            isinstance(random_start, bool) or (isinstance(random_start, (int, float)) and 0.0 <= random_start <= 1.0)
        ):
            raise ValueError(f"random_start must be a bool or a probability in [0, 1], got {random_start!r}")
        self.norm = norm
        self.attack_bn = attack_bn
        self.targeted = targeted
        self.random_start = float(random_start)

    @abc.abstractmethod
    def _attack(self, images: Tensor, labels: Tensor, ctx: DomainContext) -> Tensor:
        """Run the attack on ``labels`` (true or target) through ``ctx.forward``."""

    def generate(self, images: Tensor, labels: Tensor, ctx: DomainContext) -> tuple[Tensor, Tensor]:
        """Attack ``images`` through ``ctx``'s BN in the ``attack_bn`` mode; return ``(adv, true labels)``."""
        goal = attacks.random_wrong_labels(labels, ctx.num_classes, ctx.generator) if self.targeted else labels
        with ctx.attack_mode(self.attack_bn):
            adv = self._attack(images, goal, ctx)
        return adv.detach(), labels


@register_domain("pgd")
class PGDDomain(_AttackDomain):
    """PGD adversarial examples (Madry et al. 2018), AdvProp's default attacker (§5.1).

    Args:
        eps: perturbation budget in 0-255 pixel units (AdvProp: 1..4).
        steps: attack iterations (AdvProp: ``eps + 1``, 1 for ``eps = 1``).
        step_size: step in 0-255 pixel units (AdvProp: 1).
        norm: ``"linf"`` (AdvProp) or ``"l2"``.
        attack_bn: BN mode of the attack forwards: ``"eval"`` (running statistics; Xie et al.'s
            ImageNet-Adversarial-Training), ``"train"`` (batch statistics, running statistics
            untouched; Fast AdvProp) or ``"train_update"`` (batch statistics, running ones updated).
        targeted: attack towards a uniformly drawn wrong class (Xie et al.'s attacker) instead of
            away from the true class.
        random_start: per-sample probability of starting from a random point of the ball rather than
            the clean image (0.8 in Xie et al.'s training attacker).
    """

    def __init__(
        self,
        eps: float = 4,
        steps: int = 5,
        step_size: float = 1,
        norm: str = "linf",
        attack_bn: str = "eval",
        targeted: bool = True,
        random_start: bool | float = 0.8,
    ) -> None:
        self._set_common(eps, norm, attack_bn, targeted, random_start)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        self.steps = steps
        self.step_size = _check_number("step_size", step_size)

    #: The attack function; ``gd`` swaps it for the unsigned-gradient variant.
    attack = staticmethod(attacks.pgd)

    def _attack(self, images: Tensor, labels: Tensor, ctx: DomainContext) -> Tensor:
        return self.attack(
            ctx.forward,
            images,
            labels,
            eps=self.eps / PIXEL_SCALE,
            steps=self.steps,
            step_size=self.step_size / PIXEL_SCALE,
            norm=self.norm,
            random_start=self.random_start,
            loss_fn=ctx.loss,
            targeted=self.targeted,
            generator=ctx.generator,
        )


@register_domain("gd")
class GDDomain(PGDDomain):
    """Projected steps along the unsigned, normalised gradient (AdvProp §5.4's "GD" attacker).

    Parameters and defaults are those of ``pgd``; see :func:`mbn.attacks.gd` for the step length.
    """

    attack = staticmethod(attacks.gd)


@register_domain("fgsm")
class FGSMDomain(_AttackDomain):
    """Single-step FGSM (Goodfellow et al. 2015), or RS-FGSM (Wong et al. 2020) with ``random_start``.

    Args:
        eps: perturbation budget in 0-255 pixel units.
        step_size: step in 0-255 pixel units; ``None`` means ``eps``, or ``1.25 * eps`` when
            ``random_start`` is non-zero ("Fast is better than free").
        norm: ``"linf"`` or ``"l2"``.
        attack_bn: as for ``pgd``.
        targeted: as for ``pgd``; off by default (plain FGSM).
        random_start: as for ``pgd``; 0 by default (plain FGSM), 1 for RS-FGSM.
    """

    def __init__(
        self,
        eps: float = 4,
        step_size: float | None = None,
        norm: str = "linf",
        attack_bn: str = "eval",
        targeted: bool = False,
        random_start: bool | float = 0.0,
    ) -> None:
        self._set_common(eps, norm, attack_bn, targeted, random_start)
        self.step_size = None if step_size is None else _check_number("step_size", step_size)

    def _attack(self, images: Tensor, labels: Tensor, ctx: DomainContext) -> Tensor:
        return attacks.fgsm(
            ctx.forward,
            images,
            labels,
            eps=self.eps / PIXEL_SCALE,
            random_start=self.random_start,
            step_size=None if self.step_size is None else self.step_size / PIXEL_SCALE,
            norm=self.norm,
            loss_fn=ctx.loss,
            targeted=self.targeted,
            generator=ctx.generator,
        )
