"""Policy augmentation domains ``autoaugment``, ``randaugment`` and ``trivialaugment``, batched on device.

AutoAugment (Cubuk et al., CVPR 2019) with the paper's ImageNet, CIFAR-10 and SVHN policies (the tables
are kornia 0.9's, identical to torchvision's), RandAugment (Cubuk et al., CVPRW 2020) and TrivialAugment
(Müller & Hutter, ICCV 2021). Every image draws its own sub-policy / operations / signs / magnitudes
from ``ctx.generator``; the batch is then grouped by operation so each operation runs once per step
on all the images that drew it, with kornia's and torchvision's batched tensor ops.

Why not call ``kornia.augmentation.auto.AutoAugment`` directly (read in kornia 0.9's
``augmentation/auto/``): it draws ONE sub-policy per call for the whole batch; it samples on the
global RNG (on the CPU until the module is moved); and its magnitude scale is not the paper's:
a bin indexes a signed range (``rotate`` bin 2 is always -18..-12 degrees instead of +-6), shear
0.3 becomes ``0.3 * 180 = 54`` degrees instead of the factor ``x' = x + 0.3 y`` (atan 0.3 = 16.7
degrees), ``solarize``/``posterize`` get weaker as the bin grows, ``brightness`` is additive and
``contrast`` a plain multiplication. The magnitudes here follow the released AutoAugment code
(``augmentation_transforms.py``, PARAMETER_MAX = 10) and, for RandAugment/TrivialAugment,
torchvision's ``RandAugment``/``TrivialAugmentWide``; ``docs/domains.md`` lists them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import kornia.enhance as KE
import kornia.geometry.transform as KT
import torch
import torchvision.transforms.v2.functional as TF
from kornia.augmentation.auto.autoaugment.autoaugment import cifar10_policy, imagenet_policy, svhn_policy
from torch import Tensor

from mbn import rng
from mbn.domain import Domain, DomainContext
from mbn.registry import register_domain
from mbn.validators import check_bool, check_int, check_number, is_number

__all__ = [
    "AUTOAUGMENT_POLICIES",
    "OPS",
    "AutoAugmentDomain",
    "OpDraw",
    "RandAugmentDomain",
    "TrivialAugmentDomain",
]

#: The paper's searched policies: sub-policies of ``(op, probability, level 0-9 or None)``.
AUTOAUGMENT_POLICIES: dict[str, list[list[tuple[str, float, float | None]]]] = {
    "imagenet": imagenet_policy,
    "cifar10": cifar10_policy,
    "svhn": svhn_policy,
}

#: Translation at level 10 as a fraction of the image side: the released CIFAR/SVHN code shifts
#: ``level`` pixels of 32 (10/32 at level 10); the paper's ImageNet range is 150 px of 331.
_AA_TRANSLATE = {"imagenet": 150.0 / 331.0, "cifar10": 10.0 / 32.0, "svhn": 10.0 / 32.0}

INTERPOLATIONS = ("nearest", "bilinear")
Op = Callable[[Tensor, Tensor, str], Tensor]


def _col(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


def _affine(x: Tensor, entry: tuple[int, int], value: Tensor, mode: str) -> Tensor:
    """Warp by the identity with ``matrix[entry] = value``; source->destination pixel matrix, zero fill.

    A shear entry also gets the shift that puts its origin on the image's top-left corner, half a
    pixel before the first pixel centre (PIL's ``Image.transform`` samples at pixel centres).
    """
    m = torch.zeros(x.shape[0], 2, 3, device=x.device, dtype=x.dtype)
    m[:, 0, 0] = 1.0
    m[:, 1, 1] = 1.0
    value = value.to(x.dtype)
    m[:, entry[0], entry[1]] = value
    if entry[1] != 2:
        m[:, entry[0], 2] = 0.5 * value
    return KT.affine(x, m, mode=mode, padding_mode="zeros", align_corners=True)


# Geometric ops use PIL's convention as the original code does: output(x, y) = input(A(x, y)) with
# the origin at the top-left corner, so the destination matrix carries the negated value: shear_x
# by s moves row y by -s * y pixels (a shear factor, atan(0.3) = 16.7 degrees at most, not degrees).
def _shear_x(x: Tensor, v: Tensor, mode: str) -> Tensor:
    return _affine(x, (0, 1), -v, mode)


def _shear_y(x: Tensor, v: Tensor, mode: str) -> Tensor:
    return _affine(x, (1, 0), -v, mode)


def _translate_x(x: Tensor, v: Tensor, mode: str) -> Tensor:
    return _affine(x, (0, 2), -v, mode)


def _translate_y(x: Tensor, v: Tensor, mode: str) -> Tensor:
    return _affine(x, (1, 2), -v, mode)


def _rotate(x: Tensor, v: Tensor, mode: str) -> Tensor:
    return KT.rotate(x, v.to(x.dtype), mode=mode, padding_mode="zeros", align_corners=True)


def _color(x: Tensor, v: Tensor, mode: str) -> Tensor:
    # PIL's Color blends with the grayscale image; a single-channel image has no colour to change.
    return KE.adjust_saturation_with_gray_subtraction(x, v.to(x.dtype)) if x.shape[1] == 3 else x


#: Batched ops ``(images, per-image value, interpolation) -> images`` with PIL ``ImageOps``/``ImageEnhance``
#: semantics, the reference the policies were searched with.
OPS: dict[str, Op] = {
    "identity": lambda x, v, mode: x,
    "shear_x": _shear_x,
    "shear_y": _shear_y,
    "translate_x": _translate_x,
    "translate_y": _translate_y,
    "rotate": _rotate,
    "auto_contrast": lambda x, v, mode: TF.autocontrast(x),
    "equalize": lambda x, v, mode: KE.equalize(x),
    "invert": lambda x, v, mode: 1.0 - x,
    "posterize": lambda x, v, mode: KE.posterize(x, v.long()),
    "solarize": lambda x, v, mode: KE.solarize(x, v.to(x.dtype)),
    "color": _color,
    "contrast": lambda x, v, mode: KE.adjust_contrast_with_mean_subtraction(x, v.to(x.dtype)),
    "brightness": lambda x, v, mode: (x * _col(v.to(x.dtype))).clamp(0.0, 1.0),  # PIL: blend with black
    "sharpness": lambda x, v, mode: KE.sharpness(x, v.to(x.dtype)),
}
_SIGNED = frozenset({"shear_x", "shear_y", "translate_x", "translate_y", "rotate"})
_ENHANCE = frozenset({"color", "contrast", "brightness", "sharpness"})
_NO_MAGNITUDE = frozenset({"identity", "auto_contrast", "equalize", "invert"})
#: RandAugment's and TrivialAugment's operation set (torchvision's, after the papers).
_RA_OPS = (
    "identity",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "rotate",
    "brightness",
    "color",
    "contrast",
    "sharpness",
    "posterize",
    "solarize",
    "auto_contrast",
    "equalize",
)


@dataclass(frozen=True)
class _Space:
    """Value of each op at strength ``f`` in [0, 1] (the level over its maximum).

    Attributes:
        shear: shear factor at ``f = 1``.
        translate: translation at ``f = 1``: fraction of the image side, or pixels if not ``translate_relative``.
        translate_relative: whether ``translate`` scales with the image size.
        rotate: degrees at ``f = 1``.
        enhance: enhancement span; factor ``1 +- enhance * f`` if ``enhance_signed`` else ``0.1 + enhance * f``.
        enhance_signed: torchvision's signed factor around 1 vs the original code's unsigned 0.1..1.9.
        posterize: bits removed from 8 at ``f = 1``.
        posterize_floor: truncate the removed bits (original code's ``int``) instead of rounding (torchvision).
    """

    shear: float
    translate: float
    translate_relative: bool
    rotate: float
    enhance: float
    enhance_signed: bool
    posterize: float
    posterize_floor: bool

    def value(self, name: str, f: Tensor, sign: Tensor, height: int, width: int) -> Tensor:
        """Per-image value of op ``name`` (signed ops take ``sign``)."""
        if name in ("shear_x", "shear_y"):
            return sign * self.shear * f
        if name in ("translate_x", "translate_y"):
            side = (width if name == "translate_x" else height) if self.translate_relative else 1.0
            return sign * self.translate * side * f
        if name == "rotate":
            return sign * self.rotate * f
        if name in _ENHANCE:
            return 1.0 + sign * self.enhance * f if self.enhance_signed else 0.1 + self.enhance * f
        if name == "posterize":
            removed = self.posterize * f
            return 8.0 - (torch.floor(removed + 1e-6) if self.posterize_floor else torch.round(removed))
        if name == "solarize":
            return 1.0 - f  # threshold: pixels >= it are inverted, so a larger level inverts more
        return f


def _aa_space(translate: float) -> _Space:
    # Released AutoAugment code: float_parameter(level, max) = level * max / 10, unsigned enhance
    # factor 0.1 + 1.8 * level / 10, posterize to 8 - int(4 * level / 10) bits (the "fixed" variant;
    # the paper's table gives 4..8 bits), solarize threshold 256 - 25.6 * level.
    return _Space(0.3, translate, True, 30.0, 1.8, False, 4.0, True)


_RA_SPACE = _Space(0.3, 150.0 / 331.0, True, 30.0, 0.9, True, 4.0, False)  # torchvision RandAugment
_TA_WIDE_SPACE = _Space(0.99, 32.0, False, 135.0, 0.99, True, 6.0, False)  # torchvision TrivialAugmentWide


@dataclass
class OpDraw:
    """One batch's random draw: ``ops[i, s]`` is the op index run on image ``i`` at step ``s`` (-1: none).

    Attributes:
        ops: ``(N, S)`` indices into the domain's ``op_names``; -1 where the step is skipped.
        strength: ``(N, S)`` magnitude as a fraction of the op's maximum.
        sign: ``(N, S)`` +-1, used by the signed ops.
        subpolicy: ``(N,)`` AutoAugment sub-policy index per image (None for the other domains).
    """

    ops: Tensor
    strength: Tensor
    sign: Tensor
    subpolicy: Tensor | None = None


def _check_interpolation(interpolation: str) -> str:
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {list(INTERPOLATIONS)}, got {interpolation!r}")
    return interpolation


def _check_images(images: Tensor) -> None:
    if not (isinstance(images, Tensor) and images.dim() == 4 and images.is_floating_point()):
        got = f"{images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, Tensor) else type(images)
        raise ValueError(f"images must be a float (N, C, H, W) tensor in [0, 1], got {got}")


class _PolicyDomain(Domain):
    """Shared engine: draw per-image ops, then run each op once per step on the images that drew it."""

    op_names: tuple[str, ...] = ()
    _space: _Space
    interpolation: str = "nearest"

    def sample(self, n: int, generator: torch.Generator | None, device: torch.device) -> OpDraw:
        """Draw the ops of ``n`` images from ``generator``; tensors land on ``device``."""
        raise NotImplementedError

    def apply(self, images: Tensor, draw: OpDraw) -> Tensor:
        """Run ``draw`` on ``images`` (float NCHW in [0, 1]); returns a new tensor."""
        work = images.float() if images.dtype in (torch.float16, torch.bfloat16) else images
        out = work.clone()
        height, width = images.shape[-2:]
        for step in range(draw.ops.shape[1]):
            ids = draw.ops[:, step]
            for k in torch.unique(ids).tolist():
                name = self.op_names[k] if k >= 0 else "identity"
                if name == "identity":
                    continue
                idx = (ids == k).nonzero().squeeze(1)
                value = self._space.value(name, draw.strength[idx, step], draw.sign[idx, step], height, width)
                out.index_copy_(0, idx, OPS[name](out.index_select(0, idx), value, self.interpolation))
        return out.clamp_(0.0, 1.0).to(images.dtype)

    def generate(self, images: Tensor, labels: Tensor, ctx: DomainContext) -> tuple[Tensor, Tensor]:
        """Augment every image with its own draw from ``ctx.generator``; labels are returned unchanged."""
        _check_images(images)
        with torch.no_grad():
            draw = self.sample(images.shape[0], ctx.generator, images.device)
            return self.apply(images.detach(), draw), labels


def _parse_policy(policy: Any) -> list[list[tuple[str, float, float | None]]]:
    """Validate a custom policy: a list of sub-policies, each a list of ``(op, probability, level)``."""
    expected = "a list of sub-policies, each a list of (op, probability, level 0-10 or null)"
    if isinstance(policy, (str, bytes)) or not isinstance(policy, Sequence) or len(policy) == 0:
        raise ValueError(f"policy must be one of {list(AUTOAUGMENT_POLICIES)} or {expected}, got {policy!r}")
    parsed = []
    for sub in policy:
        if isinstance(sub, (str, bytes)) or not isinstance(sub, Sequence) or len(sub) == 0:
            raise ValueError(f"policy: expected {expected}; bad sub-policy {sub!r}")
        ops = []
        for entry in sub:
            if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence) or len(entry) != 3:
                raise ValueError(f"policy: expected (op, probability, level) entries, got {entry!r}")
            name, prob, level = entry
            if name not in OPS:
                raise ValueError(f"policy: unknown op {name!r}; expected one of {sorted(OPS)}")
            if not is_number(prob, low=0, high=1):
                raise ValueError(f"policy: probability of {name!r} must be in [0, 1], got {prob!r}")
            needs_level = name not in _NO_MAGNITUDE
            if needs_level and not is_number(level, low=0, high=10):
                raise ValueError(f"policy: level of {name!r} must be a number in [0, 10], got {level!r}")
            ops.append((str(name), float(prob), float(level) if needs_level else None))
        parsed.append(ops)
    return parsed


@register_domain("autoaugment")
class AutoAugmentDomain(_PolicyDomain):
    """AutoAugment (Cubuk et al. 2019) with a sub-policy drawn per image, as in the paper.

    Each image draws one sub-policy uniformly; each of its operations is applied with its probability,
    at its level's magnitude (``level / 10`` of the op's maximum, the released code's scale), and the
    geometric ones with a random sign.

    Args:
        policy: ``"cifar10"`` (default; the recipes train CIFAR), ``"imagenet"``, ``"svhn"``, or a custom
            list of sub-policies ``[[(op, probability, level), ...], ...]`` with ops from :data:`OPS` and
            levels in [0, 10] (null for ops without a magnitude).
        translate: translation at level 10 as a fraction of the image side; default per policy:
            10/32 for cifar10/svhn (the released code's 10 px of 32), 150/331 for imagenet (paper).
        interpolation: ``"nearest"`` (PIL's default, as the original) or ``"bilinear"``.

    Examples:
        >>> import torch, mbn
        >>> from mbn.domain import DomainContext
        >>> aug = mbn.create_domain("autoaugment", policy="cifar10")
        >>> gen = torch.Generator().manual_seed(0)
        >>> ctx = DomainContext(model=torch.nn.Linear(1, 1), bn="autoaugment", generator=gen)
        >>> aug.generate(torch.rand(4, 3, 32, 32), torch.zeros(4, dtype=torch.long), ctx)[0].shape
        torch.Size([4, 3, 32, 32])
    """

    op_names = tuple(OPS)

    def __init__(
        self,
        policy: str | Sequence[Sequence[tuple[str, float, float | None]]] = "cifar10",
        translate: float | None = None,
        interpolation: str = "nearest",
    ) -> None:
        if isinstance(policy, str):
            if policy not in AUTOAUGMENT_POLICIES:
                raise ValueError(f"policy must be one of {list(AUTOAUGMENT_POLICIES)} or a custom list, got {policy!r}")
            table = _parse_policy(AUTOAUGMENT_POLICIES[policy])
            default_translate = _AA_TRANSLATE[policy]
        else:
            table = _parse_policy(policy)
            default_translate = _AA_TRANSLATE["imagenet"]
        if translate is None:
            translate = default_translate
        self.translate = check_number("translate", translate, low=0, high=1, unit="(a fraction of the image side)")
        self.policy = policy if isinstance(policy, str) else table
        self.interpolation = _check_interpolation(interpolation)
        self._space = _aa_space(self.translate)
        steps = max(len(sub) for sub in table)
        index = {name: i for i, name in enumerate(self.op_names)}
        # Padded (sub-policy, step) tables; a missing step has probability 0.
        self._ops = torch.full((len(table), steps), -1, dtype=torch.long)
        self._prob = torch.zeros(len(table), steps)
        self._level = torch.zeros(len(table), steps)
        for p, sub in enumerate(table):
            for s, (name, prob, level) in enumerate(sub):
                self._ops[p, s] = index[name]
                self._prob[p, s] = prob
                self._level[p, s] = level or 0.0

    @property
    def num_subpolicies(self) -> int:
        """Number of sub-policies in the policy."""
        return self._ops.shape[0]

    def sample(self, n: int, generator: torch.Generator | None, device: torch.device) -> OpDraw:
        """Draw a sub-policy per image, then per step whether it fires and its sign."""
        # drawn on the generator's device (else the images'), then read on the host to index the policy tables
        sub = rng.randint(0, self.num_subpolicies, (n,), generator=generator, device=device).cpu()
        steps = self._ops.shape[1]
        fires = rng.rand((n, steps), generator=generator, device=device).cpu() < self._prob[sub]
        sign = rng.randint(0, 2, (n, steps), generator=generator, device=device).cpu() * 2.0 - 1.0
        ops = torch.where(fires, self._ops[sub], torch.full_like(self._ops[sub], -1))
        return OpDraw(ops.to(device), (self._level[sub] / 10.0).to(device), sign.to(device), sub.to(device))


@register_domain("randaugment")
class RandAugmentDomain(_PolicyDomain):
    """RandAugment (Cubuk et al. 2020): ``n`` ops per image, drawn uniformly with replacement, magnitude ``m``.

    Op set and magnitude scale are torchvision's ``RandAugment`` (identity, shear 0.3, translate 150/331 of
    the side, rotate 30 degrees, enhance factor 1 +- 0.9, posterize to 4 bits, solarize, auto_contrast,
    equalize, all at ``m / (num_bins - 1)`` of their maximum); each drawn op is applied.

    Args:
        n: operations per image (paper: 1-3; default 2).
        m: magnitude in ``[0, num_bins - 1]`` (default 9, torchvision's).
        num_bins: number of magnitude levels (31 as torchvision; 11 gives the paper's 0-10 scale).
        interpolation: ``"nearest"`` or ``"bilinear"``.
    """

    op_names = _RA_OPS

    def __init__(self, n: int = 2, m: float = 9, num_bins: int = 31, interpolation: str = "nearest") -> None:
        check_int("num_bins", num_bins, low=2)
        check_int("n", n, low=1)
        check_number("m", m, low=0, high=num_bins - 1)
        self.n = n
        self.m = m
        self.num_bins = num_bins
        self.interpolation = _check_interpolation(interpolation)
        self._space = _RA_SPACE

    def sample(self, n: int, generator: torch.Generator | None, device: torch.device) -> OpDraw:
        """Draw ``self.n`` ops and signs per image; every op gets strength ``m / (num_bins - 1)``."""
        ops = rng.randint(0, len(self.op_names), (n, self.n), generator=generator, device=device)
        sign = rng.randint(0, 2, (n, self.n), generator=generator, device=device) * 2.0 - 1.0
        strength = torch.full((n, self.n), self.m / (self.num_bins - 1), device=device)
        return OpDraw(ops, strength, sign)


@register_domain("trivialaugment")
class TrivialAugmentDomain(_PolicyDomain):
    """TrivialAugment (Müller & Hutter 2021): one op per image, uniform op and uniform magnitude bin.

    Args:
        wide: the paper's default wide space (torchvision ``TrivialAugmentWide``: shear 0.99, translate
            32 px, rotate 135 degrees, enhance 1 +- 0.99, posterize to 2 bits); False uses RandAugment's space.
        num_bins: number of magnitude levels (31 as the paper and torchvision).
        interpolation: ``"nearest"`` or ``"bilinear"``.
    """

    op_names = _RA_OPS

    def __init__(self, wide: bool = True, num_bins: int = 31, interpolation: str = "nearest") -> None:
        check_bool("wide", wide)
        check_int("num_bins", num_bins, low=2)
        self.wide = wide
        self.num_bins = num_bins
        self.interpolation = _check_interpolation(interpolation)
        self._space = _TA_WIDE_SPACE if wide else _RA_SPACE

    def sample(self, n: int, generator: torch.Generator | None, device: torch.device) -> OpDraw:
        """Draw one op, one magnitude bin and one sign per image."""
        ops = rng.randint(0, len(self.op_names), (n, 1), generator=generator, device=device)
        level = rng.randint(0, self.num_bins, (n, 1), generator=generator, device=device)
        sign = rng.randint(0, 2, (n, 1), generator=generator, device=device) * 2.0 - 1.0
        return OpDraw(ops, level / (self.num_bins - 1), sign)
