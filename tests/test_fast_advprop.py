"""Fast AdvProp's pieces: a seeded fraction of the batch, attack-gradient reuse, per-sample gradient averaging,
budget matching, and a NaN caught between logging steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import mbn
from mbn.budget import matched_epochs, step_cost
from mbn.builders import build_domains
from mbn.checkpoint import load_checkpoint
from mbn.config import domain_specs, load_recipe
from mbn.gradnorm import SHARED, SampleMeanGradients
from mbn.train import Trainer, build_trainer
from mbn.train.step import UpdateLedger
from tests.runs import REPO, TINY, train

FAST = REPO / "recipes" / "fast_advprop.yaml"


def _cost(recipe: str, *overrides: str) -> float:
    specs = domain_specs(load_recipe(REPO / "recipes" / f"{recipe}.yaml", list(overrides)))
    return step_cost(specs, build_domains(specs))


def test_budget_matching_arithmetic():
    assert _cost("vanilla") == 1.0
    assert _cost("fast_advprop") == pytest.approx(0.8 + 0.2 * (1 + 1))  # 4/5 clean + 1/5 x (attack + adversarial)
    assert _cost("advprop") == pytest.approx(3.0)  # PGD-1 on every image
    assert _cost("advprop", "domains.adv.steps=5") == pytest.approx(7.0)  # AdvProp's "about 7x" for PGD5
    assert _cost("advprop", "domains.adv.start=0.5") == pytest.approx(2.0)  # active half the run
    specs = domain_specs(load_recipe(FAST))
    assert matched_epochs(105, specs, build_domains(specs), "vanilla") == 88  # round(105 / 1.2), the official number
    assert matched_epochs(105, specs, build_domains(specs), str(REPO / "recipes" / "fast_advprop.yaml")) == 105


def test_budget_of_sets_the_epochs_and_keeps_milestones_fractions(tmp_path):
    cfg = load_recipe(FAST, [*TINY, "trainer.epochs=7", "schedule.name=multistep"])
    with build_trainer(cfg, tmp_path / "run") as trainer:
        assert trainer.length.epochs == 6  # round(7 / 1.2)
        assert trainer.length.total_steps == 6 * trainer.length.steps_per_epoch
        assert list(cfg.schedule.milestones) == [0.5, 0.75]  # fractions of the run: they scale with it


@pytest.fixture
def recorder(scratch_registry):
    seen: list[torch.Tensor] = []

    @mbn.register_domain("record_input_test")
    class Record(mbn.Domain):
        def generate(self, images, labels, ctx):
            seen.append(images.detach().clone())
            return images, labels

    return seen


def test_fractions_of_one_input_are_disjoint_seeded_slices(tmp_path, recorder):
    extra = ["domains.clean.fraction=0.75", "domains.part.type=record_input_test", "domains.part.fraction=0.25",
             "domains.part.bn=clean", "trainer.max_steps=1"]  # fmt: skip
    cfg = load_recipe(REPO / "recipes" / "vanilla.yaml", [*TINY, *extra])
    with build_trainer(cfg, tmp_path / "run") as trainer:
        images, labels = next(iter(trainer.data.train.epoch_batches(0)))
        images = images.float() / 255
        at = trainer.step.position(step=0, epoch=0)
        outputs = trainer.step.generate(images, labels, at, trainer.runtime.seed_draw(at.draw), UpdateLedger())
    clean, part = outputs["clean"].images, recorder[0]
    assert clean.shape[0] == 12 and part.shape[0] == 4
    together = torch.cat([clean, part])
    assert torch.equal(together.sort(0).values.sum(), images.sort(0).values.sum())  # a partition of the batch
    assert {tuple(x.flatten()[:8].tolist()) for x in together} == {tuple(x.flatten()[:8].tolist()) for x in images}


@pytest.mark.slow
def test_fraction_is_honoured_and_seeded(tmp_path, recorder):
    extra = ["domains.part.type=record_input_test", "domains.part.fraction=0.25", "trainer.max_steps=3"]
    assert train(REPO / "recipes" / "vanilla.yaml", tmp_path / "a", *extra) == 0
    first = list(recorder)
    recorder.clear()
    assert train(REPO / "recipes" / "vanilla.yaml", tmp_path / "b", *extra) == 0
    assert [x.shape[0] for x in first] == [4, 4, 4]  # a quarter of 16
    assert all(torch.equal(a, b) for a, b in zip(first, recorder, strict=True))  # same seed, same choice
    assert not torch.equal(first[0], first[1])


def _fast_trainer(tmp_path, *overrides: str) -> Trainer:
    cfg = load_recipe(FAST, [*TINY, "domains.adv.random_start=0", "domains.adv.attack_bn=train",
                             "domains.adv.fraction=1.0", *overrides])  # fmt: skip
    return build_trainer(cfg, tmp_path / "run")


def test_reused_attack_gradient_equals_the_separately_computed_one(tmp_path):
    with _fast_trainer(tmp_path, "optim.grad_normalization=domain_mean") as trainer:
        images, labels = next(iter(trainer.data.train.epoch_batches(0)))
        images = images.float() / 255
        domain, spec = trainer.step.domains["adv"], next(s for s in trainer.step.specs if s.name == "adv")
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        trainer.model.train()
        ledger = trainer.update.begin()  # zeroes the gradients
        at = trainer.step.position(step=0, epoch=0)
        ctx = trainer.step.context(spec, at, torch.Generator().manual_seed(0), ledger)
        adv, _ = domain.generate(images, labels, ctx)
        reused = [None if p.grad is None else p.grad.clone() for p in params]
        with ctx.attack_mode("train"):
            loss = ctx.loss(ctx.forward(images), labels)  # the attack's one step starts at the clean images
        expected = torch.autograd.grad(0.5 * loss, params, allow_unused=True)
        assert sum(g is not None for g in reused) > 10
        for got, want in zip(reused, expected, strict=True):
            assert (got is None) == (want is None)
            if got is not None:
                assert_close(got, want)
        domain.reuse_grad = 0.0  # the attack itself does not change
        ctx = trainer.step.context(spec, at, torch.Generator().manual_seed(0), ledger)
        assert torch.equal(domain.generate(images, labels, ctx)[0], adv)


def test_reuse_needs_an_untargeted_attack():
    with pytest.raises(ValueError, match="reuse_grad needs targeted=false"):
        mbn.create_domain("pgd", reuse_grad=0.5, targeted=True)


def test_sample_mean_divides_each_owner_by_its_samples():
    net = mbn.convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2)),
                            ["clean", "adv"])  # fmt: skip
    net(torch.randn(2, 3, 5, 5))
    norm = SampleMeanGradients(net)
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    norm.divide({SHARED: 10.0, ("bn", "clean"): 8.0, ("bn", "adv"): 2.0})
    bn = net[1]
    assert_close(bn.bns["clean"].weight.grad, torch.full((4,), 1 / 8))
    assert_close(bn.bns["adv"].weight.grad, torch.full((4,), 1 / 2))
    assert_close(net[0].weight.grad, torch.full_like(net[0].weight, 1 / 10))


@pytest.mark.slow
def test_nan_between_logging_steps_stops_before_a_bad_checkpoint(tmp_path, capsys, scratch_registry):
    @mbn.register_domain("nan_at_test")
    class NanAt(mbn.Domain):
        def generate(self, images, labels, ctx):
            return (images * float("nan") if ctx.step == 4 else images), labels

    code = train(REPO / "recipes" / "vanilla.yaml", tmp_path / "run", "domains.bad.type=nan_at_test",
                 "domains.bad.bn=clean", "trainer.log_every=100", "trainer.checkpoint_every_steps=2",
                 "trainer.max_steps=12")  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "non-finite images in domain 'bad' at step 5" in err, err
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["state"]["step"] == 4  # the checkpoint before the NaN step; the one after was refused
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
