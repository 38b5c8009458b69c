"""Tests for the on-device augmentation domains: clean, gaussian_noise, autoaugment, randaugment, trivialaugment."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from mbn_domains.autoaug import AUTOAUGMENT_POLICIES, OPS
from torchvision.transforms import AutoAugment, AutoAugmentPolicy, InterpolationMode

import mbn
from mbn.domain import DomainContext

AUGMENT_DOMAINS = ["clean", "gaussian_noise", "autoaugment", "randaugment", "trivialaugment"]
POLICY_DOMAINS = ["autoaugment", "randaugment", "trivialaugment"]


def make_ctx(seed: int = 0, device: torch.device | str = "cpu") -> DomainContext:
    model = torch.nn.Linear(1, 1).to(device)  # augmentation domains do not use the model
    return DomainContext(model=model, bn="aug", generator=torch.Generator(device=device).manual_seed(seed))


def batch(n: int = 16, device: torch.device | str = "cpu", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 32, 32, generator=g).to(device)
    return images, torch.arange(n, device=device) % 10


def identical_batch(n: int = 16) -> torch.Tensor:
    """One natural-ish image (smooth colour gradients) repeated ``n`` times."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    image = torch.stack([xx, yy, 0.5 * (xx + yy)]) * 0.8 + 0.1
    return image.expand(n, -1, -1, -1).contiguous()


