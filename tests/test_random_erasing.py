"""The ``random_erasing`` domain: timm's RandomErasing statistics in [0, 1] space, seeded, and trained from a recipe."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from mbn_domains.erasing import RandomErasingDomain

import mbn
from mbn.testing import check_domain, default_context
from tests.runs import REPO, train

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def erase(domain: RandomErasingDomain, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    ctx = default_context(domain, images, seed=seed)
    ctx.model.mean = torch.tensor(MEAN).view(1, 3, 1, 1)  # the model's input normalisation the fill maps back through
    ctx.model.std = torch.tensor(STD).view(1, 3, 1, 1)
    out, labels = domain.generate(images, torch.zeros(len(images), dtype=torch.long), ctx)
    assert torch.equal(labels, torch.zeros(len(images), dtype=torch.long))
    return out


def erased_masks(out: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return (out != images).any(dim=1)  # (N, H, W)


def test_registered_and_keeps_the_domain_contract(device):
    assert "random_erasing" in mbn.available_domains()
    for mode in ("const", "rand", "pixel"):
        images = torch.rand(16, 3, 24, 24, device=device)
        labels = torch.zeros(16, dtype=torch.long, device=device)
        out, _ = check_domain(RandomErasingDomain(probability=0.7, mode=mode, max_count=2), images, labels)
        assert out.min() >= 0 and out.max() <= 1


def test_probability_zero_is_the_identity():
    images = torch.rand(8, 3, 16, 16)
    assert torch.equal(erase(RandomErasingDomain(probability=0.0), images), images)


def test_seeded_same_seed_same_boxes_other_seed_other_boxes():
    images = torch.rand(64, 3, 16, 16)
    domain = RandomErasingDomain(probability=1.0, mode="pixel")
    a, b, c = erase(domain, images, 3), erase(domain, images, 3), erase(domain, images, 4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    state = torch.get_rng_state()
    erase(domain, images, 5)
    assert torch.equal(state, torch.get_rng_state())  # the global generator is never drawn from


@pytest.mark.parametrize(
    ("probability", "min_area", "max_area", "min_aspect"), [(0.5, 0.02, 1 / 3, 0.3), (0.25, 0.1, 0.2, 0.5)]
)
def test_erased_share_area_and_aspect_follow_the_parameters(probability, min_area, max_area, min_aspect):
    n, side = 4000, 32
    images = torch.zeros(n, 3, side, side)  # const fill is the mean, never 0: every erased pixel shows
    masks = erased_masks(
        erase(RandomErasingDomain(probability, min_area, max_area, min_aspect, mode="const"), images), images
    )
    hit = masks.any(dim=(1, 2))
    assert abs(hit.float().mean().item() - probability) < 4 * math.sqrt(probability * (1 - probability) / n)
    rows, cols = masks[hit].any(dim=2).sum(1).float(), masks[hit].any(dim=1).sum(1).float()
    area = masks[hit].sum(dim=(1, 2)).float()
    assert torch.equal(area, rows * cols)  # one box per image, a rectangle
    frac = area / side**2
    assert frac.min() >= min_area - 0.02 and frac.max() <= max_area + 0.02  # up to the rounding of the sides
    assert abs(frac.mean().item() - (min_area + max_area) / 2) < 0.015  # uniform area (a few tall boxes redrawn)
    aspect = rows / cols
    assert aspect.min() >= min_aspect * 0.8 and aspect.max() <= 1 / min_aspect * 1.25
    assert abs(aspect.log().mean().item()) < 0.05  # log-uniform, symmetric about 1


@pytest.mark.parametrize("count", [1, 3])
def test_statistics_match_timm(count):
    """Erased share and area per erased image as timm's RandomErasing draws them (same parameters)."""
    from timm.data.random_erasing import RandomErasing

    n = 4000
    ours = erased_masks(erase(RandomErasingDomain(0.5, mode="const", max_count=count), torch.zeros(n, 3, 32, 32)), 0)
    random.seed(0)
    theirs = (RandomErasing(0.5, mode="const", max_count=count, device="cpu")(torch.ones(n, 3, 32, 32)) != 1).any(1)
    share = [m.any(dim=(1, 2)).float().mean().item() for m in (ours, theirs)]
    area = [m[m.any(dim=(1, 2))].float().mean(dim=(1, 2)) for m in (ours, theirs)]
    assert abs(share[0] - share[1]) < 0.04
    assert abs(area[0].mean() - area[1].mean()) < 0.01 and abs(area[0].std() - area[1].std()) < 0.01


def test_fills_are_timm_s_mapped_through_the_normalisation():
    images = torch.zeros(2000, 3, 32, 32)
    mean, std = torch.tensor(MEAN), torch.tensor(STD)
    const = erase(RandomErasingDomain(1.0, mode="const"), images)
    mask = erased_masks(const, images)
    assert torch.allclose(const.permute(0, 2, 3, 1)[mask], mean.expand(int(mask.sum()), 3))  # timm's 0: the mean
    pixel = erase(RandomErasingDomain(1.0, mode="pixel"), images)
    values = pixel.permute(0, 2, 3, 1)[erased_masks(pixel, images)]  # (pixels, 3)
    clamped = (mean + std * torch.randn(200000, 3)).clamp(0, 1)  # N(0, 1) in normalised space, clamped to [0, 1]
    assert torch.allclose(values.mean(0), clamped.mean(0), atol=0.01)
    assert torch.allclose(values.std(0), clamped.std(0), atol=0.01)
    rand = erase(RandomErasingDomain(1.0, mode="rand"), images)
    for out in rand[:20]:  # one colour per box
        inside = out.permute(1, 2, 0)[(out != 0).any(dim=0)]
        assert len(inside) and (inside == inside[0]).all()


def test_bad_parameters_name_themselves():
    for kwargs, name in [({"probability": 2}, "probability"), ({"mode": "zero"}, "mode"),
                         ({"min_area": 0.5, "max_area": 0.1}, "max_area"), ({"max_count": 0}, "max_count"),
                         ({"min_aspect": 0}, "min_aspect")]:  # fmt: skip
        with pytest.raises(ValueError, match=name):
            RandomErasingDomain(**kwargs)


DOC_RECIPES = {  # the recipes of docs/domains.md's "Random erasing"
    "alone": "domains:\n  erase: {type: random_erasing, bn: clean, probability: 0.25, mode: pixel}\n",
    "autoaug": "domains:\n  autoaug: {type: autoaugment, policy: cifar10, bn: clean}\n"
    "  erase:   {type: random_erasing, input: autoaug, bn: erased, probability: 1.0, max_count: 3}\n",
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(DOC_RECIPES))
def test_trains_from_the_documented_recipes(tmp_path, recipe):
    path = tmp_path / f"{recipe}.yaml"
    path.write_text(f"base: {REPO / 'recipes' / 'base.yaml'}\n{DOC_RECIPES[recipe]}")
    assert train(path, tmp_path / "run", "trainer.epochs=1") == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["images_seen"]["erase"] == 64
    assert set(metrics["images_seen"]) == ({"erase"} if recipe == "alone" else {"autoaug", "erase"})
