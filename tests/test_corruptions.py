"""Tests for mbn.eval.corruptions: CIFAR-10-C / ImageNet-C constants, shapes, determinism and the on-disk cache."""

from __future__ import annotations

import importlib.metadata
import io
import itertools
import json
import math
import warnings

import cv2
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage.color import hsv2rgb, rgb2hsv

from mbn.eval import corruptions as C
from mbn.eval.corruptions import (
    ALL_CORRUPTIONS,
    CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    SEVERITIES,
    CacheMismatchError,
    constant_table,
    corrupt,
    corruption_params,
    generate_corrupted,
    load_or_generate,
)


def _smooth_images(n: int, size: tuple[int, int] = (32, 32), seed: int = 0) -> np.ndarray:
    """Natural-ish images: random 6x6 colour fields upsampled, plus mild texture."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = rng.uniform(30, 225, size=(6, 6, 3)).astype(np.float32)
        img = cv2.resize(coarse, size[::-1], interpolation=cv2.INTER_CUBIC)
        img += rng.normal(0, 8, size=img.shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return _smooth_images(4)


def _ic():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # imagecorruptions imports the deprecated pkg_resources
        import imagecorruptions
        import imagecorruptions.corruptions as ic
    return imagecorruptions, ic


# --------------------------------------------------------------------------------------------- smoke / cardinality


def test_names():
    package, _ = _ic()
    assert list(CORRUPTIONS) == package.get_corruption_names("common")
    assert list(EXTRA_CORRUPTIONS) == package.get_corruption_names("validation")


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_smoke_batch(images, name):
    out = generate_corrupted(images, name, 3, seed=0)
    assert out.dtype == np.uint8 and out.shape == images.shape
    assert np.abs(out.astype(int) - images).mean() > 0.5


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_single_image_other_size(name):
    # non-square, larger than CIFAR: exercises the size scaling of every corruption
    image = _smooth_images(1, size=(64, 48))[0]
    out = corrupt(image, name, 5, np.random.default_rng(0))
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert not np.array_equal(out, image)


# ------------------------------------------------------------------------------------------------ CIFAR constants


def test_gaussian_noise_uses_cifar_sigma():
    gray = np.full((4, 32, 32, 3), 128, dtype=np.uint8)
    noise = generate_corrupted(gray, "gaussian_noise", 1, seed=0).astype(float) - 128
    # CIFAR-10-C: sigma 0.04 -> 10.2 grey levels (ImageNet-C would be 0.08 -> 20.4)
    assert noise.std() == pytest.approx(0.04 * 255, rel=0.05)
    noise5 = generate_corrupted(gray, "gaussian_noise", 5, seed=0).astype(float) - 128
    assert noise5.std() == pytest.approx(0.10 * 255, rel=0.05)


def test_jpeg_is_pil_at_cifar_quality(images):
    assert [corruption_params("jpeg_compression", s)["quality"] for s in SEVERITIES] == [80, 65, 58, 50, 40]
    buffer = io.BytesIO()
    Image.fromarray(images[0]).save(buffer, "JPEG", quality=80)
    expected = np.asarray(Image.open(buffer))
    np.testing.assert_array_equal(corrupt(images[0], "jpeg_compression", 1, np.random.default_rng(0)), expected)


def test_contrast_formula(images):
    # deterministic corruption: exact check of the reference formula, incl. np.uint8 truncation
    x = images / 255.0
    means = x.mean(axis=(1, 2), keepdims=True)
    expected = (np.clip((x - means) * 0.75 + means, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(generate_corrupted(images, "contrast", 1), expected)


def test_params_table_and_scaling():
    assert corruption_params("shot_noise", 5) == {"photons": 50}
    assert corruption_params("motion_blur", 4) == {"radius": 8, "sigma": 2}
    assert corruption_params("glass_blur", 5) == {"sigma": 0.4, "max_delta": 1, "iterations": 2}
    assert corruption_params("fog", 2) == {"strength": 0.5, "decay": 3, "mapsize": 32}
    # 48x48 (still the CIFAR table) multiplies every pixel-measured constant by 1.5 and nothing else
    assert corruption_params("motion_blur", 4, 48, 48) == {"radius": 12.0, "sigma": 3.0}
    assert corruption_params("glass_blur", 5, 48, 48) == pytest.approx({"sigma": 0.6, "max_delta": 2, "iterations": 2})
    assert corruption_params("gaussian_noise", 3, 48, 48) == {"sigma": 0.08}
    assert corruption_params("fog", 2, 48, 40) == {"strength": 0.5, "decay": 3, "mapsize": 64}
    assert corruption_params("spatter", 2, 48, 48)["level"] == 0.5  # water intensity
    assert corruption_params("spatter", 4, 48, 48)["level"] == pytest.approx(0.9)  # mud blur sigma
    elastic = corruption_params("elastic_transform", 2, 40, 56)  # scale = min side / 32 = 1.25
    assert elastic == pytest.approx({"alpha": 40 * 0.05, "sigma": 40 * 0.2, "affine": 40 * 0.07})


@pytest.mark.parametrize(
    "name", ["gaussian_noise", "shot_noise", "impulse_noise", "contrast", "pixelate", "defocus_blur", "zoom_blur"]
)
def test_severity_monotone(name):
    clean = _smooth_images(8, seed=1)
    diffs = [np.abs(generate_corrupted(clean, name, s).astype(float) - clean).mean() for s in SEVERITIES]
    assert all(a < b for a, b in itertools.pairwise(diffs)), diffs


# ------------------------------------------------------------------------------- table choice, ImageNet-C constants

_SNOW = ["loc", "scale", "zoom", "threshold", "blur_radius", "blur_sigma", "blend"]
_SPATTER = ["loc", "scale", "sigma", "threshold", "level", "mud"]

# CIFAR-10-C constants, hendrycks/robustness ImageNet-C/create_c/make_cifar_c.py (severity 1 and 5 rows)
CIFAR_C_PARAMS = {
    "gaussian_noise": ({"sigma": 0.04}, {"sigma": 0.10}),
    "shot_noise": ({"photons": 500}, {"photons": 50}),
    "impulse_noise": ({"amount": 0.01}, {"amount": 0.07}),
    "defocus_blur": ({"radius": 0.3, "alias_blur": 0.4}, {"radius": 1.5, "alias_blur": 0.1}),
    "glass_blur": ({"sigma": 0.05, "max_delta": 1, "iterations": 1}, {"sigma": 0.4, "max_delta": 1, "iterations": 2}),
    "motion_blur": ({"radius": 6, "sigma": 1}, {"radius": 9, "sigma": 2.5}),
    "zoom_blur": ({"zoom_stop": 1.06}, {"zoom_stop": 1.26}),
    "snow": (
        dict(zip(_SNOW, [0.1, 0.2, 1, 0.6, 8, 3, 0.95], strict=True)),
        dict(zip(_SNOW, [0.3, 0.3, 1.25, 0.65, 14, 12, 0.8], strict=True)),
    ),
    "frost": (
        {"image_weight": 1, "frost_weight": 0.2, "texture_scale": 0.2},
        {"image_weight": 0.75, "frost_weight": 0.45, "texture_scale": 0.2},
    ),
    "fog": ({"strength": 0.2, "decay": 3, "mapsize": 32}, {"strength": 1.5, "decay": 1.75, "mapsize": 32}),
    "brightness": ({"delta": 0.05}, {"delta": 0.3}),
    "contrast": ({"factor": 0.75}, {"factor": 0.15}),
    "elastic_transform": (
        {"alpha": 32 * 0.0, "sigma": 32 * 0.0, "affine": 32 * 0.08},
        {"alpha": 32 * 0.1, "sigma": 32 * 0.03, "affine": 32 * 0.03},
    ),
    "pixelate": ({"fraction": 0.95}, {"fraction": 0.65}),
    "jpeg_compression": ({"quality": 80}, {"quality": 40}),
}

# ImageNet-C constants, hendrycks/robustness ImageNet-C/create_c/make_imagenet_c.py (severity 1 and 5 rows)
IMAGENET_C_PARAMS = {
    "gaussian_noise": ({"sigma": 0.08}, {"sigma": 0.38}),
    "shot_noise": ({"photons": 60}, {"photons": 3}),
    "impulse_noise": ({"amount": 0.03}, {"amount": 0.27}),
    "defocus_blur": ({"radius": 3, "alias_blur": 0.1}, {"radius": 10, "alias_blur": 0.5}),
    "glass_blur": ({"sigma": 0.7, "max_delta": 1, "iterations": 2}, {"sigma": 1.5, "max_delta": 4, "iterations": 2}),
    "motion_blur": ({"radius": 10, "sigma": 3}, {"radius": 20, "sigma": 15}),
    # np.arange(1, 1.11, 0.01) and np.arange(1, 1.31, 0.03)
    "zoom_blur": ({"zoom_stop": 1.11, "zoom_step": 0.01}, {"zoom_stop": 1.31, "zoom_step": 0.03}),
    "snow": (
        dict(zip(_SNOW, [0.1, 0.3, 3, 0.5, 10, 4, 0.8], strict=True)),
        dict(zip(_SNOW, [0.55, 0.3, 2.5, 0.85, 12, 12, 0.55], strict=True)),
    ),
    # the textures are cropped at their stored size (no resize)
    "frost": (
        {"image_weight": 1, "frost_weight": 0.4, "texture_scale": 1},
        {"image_weight": 0.6, "frost_weight": 0.75, "texture_scale": 1},
    ),
    # plasma_fractal(mapsize=256)[:224, :224]
    "fog": ({"strength": 1.5, "decay": 2, "mapsize": 256}, {"strength": 3, "decay": 1.4, "mapsize": 256}),
    "brightness": ({"delta": 0.1}, {"delta": 0.5}),
    "contrast": ({"factor": 0.4}, {"factor": 0.05}),
    "elastic_transform": (
        {"alpha": 244 * 2, "sigma": 244 * 0.7, "affine": 244 * 0.1},
        {"alpha": 244 * 0.12, "sigma": 244 * 0.01, "affine": 244 * 0.02},
    ),
    "pixelate": ({"fraction": 0.6}, {"fraction": 0.25}),
    "jpeg_compression": ({"quality": 25}, {"quality": 7}),
    "speckle_noise": ({"sigma": 0.15}, {"sigma": 0.6}),
    "gaussian_blur": ({"sigma": 1}, {"sigma": 6}),
    "spatter": (
        dict(zip(_SPATTER, [0.65, 0.3, 4, 0.69, 0.6, 0], strict=True)),
        dict(zip(_SPATTER, [0.67, 0.4, 1, 0.65, 1.5, 1], strict=True)),
    ),
    "saturate": ({"factor": 0.3, "offset": 0}, {"factor": 20, "offset": 0.2}),
}


def test_constant_table_rule():
    assert C.IMAGENET_C_MIN_SIDE == 64
    for size in [(16, 16), (32, 32), (48, 40), (63, 500), (500, 63)]:
        assert constant_table(*size) == "CIFAR-10-C", size
    for size in [(64, 64), (96, 128), (224, 224), (64, 1000), (512, 384)]:
        assert constant_table(*size) == "ImageNet-C", size


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_cifar_constants_at_32(name):
    mild, strong = CIFAR_C_PARAMS[name]
    assert corruption_params(name, 1) == mild
    assert corruption_params(name, 5, 32, 32) == strong


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_imagenet_c_constants_at_224(name):
    mild, strong = IMAGENET_C_PARAMS[name]
    # exact: at 224x224 the reference's numbers are returned unscaled
    assert corruption_params(name, 1, 224, 224) == mild
    assert corruption_params(name, 5, 224, 224) == strong


def test_imagenet_c_scaling():
    # pixel-measured constants follow min side / 224; ratios do not
    assert corruption_params("motion_blur", 5, 448, 600) == {"radius": 40.0, "sigma": 30.0}
    assert corruption_params("defocus_blur", 5, 448, 448) == {"radius": 20.0, "alias_blur": 1.0}
    assert corruption_params("gaussian_noise", 5, 448, 448) == {"sigma": 0.38}
    assert corruption_params("jpeg_compression", 1, 96, 128) == {"quality": 25}
    assert corruption_params("zoom_blur", 3, 96, 128) == {"zoom_stop": 1.21, "zoom_step": 0.02}
    scale = 96 / 224
    glass = corruption_params("glass_blur", 5, 96, 128)
    assert glass == pytest.approx({"sigma": 1.5 * scale, "max_delta": 2, "iterations": 2})  # round(4 * 0.43)
    assert corruption_params("glass_blur", 1, 64, 64)["max_delta"] == 1  # at least 1
    elastic = corruption_params("elastic_transform", 3, 96, 128)
    assert elastic == pytest.approx(
        {"alpha": 244 * 0.05 * scale, "sigma": 244 * 0.01 * scale, "affine": 244 * 0.02 * scale}
    )
    snow = corruption_params("snow", 4, 96, 128)
    assert snow["zoom"] == 4.5 and snow["blur_radius"] == pytest.approx(12 * scale)
    assert corruption_params("frost", 2, 112, 112)["texture_scale"] == 0.5
    assert corruption_params("spatter", 5, 112, 112)["level"] == pytest.approx(0.75)  # mud blur sigma 1.5
    assert corruption_params("spatter", 1, 112, 112)["level"] == 0.6  # water intensity
    assert corruption_params("fog", 1, 96, 128)["mapsize"] == 128


def test_zoom_blur_imagenet_c_factors():
    # make_imagenet_c.py's np.arange ranges, float quirks included
    stops = [corruption_params("zoom_blur", s, 224, 224) for s in SEVERITIES]
    assert [len(np.arange(1, p["zoom_stop"], p["zoom_step"])) for p in stops] == [12, 16, 11, 13, 11]
    image = _smooth_images(1, size=(224, 224))
    x = image.astype(np.float32) / 255
    zooms = np.arange(1, 1.21, 0.02)
    expected = (x[0] + sum(_scipy_clipped_zoom(x[0], float(z)) for z in zooms)) / (len(zooms) + 1) * 255
    got = C._zoom_blur(image, corruption_params("zoom_blur", 3, 224, 224), np.random.default_rng(0))[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)


@pytest.mark.parametrize("name", ["defocus_blur", "contrast", "brightness", "saturate"])
def test_imagenet_c_deterministic_match_imagecorruptions(name):
    """imagecorruptions ports make_imagenet_c.py's constants; its deterministic corruptions must agree at 224."""
    _, ic = _ic()
    images = _smooth_images(1, size=(224, 224), seed=2)
    for severity in SEVERITIES:
        params = corruption_params(name, severity, 224, 224)
        got = C._FUNCTIONS[name](images, params, np.random.default_rng(0))[0]
        np.testing.assert_allclose(got, getattr(ic, name)(images[0], severity), rtol=0, atol=1e-6)


