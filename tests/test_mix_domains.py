"""The mixup and cutmix domains: soft targets, what the images hold, seeding, and training through them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mbn
from mbn.domain import DomainContext
from tests.runs import train

REPO = Path(__file__).resolve().parents[1]
K = 10


def _ctx(seed: int = 0) -> DomainContext:
    return DomainContext(model=torch.nn.Linear(2, 2), bn="clean", generator=torch.Generator().manual_seed(seed),
                         num_classes=K)  # fmt: skip


def _batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 16, 16, generator=g), torch.randperm(K, generator=g)[:n]  # distinct labels


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_targets_are_probabilities_summing_to_one(kind):
    images, labels = _batch()
    mixed, targets = mbn.create_domain(kind).generate(images, labels, _ctx())
    assert mixed.shape == images.shape and mixed.dtype == images.dtype
    assert targets.shape == (6, K) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(1), torch.ones(6))
    assert (targets >= 0).all()
    neighbour = labels.roll(1)  # each image is mixed with the one before it
    for i in range(6):
        assert set(targets[i].nonzero().flatten().tolist()) <= {labels[i].item(), neighbour[i].item()}


def test_mixup_images_are_the_blend_the_targets_describe():
    images, labels = _batch()
    mixed, targets = mbn.create_domain("mixup", alpha=0.4).generate(images, labels, _ctx())
    lam = targets[0, labels[0]].item()
    assert 0 < lam < 1
    torch.testing.assert_close(targets[:, labels].diagonal(), torch.full((6,), lam))
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.roll(1, 0))


def test_cutmix_pastes_a_box_of_the_neighbour_covering_the_targets_share():
    images, labels = _batch()
    for seed in range(5):
        mixed, targets = mbn.create_domain("cutmix").generate(images, labels, _ctx(seed))
        own = (mixed == images).all(1)  # (N, H, W): pixel still the image's own
        other = (mixed == images.roll(1, 0)).all(1)
        assert (own | other).all()  # every pixel is one of the two
        pasted = (~own).float().mean((1, 2))  # the box is the same for the whole batch
        assert torch.allclose(pasted, pasted[0].expand(6))
        lam = targets[torch.arange(6), labels]
        torch.testing.assert_close(1 - lam, pasted, atol=1 / 256, rtol=0)


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_same_seed_same_batch_and_the_global_rng_untouched(kind):
    images, labels = _batch()
    domain = mbn.create_domain(kind)
    ctx = _ctx(3)
    before = torch.random.get_rng_state()
    a = domain.generate(images, labels, ctx)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = domain.generate(images, labels, _ctx(3))
    c = domain.generate(images, labels, _ctx(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_input_untouched_odd_batches_and_soft_input_labels(kind):
    images, labels = _batch(5)
    copy = images.clone()
    version = images._version
    mixed, targets = mbn.create_domain(kind).generate(images, labels, _ctx())
    assert images._version == version and torch.equal(images, copy)
    assert targets.shape == (5, K)
    soft_in = torch.nn.functional.one_hot(labels, K).float() * 0.9 + 0.01  # rows sum to 1
    _, again = mbn.create_domain(kind).generate(mixed, soft_in, _ctx())
    torch.testing.assert_close(again.sum(1), torch.ones(5))


@pytest.mark.parametrize("alpha", [0, -1.0, "big"])
def test_exception_alpha_must_be_positive(alpha):
    with pytest.raises(ValueError, match="alpha"):
        mbn.create_domain("mixup", alpha=alpha)


def test_exception_labels_of_another_shape():
    images, _ = _batch()
    with pytest.raises(ValueError, match="class indices"):
        mbn.create_domain("cutmix").generate(images, torch.zeros(6, 2, 2), _ctx())


@pytest.mark.slow
def test_shipped_recipe_trains_with_soft_targets(tmp_path):
    run = tmp_path / "run"
    assert train(REPO / "recipes" / "mixup_cutmix.yaml", run, "trainer.max_steps=4") == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["sources"] == ["clean", "mix"]
    for domain in ("clean", "mixup", "cutmix"):
        loss = metrics["train"][domain]["loss"]
        assert loss is not None and loss == loss and 0 < loss < 10
    assert metrics["images_seen"]["mixup"] == metrics["images_seen"]["cutmix"] == 4 * 8  # halves of 16
    from tests.runs import tensorboard_images

    perturbations = {t for t in tensorboard_images(run / "tb") if t.startswith("samples_perturbation/")}
    assert perturbations == {"samples_perturbation/mixup", "samples_perturbation/cutmix"}  # each against its half


@pytest.mark.slow
def test_mixup_on_the_main_bn_trains_and_resumes_exactly(tmp_path):
    from mbn.checkpoint import load_checkpoint
    from mbn.cli.train import main as train_main

    recipe = REPO / "recipes" / "vanilla.yaml"
    extra = ["domains.clean.type=mixup", "domains.clean.alpha=1.0"]
    assert train(recipe, tmp_path / "full", *extra, "trainer.max_steps=6") == 0
    assert train(recipe, tmp_path / "part", *extra, "trainer.max_steps=3") == 0
    assert train_main(["--resume", str(tmp_path / "part"), "trainer.max_steps=6"]) == 0
    full, part = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in ("full", "part"))
    torch.testing.assert_close(part["model"], full["model"], rtol=0, atol=0)


def test_exception_a_mixing_domain_after_another_heads_targets(tmp_path, capsys):
    recipe = REPO / "recipes" / "advprop_ssl.yaml"
    assert train(recipe, tmp_path / "run", "domains.mixr={type: mixup, input: rot, bn: rot}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "domains.mixr.input" in err[0] and "'rotation'" in err[0]


@pytest.mark.slow
def test_a_targeted_attack_after_mixup_aims_at_a_wrong_class_of_the_dominant_one(tmp_path, monkeypatch):
    from mbn_domains.pgd import PGDDomain

    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (soft targets in, attack goal, targets out)
    attack, generate = PGDDomain._attack, PGDDomain.generate

    def recording_attack(self, images, labels, ctx, **extra):
        seen[-1][1] = labels
        return attack(self, images, labels, ctx, **extra)

    def recording_generate(self, images, labels, ctx):
        seen.append([labels, None, None])
        adv, out = generate(self, images, labels, ctx)
        seen[-1][2] = out
        return adv, out

    monkeypatch.setattr(PGDDomain, "_attack", recording_attack)
    monkeypatch.setattr(PGDDomain, "generate", recording_generate)
    recipe = REPO / "recipes" / "advprop.yaml"
    assert train(recipe, tmp_path / "run", "domains.mix={type: mixup, bn: clean}", "domains.adv.input=mix",
                 "trainer.max_steps=2") == 0  # fmt: skip
    assert len(seen) == 2
    for soft, goal, out in seen:
        assert soft.is_floating_point() and soft.dim() == 2 and out is soft  # the mixed targets go on to training
        assert goal.dtype == torch.int64 and goal.shape == soft.shape[:1]
        assert ((goal >= 0) & (goal < soft.shape[1])).all() and (goal != soft.argmax(1)).all()


def test_exception_wrong_labels_of_soft_targets():
    with pytest.raises(ValueError, match="class indices"):
        mbn.attacks.random_wrong_labels(torch.full((2, 10), 0.1), 10)
