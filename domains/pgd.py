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
from collections.abc import Callable
from typing import Any

from mbn_domains.rotation import NUM_ROTATIONS, ROTATION_HEAD, draw_rotations, rotate_quarters
from torch import Tensor

from mbn import attacks
from mbn.domain import ATTACK_BN_MODES, Domain, DomainContext
from mbn.objective import Objective
from mbn.registry import register_domain
from mbn.validators import check_bool, check_choice, check_int, check_number, check_probability

PIXEL_SCALE = 255.0
_PIXELS = "in 0-255 pixel units"


class _AttackDomain(Domain):
    """Shared validation and the attack call; subclasses pick the attack and its defaults."""

    def _set_common(
        self,
        eps: float,
        norm: str,
        attack_bn: str,
        targeted: bool,
        random_start: bool | float,
        rotation_weight: float,
        reuse_grad: float = 0.0,
    ) -> None:
        self.eps = check_number("eps", eps, low=0, unit=_PIXELS)
        self.norm = check_choice("norm", norm, attacks.NORMS)
        self.attack_bn = check_choice("attack_bn", attack_bn, ATTACK_BN_MODES)
        self.targeted = check_bool("targeted", targeted)
        self.random_start = check_probability("random_start", random_start)
        self.rotation_weight = check_number("rotation_weight", rotation_weight, low=0)
        self.reuse_grad = check_number("reuse_grad", reuse_grad, low=0)
        if self.reuse_grad > 0 and self.targeted:
            raise ValueError(
                "reuse_grad needs targeted=false: a targeted attack's gradient trains towards a wrong class"
            )

    #: attack iterations; each is one forward-backward (two with ``rotation_weight``: the rotated images too)
    steps: int = 1

    def generation_cost(self) -> float:
        """One forward-backward per attack step (two with the rotation objective)."""
        return float(self.steps) * (2.0 if self.rotation_weight > 0 else 1.0)

    def heads(self) -> dict[str, int]:
        """The ``rotation`` head when the attack also ascends the rotation loss."""
        return {ROTATION_HEAD: NUM_ROTATIONS} if self.rotation_weight > 0 else {}

    @abc.abstractmethod
    def _attack(self, images: Tensor, labels: Tensor, ctx: DomainContext, **extra: Any) -> Tensor:
        """Run the attack on ``labels`` (true or target) through ``ctx.forward``."""

    def _rotation_objective(self, images: Tensor, ctx: DomainContext) -> Callable[[Tensor], Tensor]:
        """``adv -> rotation_weight * CE(rotation head(rotate(adv, k)), k)``, ``k`` drawn once per attack."""
        k = draw_rotations(images.shape[0], ctx.generator, images.device)
        rotation = Objective(head=ROTATION_HEAD)

        def objective(adv: Tensor) -> Tensor:
            logits = ctx.forward_heads(rotate_quarters(adv, k), (ROTATION_HEAD,))[ROTATION_HEAD]
            return self.rotation_weight * rotation.loss(logits, k)

        return objective

    def generate(self, images: Tensor, labels: Tensor, ctx: DomainContext) -> tuple[Tensor, Tensor]:
        """Attack ``images`` through ``ctx``'s BN in the ``attack_bn`` mode; return ``(adv, true labels)``."""
        if self.targeted:  # soft targets (after mixup/CutMix): a wrong class of each sample's dominant class
            hard = labels.argmax(1) if labels.is_floating_point() else labels
            goal = attacks.random_wrong_labels(hard, ctx.num_classes, ctx.generator, check_labels=False)
        else:
            goal = labels
        extra = self._rotation_objective(images, ctx) if self.rotation_weight > 0 else None
        reuse = ctx.reuse_gradient(self.reuse_grad) if self.reuse_grad > 0 else None
        with ctx.attack_mode(self.attack_bn):
            adv = self._attack(images, goal, ctx, extra_objective=extra, input_grad=reuse)
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
            untouched) or ``"train_update"`` (batch statistics, running ones updated; Fast AdvProp).
        targeted: attack towards a uniformly drawn wrong class (Xie et al.'s attacker) instead of
            away from the true class.
        random_start: per-sample probability of starting from a random point of the ball rather than
            the clean image (0.8 in Xie et al.'s training attacker).
        rotation_weight: also ascend this weight times the rotation-prediction loss of the perturbed
            images, each rotated by a random multiple of 90 degrees (Hendrycks et al. 2019; the
            strongest variant of Kucer et al. 2021). 0 (default) is the plain attack, bit for bit.
        reuse_grad: add this weight times each attack step's parameter gradients to the step's update
            (Fast AdvProp's gradient reuse, "free" adversarial training; needs ``targeted=false``). 0: off.
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
        rotation_weight: float = 0.0,
        reuse_grad: float = 0.0,
    ) -> None:
        self._set_common(eps, norm, attack_bn, targeted, random_start, rotation_weight, reuse_grad)
        self.steps = check_int("steps", steps, low=1)
        self.step_size = check_number("step_size", step_size, low=0, unit=_PIXELS)

    #: The attack function; ``gd`` swaps it for the unsigned-gradient variant.
    attack = staticmethod(attacks.pgd)

    def _attack(self, images: Tensor, labels: Tensor, ctx: DomainContext, **extra: Any) -> Tensor:
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
            **extra,
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
        rotation_weight: as for ``pgd``.
        reuse_grad: as for ``pgd``.
    """

    def __init__(
        self,
        eps: float = 4,
        step_size: float | None = None,
        norm: str = "linf",
        attack_bn: str = "eval",
        targeted: bool = False,
        random_start: bool | float = 0.0,
        rotation_weight: float = 0.0,
        reuse_grad: float = 0.0,
    ) -> None:
        self._set_common(eps, norm, attack_bn, targeted, random_start, rotation_weight, reuse_grad)
        self.step_size = None if step_size is None else check_number("step_size", step_size, low=0, unit=_PIXELS)

    def _attack(self, images: Tensor, labels: Tensor, ctx: DomainContext, **extra: Any) -> Tensor:
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
            **extra,
        )