def test_imagenet_c_pixelate_and_jpeg_reference():
    image = _smooth_images(1, size=(224, 224), seed=3)[0]
    pil = Image.fromarray(image)
    for severity, fraction in zip(SEVERITIES, [0.6, 0.5, 0.4, 0.3, 0.25], strict=True):
        small = pil.resize((int(224 * fraction), int(224 * fraction)), Image.Resampling.BOX)
        expected = np.asarray(small.resize((224, 224), Image.Resampling.BOX))
        np.testing.assert_array_equal(corrupt(image, "pixelate", severity, np.random.default_rng(0)), expected)
    for severity, quality in zip(SEVERITIES, [25, 18, 15, 10, 7], strict=True):
        buffer = io.BytesIO()
        pil.save(buffer, "JPEG", quality=quality)
        expected = np.asarray(Image.open(buffer))
        np.testing.assert_array_equal(corrupt(image, "jpeg_compression", severity, np.random.default_rng(0)), expected)


def test_imagenet_c_frost_textures_unresized():
    # make_imagenet_c.py crops 224x224 straight out of the stored textures
    textures = C._frost_textures(1, 224, 224)
    for texture, filename in zip(
        textures, ["frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg"], strict=True
    ):
        np.testing.assert_array_equal(texture, cv2.imread(str(C._frost_dir() / filename))[..., ::-1])