def run(domain: mbn.Domain, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    labels = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
    out, out_labels = domain.generate(images, labels, make_ctx(seed, images.device))
    assert out_labels is labels
    return out


def registered_policy(policy: list) -> mbn.Domain:
    return mbn.create_domain("autoaugment", policy=policy)


# --- contract: shape, range, dtype, device, labels -----------------------------------------------------------


@pytest.mark.parametrize("name", AUGMENT_DOMAINS)
def test_registered(name: str) -> None:
    assert name in mbn.available_domains()


@pytest.mark.parametrize("name", AUGMENT_DOMAINS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_contract(name: str, dtype: torch.dtype, device: torch.device) -> None:
    images, labels = batch(device=device)
    images = images.to(dtype)
    out, out_labels = mbn.create_domain(name).generate(images, labels, make_ctx(0, device))
    assert out.shape == images.shape
    assert out.dtype == dtype
    assert out.device == images.device
    assert out.min() >= 0.0 and out.max() <= 1.0
    torch.testing.assert_close(out_labels, labels)
    if name != "clean":
        assert not torch.equal(out, images)


@pytest.mark.parametrize("name", POLICY_DOMAINS)
def test_half_precision_keeps_dtype(name: str) -> None:
    images, _ = batch(8)
    out = run(mbn.create_domain(name), images.half())
    assert out.dtype == torch.float16 and out.shape == images.shape


def test_clean_is_identity() -> None:
    images, _ = batch()
    torch.testing.assert_close(run(mbn.create_domain("clean"), images), images)


@pytest.mark.parametrize("name", POLICY_DOMAINS)
def test_rejects_non_image_input(name: str) -> None:
    with pytest.raises(ValueError, match="images must be a float"):
        run(mbn.create_domain(name), torch.zeros(4, 3, 8, 8, dtype=torch.long))


# --- randomness: per image, reproducible from ctx.generator --------------------------------------------------


@pytest.mark.parametrize("name", [*POLICY_DOMAINS, "gaussian_noise"])
def test_same_seed_same_output_other_seed_differs(name: str) -> None:
    images, _ = batch()
    domain = mbn.create_domain(name)
    torch.manual_seed(123)  # the global RNG must not matter
    a = run(domain, images, seed=7)
    torch.manual_seed(456)
    b = run(domain, images, seed=7)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, run(domain, images, seed=8))


@pytest.mark.parametrize("name", POLICY_DOMAINS)
def test_identical_images_get_different_augmentations(name: str) -> None:
    """kornia's policies apply one choice to the whole batch; here each image draws its own."""
    images = identical_batch(16)
    out = run(mbn.create_domain(name), images)
    distinct = {tuple(o.flatten()[::7].mul(1000).round().tolist()) for o in out}
    assert len(distinct) >= 6


def test_autoaugment_draws_a_subpolicy_per_image() -> None:
    domain = mbn.create_domain("autoaugment", policy="cifar10")
    draw = domain.sample(256, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert draw.subpolicy is not None and draw.subpolicy.shape == (256,)
    assert draw.subpolicy.unique().numel() == 25  # all sub-policies occur in a batch of 256
    counts = torch.bincount(draw.subpolicy, minlength=25).float()
    assert counts.min() > 0 and counts.max() < 3 * 256 / 25


def test_autoaugment_result_is_in_image_order() -> None:
    """Grouping by operation must put each result back at its own image."""
    domain = registered_policy([[("invert", 1.0, None)], [("brightness", 1.0, 0)]])
    images = identical_batch(32)
    draw = domain.sample(32, torch.Generator().manual_seed(3), torch.device("cpu"))
    out = domain.apply(images, draw)
    expected = torch.where((draw.subpolicy == 0).view(-1, 1, 1, 1), 1.0 - images, 0.1 * images)
    assert 0 < int((draw.subpolicy == 0).sum()) < 32
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("name", ["randaugment", "trivialaugment"])
def test_rand_and_trivial_draw_ops_per_image(name: str) -> None:
    domain = mbn.create_domain(name)
    draw = domain.sample(128, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert draw.ops.unique().numel() == len(domain.op_names)
    if name == "trivialaugment":
        assert draw.strength.unique().numel() > 10  # a magnitude bin per image too


def test_operation_probability_is_per_image() -> None:
    domain = registered_policy([[("invert", 0.5, None)]])
    out = run(domain, identical_batch(64))
    inverted = (out - (1.0 - identical_batch(1))).abs().amax(dim=(1, 2, 3)) < 1e-6
    assert 16 < int(inverted.sum()) < 48


# --- magnitudes: the original policy's meaning ----------------------------------------------------------------


def line_columns(image: torch.Tensor) -> torch.Tensor:
    """Column of the bright vertical line in each row (one channel)."""
    return image[0].argmax(dim=-1).float()


def test_shear_is_a_factor_not_degrees() -> None:
    """Shear 0.3 moves row y by 0.3 * y pixels (atan 0.3 = 16.7 deg), not tan(0.3 * 180 deg) * y (kornia 0.9)."""
    image = torch.zeros(8, 3, 32, 32)
    image[..., 16] = 1.0  # vertical line; the bottom row moves by at most 0.3 * 31.5 = 9.5 px
    domain = registered_policy([[("shear_x", 1.0, 10)]])  # level 10 = the 0.3 maximum
    out = run(domain, image, seed=1)
    rows = torch.arange(32.0)
    slopes = []
    for img in out:
        cols = line_columns(img)
        slope = ((rows - rows.mean()) * (cols - cols.mean())).sum() / ((rows - rows.mean()) ** 2).sum()
        slopes.append(slope)
    slopes = torch.stack(slopes)
    torch.testing.assert_close(slopes.abs(), torch.full_like(slopes, 0.3), atol=0.01, rtol=0)
    assert (slopes > 0).any() and (slopes < 0).any()  # random sign per image
    assert math.degrees(math.atan(slopes.abs().max())) < 17.5


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("axis", [0, 1])
def test_shear_matches_torchvision_pil_convention(axis: int, mode: str) -> None:
    """torchvision's AutoAugment shears by atan(s) degrees about the top-left corner, as PIL does."""
    images, _ = batch(4)
    name = "shear_x" if axis == 0 else "shear_y"
    ours = OPS[name](images, torch.full((4,), 0.3), mode)
    shear = [0.0, 0.0]
    shear[axis] = math.degrees(math.atan(0.3))
    interp = InterpolationMode.NEAREST if mode == "nearest" else InterpolationMode.BILINEAR
    ref = TF.affine(images, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, center=[0, 0], interpolation=interp)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_translate_level_is_original_pixels() -> None:
    """CIFAR policy: level 9 translates by 9 px of 32 (released code: level * 10 / 10 pixels)."""
    image = torch.zeros(4, 3, 32, 32)
    image[..., 16] = 1.0
    out = run(registered_policy([[("translate_x", 1.0, 9)]]), image)  # custom policy: imagenet scale 150/331
    shift = (line_columns(out[0])[0] - 16).abs()
    torch.testing.assert_close(shift, torch.tensor(150 / 331 * 32 * 0.9).round(), atol=1.0, rtol=0)
    cifar = mbn.create_domain("autoaugment", policy=[[("translate_x", 1.0, 9)]], translate=10 / 32)
    shifts = torch.stack([(line_columns(o)[0] - 16).abs() for o in run(cifar, image)])
    torch.testing.assert_close(shifts, torch.full_like(shifts, 9.0))
    assert mbn.create_domain("autoaugment", policy="cifar10").translate == pytest.approx(10 / 32)
    assert mbn.create_domain("autoaugment", policy="imagenet").translate == pytest.approx(150 / 331)


def test_rotate_level_is_three_degrees_per_level() -> None:
    images, _ = batch(4)
    out = run(registered_policy([[("rotate", 1.0, 5)]]), images, seed=2)
    plus = TF.rotate(images, 15.0, interpolation=InterpolationMode.NEAREST)
    minus = TF.rotate(images, -15.0, interpolation=InterpolationMode.NEAREST)
    for o, p, m in zip(out, plus, minus, strict=True):
        assert min((o - p).abs().max(), (o - m).abs().max()) < 1e-4


def test_enhance_level_follows_original_code() -> None:
    """Enhance factor is 0.1 + 1.8 * level / 10 (level 0 darkens to 0.1x), not torchvision's 1 +- 0.9 * level/9."""
    images, _ = batch(4)
    out = run(registered_policy([[("brightness", 1.0, 0)]]), images)
    torch.testing.assert_close(out, 0.1 * images)
    out = run(registered_policy([[("brightness", 1.0, 5)]]), images)
    torch.testing.assert_close(out, images)


def test_solarize_and_posterize_get_stronger_with_level() -> None:
    """Solarize threshold 1 - level/10 and posterize to 8 - int(0.4 level) bits (kornia 0.9 runs both backwards)."""
    flat = torch.full((2, 3, 8, 8), 0.3)
    torch.testing.assert_close(run(registered_policy([[("solarize", 1.0, 8)]]), flat), 1.0 - flat)  # threshold 0.2
    torch.testing.assert_close(run(registered_policy([[("solarize", 1.0, 2)]]), flat), flat)  # threshold 0.8
    ramp = torch.linspace(0, 1, 256).view(1, 1, 16, 16).expand(2, 3, 16, 16).contiguous()
    for level, bits in [(0, 8), (5, 6), (9, 5)]:
        out = run(registered_policy([[("posterize", 1.0, level)]]), ramp)
        assert out[0, 0].unique().numel() == 2**bits


def test_policies_match_torchvision() -> None:
    """The sub-policy tables (kornia's) are the paper's, as torchvision spells them."""
    snake = {"ShearX": "shear_x", "ShearY": "shear_y", "TranslateX": "translate_x", "TranslateY": "translate_y"}
    for name, tv_policy in [
        ("imagenet", AutoAugmentPolicy.IMAGENET),
        ("cifar10", AutoAugmentPolicy.CIFAR10),
        ("svhn", AutoAugmentPolicy.SVHN),
    ]:
        ours = [[(op, prob, level) for op, prob, level in sub] for sub in AUTOAUGMENT_POLICIES[name]]
        theirs = [
            [
                (snake.get(op, "auto_contrast" if op == "AutoContrast" else op.lower()), prob, level)
                for op, prob, level in sub
            ]
            for sub in AutoAugment(tv_policy).policies
        ]
        assert ours == theirs, name


# --- parameters ------------------------------------------------------------------------------------------------


def test_unknown_policy_raises() -> None:
    with pytest.raises(ValueError, match="policy must be one of"):
        mbn.create_domain("autoaugment", policy="x")


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("autoaugment", {"policy": [[("warp", 1.0, 3)]]}, "unknown op"),
        ("autoaugment", {"policy": [[("rotate", 1.5, 3)]]}, "probability"),
        ("autoaugment", {"policy": [[("rotate", 0.5, 11)]]}, "level"),
        ("autoaugment", {"policy": []}, "policy must be"),
        ("autoaugment", {"translate": 2.0}, "translate"),
        ("autoaugment", {"interpolation": "cubic"}, "interpolation"),
        ("randaugment", {"m": 31}, "m must be"),
        ("randaugment", {"n": 0}, "n must be"),
        ("trivialaugment", {"num_bins": 1}, "num_bins"),
        ("gaussian_noise", {"std": -1}, "std"),
        ("autoaugment", {"magnitude": 3}, "unknown parameter"),
    ],
)
def test_bad_parameters_raise(name: str, params: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mbn.create_domain(name, **params)


def test_gaussian_noise_std_is_in_pixel_units() -> None:
    images = torch.full((64, 3, 32, 32), 0.5)
    out = run(mbn.create_domain("gaussian_noise", std=25.5), images)
    torch.testing.assert_close((out - images).std(), torch.tensor(0.1), atol=2e-3, rtol=0)
    torch.testing.assert_close(run(mbn.create_domain("gaussian_noise", std=0), images), images)
