"""Tests for the pgd / fgsm / gd domains: BN routing and modes, statistics, labels, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mbn
from mbn import attacks
from mbn.domain import DomainContext
from mbn.objective import Objective
from tests.nets import TinyNet

SOURCES = ("clean", "adv")


def make_model(seed: int = 0) -> nn.Module:
    """A converted model in train mode whose clean and adv BNs differ (statistics and affine)."""
    torch.manual_seed(seed)
    net = TinyNet()
    with torch.no_grad():
        net.body[-1].weight.mul_(20.0)  # confident logits, so small perturbations move the loss
    net = mbn.convert_model(net, SOURCES)
    with torch.no_grad():
        for source, shift in (("clean", 0.0), ("adv", 0.3)):
            with mbn.use_source(net, source):
                for _ in range(3):
                    net(torch.rand(32, 3, 16, 16) * 0.7 + shift)
        for norm in mbn.multi_source_norms(net):
            norm.bns["adv"].weight.mul_(torch.rand(norm.num_features) * 2 + 0.2)
            norm.bns["adv"].bias.add_(torch.randn(norm.num_features) * 0.5)
    return net.train()


def make_batch(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


def context(model: nn.Module, bn: str = "adv", seed: int = 0, **kwargs) -> DomainContext:
    return DomainContext(model=model, bn=bn, generator=torch.Generator().manual_seed(seed), num_classes=10, **kwargs)


def stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def assert_stats_equal(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], sources=SOURCES) -> None:
    for key, value in before.items():
        if any(f".bns.{s}." in key for s in sources):
            assert torch.equal(value, after[key]), key


@pytest.mark.slow
def test_registered():
    registered = mbn.available_domains()
    for name in ("pgd", "fgsm", "gd"):
        assert name in registered
        domain = mbn.create_domain(name)
        assert type(domain).name == name
        assert domain.heads() == {}  # the plain attack needs no auxiliary head


def test_pgd_defaults_are_advprop_pgd5():
    domain = mbn.create_domain("pgd")
    assert (domain.eps, domain.steps, domain.step_size, domain.norm) == (4.0, 5, 1.0, "linf")
    assert (domain.attack_bn, domain.targeted, domain.random_start) == ("eval", True, 0.8)


@pytest.mark.parametrize("name", ["pgd", "gd", "fgsm"])
@pytest.mark.parametrize("attack_bn", ["eval", "train"])
def test_running_stats_of_all_sources_untouched(name, attack_bn):
    model = make_model()
    images, labels = make_batch()
    before = stats(model)
    adv, out_labels = mbn.create_domain(name, attack_bn=attack_bn).generate(images, labels, context(model))
    assert_stats_equal(before, stats(model))
    assert model.training and all(m.training for m in model.modules())  # modes restored
    assert not torch.equal(adv, images)
    assert torch.equal(out_labels, labels)


def test_train_update_changes_adv_stats_only():
    model = make_model()
    images, labels = make_batch()
    before = stats(model)
    mbn.create_domain("pgd", attack_bn="train_update").generate(images, labels, context(model, bn="adv"))
    after = stats(model)
    assert_stats_equal(before, after, sources=("clean",))
    changed = [k for k in before if ".bns.adv." in k and not torch.equal(before[k], after[k])]
    assert any("running_mean" in k for k in changed)
    assert any("num_batches_tracked" in k for k in changed)


@pytest.mark.parametrize("attack_bn", ["eval", "train"])
def test_outcome_depends_on_the_domains_bn(attack_bn):
    model = make_model()
    images, labels = make_batch()
    domain = mbn.create_domain("pgd", attack_bn=attack_bn, random_start=False)
    through_adv, _ = domain.generate(images, labels, context(model, bn="adv"))
    through_clean, _ = domain.generate(images, labels, context(model, bn="clean"))
    assert (through_adv != through_clean).float().mean().item() > 0.05


@pytest.mark.parametrize("attack_bn", ["eval", "train"])
def test_equals_attack_on_hand_routed_model(attack_bn):
    """The domain is exactly mbn.attacks.pgd through the adv BN in the requested mode, in pixel/255 units."""
    model = make_model()
    images, labels = make_batch()
    adv, _ = mbn.create_domain("pgd", attack_bn=attack_bn).generate(images, labels, context(model, seed=3))

    g = torch.Generator().manual_seed(3)
    targets = attacks.random_wrong_labels(labels, 10, g)
    mode = mbn.eval_mode(model) if attack_bn == "eval" else mbn.frozen_stats(model)
    with mbn.use_source(model, "adv"), mode:
        expected = attacks.pgd(
            model,
            images,
            targets,
            eps=4 / 255,
            steps=5,
            step_size=1 / 255,
            random_start=0.8,
            targeted=True,
            generator=g,
        )
    torch.testing.assert_close(adv, expected, rtol=0, atol=0)


def test_eval_mode_uses_adv_running_statistics():
    model = make_model()
    images, labels = make_batch()
    domain = mbn.create_domain("pgd", attack_bn="eval", random_start=False, targeted=False)
    first, _ = domain.generate(images, labels, context(model))
    with torch.no_grad():
        for norm in mbn.multi_source_norms(model):
            norm.bns["adv"].running_mean.add_(0.5)
    second, _ = domain.generate(images, labels, context(model))
    assert not torch.equal(first, second)


@pytest.mark.parametrize("attack_bn", ["eval", "train", "train_update"])
def test_parameter_grads_stay_none(attack_bn):
    model = make_model()
    images, labels = make_batch()
    adv, _ = mbn.create_domain("pgd", attack_bn=attack_bn).generate(images, labels, context(model))
    assert all(p.grad is None for p in model.parameters())
    assert not adv.requires_grad


def test_targeted_never_targets_true_class_and_returns_true_labels():
    model = make_model()
    images, labels = make_batch(n=64)
    seen: list[torch.Tensor] = []

    class Recording(Objective):
        def loss(self, logits, targets):
            seen.append(targets.clone())
            return super().loss(logits, targets)

    ctx = context(model, objective=Recording())
    _, out_labels = mbn.create_domain("pgd", targeted=True, steps=3).generate(images, labels, ctx)
    assert len(seen) == 3
    for target in seen:
        assert not (target == labels).any()
        assert torch.equal(target, seen[0])  # one target per sample for the whole attack
    assert torch.equal(out_labels, labels)

    seen.clear()
    mbn.create_domain("pgd", targeted=False, steps=2).generate(images, labels, ctx)
    assert all(torch.equal(target, labels) for target in seen)


@pytest.mark.parametrize("name", ["pgd", "gd", "fgsm"])
def test_attack_raises_loss_through_adv_bn(name):
    model = make_model()
    images, labels = make_batch()
    ctx = context(model)
    adv, _ = mbn.create_domain(name, targeted=False, attack_bn="eval").generate(images, labels, ctx)
    with torch.no_grad(), mbn.eval_mode(model):
        clean_loss = F.cross_entropy(ctx.forward(images), labels).item()
        adv_loss = F.cross_entropy(ctx.forward(adv), labels).item()
    assert adv_loss > clean_loss + 0.2


@pytest.mark.parametrize("name", ["pgd", "gd", "fgsm"])
def test_budget_in_pixel_units(name):
    model = make_model()
    images, labels = make_batch()
    adv, _ = mbn.create_domain(name, eps=6, random_start=True).generate(images, labels, context(model))
    delta = (adv - images).abs()
    assert delta.max().item() <= 6 / 255 and delta.max().item() > 5 / 255
    step = {} if name == "fgsm" else dict(step_size=16)  # fgsm's default step is eps
    adv, _ = mbn.create_domain(name, eps=64, norm="l2", **step).generate(images, labels, context(model))
    norms = (adv - images).flatten(1).norm(dim=1)
    assert bool((norms <= 64 / 255 * (1 + 1e-6)).all()) and norms.max().item() > 32 / 255
    assert adv.min().item() >= 0 and adv.max().item() <= 1


def test_deterministic_given_generator_seed():
    model = make_model()
    images, labels = make_batch()
    domain = mbn.create_domain("pgd")
    a, _ = domain.generate(images, labels, context(model, seed=11))
    b, _ = domain.generate(images, labels, context(model, seed=11))
    c, _ = domain.generate(images, labels, context(model, seed=12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_unknown_parameter_is_named():
    with pytest.raises(ValueError, match="epz"):
        mbn.create_domain("pgd", epz=4)
    with pytest.raises(ValueError, match="steps"):
        mbn.create_domain("fgsm", steps=3)  # single-step attack takes no steps


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("pgd", dict(eps=-1), "eps"),
        ("pgd", dict(eps="4"), "eps"),
        ("pgd", dict(steps=0), "steps"),
        ("gd", dict(steps=2.5), "steps"),
        ("pgd", dict(step_size=-1), "step_size"),
        ("pgd", dict(norm="l1"), "norm"),
        ("pgd", dict(attack_bn="frozen"), "attack_bn"),
        ("pgd", dict(targeted="yes"), "targeted"),
        ("pgd", dict(random_start=1.5), "random_start"),
        ("fgsm", dict(step_size=-2), "step_size"),
        ("fgsm", dict(eps=float("nan")), "eps"),
    ],
)
def test_bad_values(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        mbn.create_domain(name, **kwargs)