@pytest.fixture(scope="module")
def large_batches() -> dict[tuple[int, int], np.ndarray]:
    return {size: _smooth_images(2, size=size, seed=4) for size in [(224, 224), (96, 128)]}


@pytest.mark.parametrize("size", [(224, 224), (96, 128)], ids=["224x224", "96x128"])
@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
@pytest.mark.slow
def test_large_images_every_corruption(large_batches, name, size):
    images = large_batches[size]
    severity = 2 if name == "glass_blur" else 5  # glass_blur's sequential loop: one pass at severity 2
    np.random.seed(1)
    out = generate_corrupted(images, name, severity, seed=7)
    assert out.dtype == np.uint8 and out.shape == images.shape
    assert np.abs(out.astype(int) - images).mean() > 0.5
    np.random.seed(2)  # a global RNG in the path would show up here
    np.testing.assert_array_equal(generate_corrupted(images, name, severity, seed=7), out)


@pytest.mark.parametrize(
    "name",
    ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "defocus_blur", "gaussian_blur", "motion_blur"],
)
def test_severity_monotone_imagenet_c(large_batches, name):
    clean = large_batches[(224, 224)]
    diffs = [np.abs(generate_corrupted(clean, name, s).astype(float) - clean).mean() for s in SEVERITIES]
    assert all(a < b for a, b in itertools.pairwise(diffs)), diffs


# ------------------------------------------------------------------------------------ equivalence with references


@pytest.mark.parametrize(("radius", "sigma"), [(6, 1), (6, 2), (9, 2.5), (8, 3), (14, 12)])
def test_motion_kernel_matches_imagecorruptions(radius, sigma):
    # imagecorruptions' numpy port of ImageMagick's MotionBlurImage, as a loop of edge-replicating shifts
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, size=(32, 32, 3)).astype(np.float32)
    for angle in (-135.0, -60.5, -45.0, 0.0, 17.3, 45.0):
        expected = _ic()[1]._motion_blur(image, radius=radius, sigma=sigma, angle=angle)
        got = C._motion_blur_image(image, radius, sigma, angle)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)


@pytest.mark.parametrize(("radius", "alias"), [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1), (10, 0.5)])
def test_disk_matches_reference(radius, alias):
    np.testing.assert_allclose(C.disk_kernel(radius, alias), _ic()[1].disk(radius, alias), rtol=0, atol=1e-7)


@pytest.mark.parametrize(("height", "width", "max_delta", "iterations"), [(32, 32, 1, 2), (24, 40, 3, 1)])
def test_glass_shuffle_matches_reference_loop(height, width, max_delta, iterations):
    """The batched loop equals the reference's per-pixel loop (whose tuple "swap" on views is a copy).

    make_cifar_c.py / make_imagenet_c.py loop over range(32 or 224 - d, d, -1) for both axes; with the image's own
    height and width, and one randint((2,)) per pixel.
    """
    base = np.random.default_rng(3).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    ref = base.copy()
    rng = np.random.default_rng(7)
    for _ in range(iterations):
        for h in range(height - max_delta, max_delta, -1):
            for w in range(width - max_delta, max_delta, -1):
                dx, dy = rng.integers(-max_delta, max_delta, size=(2,))
                h_prime, w_prime = h + dy, w + dx
                ref[h, w], ref[h_prime, w_prime] = ref[h_prime, w_prime], ref[h, w]
    ours = base[None].copy()
    C._glass_shuffle(ours, max_delta=max_delta, iterations=iterations, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(ours[0], ref)


def _scipy_clipped_zoom(img: np.ndarray, zoom: float) -> np.ndarray:
    """make_cifar_c.py's clipped_zoom (one HWC image, generalised to non-square), with scipy.ndimage.zoom."""
    h, w = img.shape[:2]
    ch, cw = math.ceil(h / zoom), math.ceil(w / zoom)
    top, left = (h - ch) // 2, (w - cw) // 2
    img = ndimage.zoom(img[top : top + ch, left : left + cw], (zoom, zoom, 1), order=1)
    trim_top, trim_left = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
    return img[trim_top : trim_top + h, trim_left : trim_left + w]


@pytest.mark.parametrize("size", [(32, 32), (48, 40)])
def test_clipped_zoom_matches_scipy(size):
    x = np.random.default_rng(0).uniform(size=(2, *size, 3))
    for zoom in [*np.arange(1, 1.26, 0.01), 1.75, 2.25]:
        expected = np.stack([_scipy_clipped_zoom(image, float(zoom)) for image in x])
        np.testing.assert_allclose(C._clipped_zoom(x, float(zoom)), expected, rtol=0, atol=1e-12)


def test_zoom_blur_factors_follow_reference_arange():
    # np.arange(1, 1.06, 0.01) has 7 entries in float64, so the reference blends 8 images at severity 1
    counts = [len(np.arange(1, corruption_params("zoom_blur", s)["zoom_stop"], 0.01)) for s in SEVERITIES]
    assert counts == [7, 12, 16, 21, 26]
    images = _smooth_images(2)
    x = images.astype(np.float32) / 255
    zooms = np.arange(1, 1.06, 0.01)
    expected = (x + sum(np.stack([_scipy_clipped_zoom(i, float(z)) for i in x]) for z in zooms)) / 8 * 255
    got = C._zoom_blur(images, corruption_params("zoom_blur", 1), np.random.default_rng(0))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)


def test_brightness_equals_hsv_round_trip():
    x = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    x[0, :4] = 0  # black pixels take the S = 0 branch
    x[1, :4] = 255
    for severity in SEVERITIES:
        delta = corruption_params("brightness", severity)["delta"]
        hsv = rgb2hsv(x / 255.0)
        hsv[..., 2] = np.clip(hsv[..., 2] + delta, 0, 1)
        expected = np.clip(hsv2rgb(hsv), 0, 1) * 255
        got = C._brightness(x, {"delta": delta}, np.random.default_rng(0))
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------------------------- determinism


def test_deterministic_and_seeded(images):
    for name in ALL_CORRUPTIONS:
        np.random.seed(1)
        a = generate_corrupted(images, name, 2, seed=5)
        np.random.seed(2)  # a global RNG in the path would show up here
        b = generate_corrupted(images, name, 2, seed=5)
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert not np.array_equal(
        generate_corrupted(images, "gaussian_noise", 2, seed=5), generate_corrupted(images, "gaussian_noise", 2, seed=6)
    )


def test_chunks_get_distinct_streams(monkeypatch):
    monkeypatch.setattr(C, "CHUNK_SIZE", 2)
    gray = np.full((4, 32, 32, 3), 128, dtype=np.uint8)
    out = generate_corrupted(gray, "gaussian_noise", 3, seed=0)
    assert not np.array_equal(out[:2], out[2:])


# ---------------------------------------------------------------------------------------------------- exceptions


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "blur"}, "name must be one of"),
        ({"severity": 0}, "severity must be"),
        ({"severity": 2.0}, "severity must be"),
        ({"images": np.zeros((2, 32, 32, 3), np.float32)}, "uint8"),
        ({"images": np.zeros((32, 32, 3), np.uint8)}, r"\(N, H, W, 3\)"),
        ({"images": np.zeros((2, 3, 32, 32), np.uint8)}, r"\(N, H, W, 3\)"),
        ({"images": np.zeros((2, 8, 8, 3), np.uint8)}, "at least 16x16"),
        ({"seed": -1}, "seed must be"),
    ],
)
def test_exception(kwargs, match):
    args = {"images": np.zeros((2, 32, 32, 3), np.uint8), "name": "contrast", "severity": 1, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=match):
        generate_corrupted(**args)


def test_corrupt_needs_generator(images):
    with pytest.raises(ValueError, match="rng must be"):
        corrupt(images[0], "contrast", 1, 0)


# --------------------------------------------------------------------------------------------------------- cache


def _load(images, labels, root, **kwargs):
    kwargs = {"corruptions": ("gaussian_noise", "contrast"), "severities": (1, 2), "progress": False} | kwargs
    return load_or_generate(images, labels, root, "toy", **kwargs)


def test_cache_generates_then_loads(images, tmp_path, monkeypatch):
    labels = np.arange(len(images))
    first = _load(images, labels, tmp_path, seed=3)
    assert set(first) == {("gaussian_noise", 1), ("gaussian_noise", 2), ("contrast", 1), ("contrast", 2)}
    np.testing.assert_array_equal(first[("gaussian_noise", 2)], generate_corrupted(images, "gaussian_noise", 2, 3))

    root = tmp_path / "toy"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["images_sha256"] == C.images_fingerprint(images)
    assert manifest["num_images"] == 4 and manifest["image_shape"] == [32, 32, 3]
    assert manifest["seed"] == 3 and manifest["chunk_size"] == C.CHUNK_SIZE
    assert manifest["packages"]["numpy"] == np.__version__
    assert manifest["packages"]["mbn-advprop"] == importlib.metadata.version("mbn-advprop")
    assert "mbn" not in manifest["packages"]  # "mbn" on the package index is another project
    entry = manifest["entries"]["gaussian_noise/1"]
    assert entry["params"] == {"sigma": 0.04} and entry["file"] == "gaussian_noise-1.npy"
    assert entry["shape"] == [4, 32, 32, 3] and entry["dtype"] == "uint8"
    assert entry["sha256"] == C.images_fingerprint(np.asarray(first[("gaussian_noise", 1)]))
    np.testing.assert_array_equal(np.load(root / "labels.npy"), labels)
    assert not list(root.glob(".*tmp"))  # atomic writes leave no temporaries

    def boom(*args, **kwargs):
        raise AssertionError("regenerated a cached entry")

    monkeypatch.setattr(C, "generate_corrupted", boom)
    second = _load(images, labels, tmp_path, seed=3)
    for key, value in first.items():
        np.testing.assert_array_equal(second[key], value)

    # a new pair is generated, the cached ones are not
    calls = []
    monkeypatch.setattr(C, "generate_corrupted", lambda *a: calls.append(a[1:3]) or generate_corrupted(*a))
    _load(images, labels, tmp_path, seed=3, severities=(1, 2, 3))
    assert calls == [("gaussian_noise", 3), ("contrast", 3)]


def test_cache_mismatch_raises_or_regenerates(images, tmp_path):
    labels = np.zeros(len(images), dtype=np.int64)
    _load(images, labels, tmp_path)
    other = images[::-1].copy()
    with pytest.raises(CacheMismatchError, match="images_sha256"):
        _load(other, labels, tmp_path)
    with pytest.raises(CacheMismatchError, match="seed"):
        _load(images, labels, tmp_path, seed=1)
    with pytest.raises(CacheMismatchError, match="labels_sha256"):
        _load(images, labels + 1, tmp_path)

    rebuilt = _load(other, labels, tmp_path, on_mismatch="regenerate", corruptions=("contrast",), severities=(1,))
    np.testing.assert_array_equal(rebuilt[("contrast", 1)], generate_corrupted(other, "contrast", 1))
    manifest = json.loads((tmp_path / "toy" / "manifest.json").read_text())
    assert manifest["images_sha256"] == C.images_fingerprint(other)
    assert list(manifest["entries"]) == ["contrast/1"]
    assert not (tmp_path / "toy" / "gaussian_noise-1.npy").exists()


def test_cache_version_1_reused_only_where_outputs_unchanged(tmp_path):
    """Generator version 2 changed only images of 64 px and up: older caches of smaller images stay valid."""
    for size, reused in [((32, 32), True), ((64, 64), False)]:
        images = _smooth_images(2, size=size)
        labels = np.zeros(2, dtype=np.int64)
        root = tmp_path / f"{size[0]}"
        _load(images, labels, root, corruptions=("contrast",), severities=(1,))
        path = root / "toy" / "manifest.json"
        manifest = json.loads(path.read_text())
        expected_table = "CIFAR-10-C" if reused else "ImageNet-C"
        assert manifest["generator_version"] == C.GENERATOR_VERSION == 2
        assert manifest["constants"] == expected_table and manifest["reference"].endswith(
            "make_cifar_c.py" if reused else "make_imagenet_c.py"
        )
        manifest["generator_version"] = 1
        path.write_text(json.dumps(manifest))
        if reused:
            _load(images, labels, root, corruptions=("contrast",), severities=(1,))
        else:
            with pytest.raises(CacheMismatchError, match="generator_version"):
                _load(images, labels, root, corruptions=("contrast",), severities=(1,))
        manifest["generator_version"] = 3  # a newer generator's cache is never taken for ours
        path.write_text(json.dumps(manifest))
        with pytest.raises(CacheMismatchError, match="generator_version"):
            _load(images, labels, root, corruptions=("contrast",), severities=(1,))


def test_cache_bad_arguments(images, tmp_path):
    with pytest.raises(ValueError, match="labels must have shape"):
        _load(images, np.zeros(3), tmp_path)
    with pytest.raises(ValueError, match="dataset_id"):
        load_or_generate(images, np.zeros(4), tmp_path, "a/b", progress=False)
    with pytest.raises(ValueError, match="on_mismatch"):
        _load(images, np.zeros(4), tmp_path, on_mismatch="ignore")


# ------------------------------------------------------------------------------------------- damaged cache entries

_PAIRS = {"corruptions": ("gaussian_noise", "contrast"), "severities": (1,)}


def _damaged_then_loaded(images, tmp_path, capsys, damage):
    """Fill a cache, damage it, load it again: (result, stderr lines, fresh result, cache folder)."""
    labels = np.arange(len(images))
    fresh = _load(images, labels, tmp_path / "fresh", **_PAIRS)
    _load(images, labels, tmp_path / "cache", **_PAIRS)
    root = tmp_path / "cache" / "toy"
    damage(root)
    capsys.readouterr()
    result = _load(images, labels, tmp_path / "cache", **_PAIRS)
    lines = capsys.readouterr().err.strip().splitlines()
    assert set(result) == set(fresh)
    for key, value in fresh.items():
        np.testing.assert_array_equal(result[key], value)
        assert result[key].dtype == value.dtype
    _load(images, labels, tmp_path / "cache", **_PAIRS)  # whole again: nothing regenerated, nothing said
    assert capsys.readouterr().err == ""
    return lines, root


def _rewrite_entry(transform):
    def damage(root):
        path = root / "gaussian_noise-1.npy"
        np.save(path, transform(np.load(path)))  # not through np.save's atomic helper: a user's doing

    return damage


def _truncate(root):
    path = root / "gaussian_noise-1.npy"
    path.write_bytes(path.read_bytes()[:-1000])


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_rewrite_entry(lambda a: a[::-1].copy()), "does not match its SHA-256 in manifest.json"),  # same shape
        (_rewrite_entry(lambda a: 255 - a), "does not match its SHA-256 in manifest.json"),
        (_truncate, "cannot be read (mmap length is greater than file size)"),
        (lambda root: (root / "gaussian_noise-1.npy").write_bytes(b""), "cannot be read (No data left in file)"),
        (_rewrite_entry(lambda a: a[:3]), "holds 3 images, expected 4"),
        (_rewrite_entry(lambda a: np.concatenate([a, a])), "holds 8 images, expected 4"),
        (_rewrite_entry(lambda a: a.astype(np.float32)), "holds float32 values, expected uint8"),
        (_rewrite_entry(lambda a: a[:, :16]), "holds an array of shape (4, 16, 32, 3), expected (4, 32, 32, 3)"),
        (lambda root: (root / "gaussian_noise-1.npy").unlink(), "is listed in manifest.json but missing"),
    ],
    ids=["replaced", "inverted", "truncated", "empty", "short", "long", "float", "cropped", "missing"],
)
def test_cache_damaged_entry_is_regenerated(images, tmp_path, capsys, damage, reason):
    lines, root = _damaged_then_loaded(images, tmp_path, capsys, damage)
    assert lines == [f"mbn: corruption cache: {root / 'gaussian_noise-1.npy'} {reason}; regenerating"]


def _edit_manifest(edit):
    def damage(root):
        path = root / "manifest.json"
        manifest = json.loads(path.read_text())
        edit(manifest)
        path.write_text(json.dumps(manifest))

    return damage


@pytest.mark.parametrize(
    "edit, reason",
    [
        (lambda m: m["entries"].__setitem__("gaussian_noise/1", []), "not an object"),
        (lambda m: m["entries"]["gaussian_noise/1"].__setitem__("file", 5), "'file' is not 'gaussian_noise-1.npy'"),
        (lambda m: m["entries"]["gaussian_noise/1"].__setitem__("file", "../x.npy"), "'file' is not"),
        (lambda m: m["entries"]["gaussian_noise/1"].__setitem__("severity", "1"), "'severity' is not 1"),
        (lambda m: m["entries"]["gaussian_noise/1"].__setitem__("params", [0.04]), "'params' is not an object"),
        (lambda m: m["entries"]["gaussian_noise/1"].__setitem__("sha256", 7), "'sha256' is not a SHA-256"),
        (lambda m: m["entries"]["gaussian_noise/1"].__setitem__("shape", [3, 32, 32, 3]), "'shape' is not"),
        (lambda m: m["entries"]["gaussian_noise/1"].__setitem__("dtype", "float32"), "'dtype' is not 'uint8'"),
    ],
    ids=["list", "file-int", "file-path", "severity-str", "params-list", "sha-int", "shape", "dtype"],
)
def test_cache_malformed_entry_record_is_regenerated(images, tmp_path, capsys, edit, reason):
    lines, root = _damaged_then_loaded(images, tmp_path, capsys, _edit_manifest(edit))
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"mbn: corruption cache: {root / 'gaussian_noise-1.npy'} has a malformed record in manifest.json ({reason}"
    )
    assert lines[0].endswith("; regenerating")


def test_cache_entry_without_sha256_is_regenerated(images, tmp_path, capsys):
    """An entry recorded without a SHA-256 (an older mbn's) cannot be checked, so it is made again and recorded."""
    lines, root = _damaged_then_loaded(
        images, tmp_path, capsys, _edit_manifest(lambda m: m["entries"]["gaussian_noise/1"].pop("sha256"))
    )
    path = root / "gaussian_noise-1.npy"
    assert lines == [
        f"mbn: corruption cache: {path} has no SHA-256 in manifest.json (written by an older mbn); regenerating"
    ]
    entry = json.loads((root / "manifest.json").read_text())["entries"]["gaussian_noise/1"]
    assert entry["sha256"] == C.images_fingerprint(np.load(path))


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"{not json", "not JSON: "),
        (b"", "not JSON: "),
        (b"\xff\xfe\x00", "not JSON: "),
        (b"[" * 100_000, "not JSON: "),
        (b"[]", "a JSON list, not an object"),
        (b"null", "a JSON NoneType, not an object"),
        (_edit_manifest(lambda m: m.__setitem__("entries", [])), "'entries' is not an object"),
        (_edit_manifest(lambda m: m.pop("entries")), "'entries' is not an object"),
        (_edit_manifest(lambda m: m.__setitem__("seed", "0")), "'seed' is not an int"),
        (_edit_manifest(lambda m: m.__setitem__("num_images", True)), "'num_images' is not an int"),
        (_edit_manifest(lambda m: m.__setitem__("image_shape", "32x32")), "'image_shape' is not a list of 3"),
        (_edit_manifest(lambda m: m.__setitem__("images_sha256", None)), "'images_sha256' is not a string"),
        (_edit_manifest(lambda m: m.pop("chunk_size")), "no 'chunk_size'"),
    ],
    ids=[
        "syntax",
        "empty",
        "binary",
        "deep",
        "list",
        "null",
        "entries-list",
        "no-entries",
        "seed-str",
        "count-bool",
        "shape-str",
        "sha-null",
        "no-chunk",
    ],
)
def test_cache_damaged_manifest_starts_again(images, tmp_path, capsys, content, reason):
    def damage(root):
        if callable(content):
            content(root)
        else:
            (root / "manifest.json").write_bytes(content)

    lines, root = _damaged_then_loaded(images, tmp_path, capsys, damage)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"mbn: corruption cache: {root / 'manifest.json'} is damaged ({reason}")
    assert lines[0].endswith("); regenerating the cache")


def test_cache_mismatch_deletes_only_entry_files(images, tmp_path):
    """Starting a mismatched cache again removes entry files by their own names, never the manifest's ``file``."""
    labels = np.zeros(len(images), dtype=np.int64)
    _load(images, labels, tmp_path, **_PAIRS)
    victim = tmp_path / "victim.npy"
    victim.write_bytes(b"keep")
    path = tmp_path / "toy" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["entries"]["gaussian_noise/1"]["file"] = "../victim.npy"
    path.write_text(json.dumps(manifest))
    _load(images[::-1].copy(), labels, tmp_path, on_mismatch="regenerate", corruptions=("contrast",), severities=(1,))
    assert victim.read_bytes() == b"keep"
    assert not (tmp_path / "toy" / "gaussian_noise-1.npy").exists()
