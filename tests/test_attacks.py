"""Tests for mbn.attacks: projection exactness, strength vs torchattacks, gradients and validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mbn
from mbn import attacks
from mbn.extras import TORCHATTACKS
from tests.nets import TinyNet

EPS = 8 / 255
ALPHA = 2 / 255


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = TinyNet()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            net(torch.rand(32, 3, 16, 16))
        net.body[-1].weight.mul_(20.0)  # confident logits, so small perturbations move the loss
    return net.eval()


def make_batch(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 16, 16, generator=g)
    images[:, :, :3] = 0.0  # pixels at the box edges exercise the box clamp
    images[:, :, -3:] = 1.0
    return images, torch.randint(0, 10, (n,), generator=g)


def mean_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return F.cross_entropy(model(images), labels).item()


def per_sample_l2(delta: torch.Tensor) -> torch.Tensor:
    return delta.flatten(1).norm(dim=1)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return make_model()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return make_batch()


@pytest.mark.parametrize("attack", ["pgd", "gd", "fgsm"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_attack_raises_loss(model, batch, attack, norm):
    images, labels = batch
    eps, step = (EPS, ALPHA) if norm == "linf" else (1.0, 0.25)
    if attack == "fgsm":
        adv = attacks.fgsm(model, images, labels, eps=eps, norm=norm)
    else:
        adv = getattr(attacks, attack)(model, images, labels, eps=eps, steps=5, step_size=step, norm=norm)
    assert mean_loss(model, adv, labels) > mean_loss(model, images, labels) + 0.2


def test_targeted_lowers_target_loss(model, batch):
    images, labels = batch
    targets = attacks.random_wrong_labels(labels, 10, torch.Generator().manual_seed(0))
    adv = attacks.pgd(model, images, targets, eps=EPS, steps=5, step_size=ALPHA, targeted=True)
    assert mean_loss(model, adv, targets) < mean_loss(model, images, targets) - 0.2


@pytest.mark.parametrize("random_start", [False, True, 0.5])
@pytest.mark.parametrize("attack", ["pgd", "gd", "fgsm"])
def test_linf_ball_and_box_exact(model, batch, random_start, attack):
    images, labels = batch
    g = torch.Generator().manual_seed(3)
    for eps in (EPS, 4 / 255, 0.1, 0.0):
        if attack == "fgsm":
            adv = attacks.fgsm(model, images, labels, eps=eps, random_start=random_start, generator=g)
        else:
            fn = getattr(attacks, attack)
            adv = fn(model, images, labels, eps=eps, steps=3, step_size=eps / 2, random_start=random_start, generator=g)
        delta = (adv - images).abs()
        assert bool((delta <= eps).all()), f"eps={eps}: max |delta| {delta.max().item()!r}"
        assert delta.max().item() <= eps
        assert adv.min().item() >= 0.0 and adv.max().item() <= 1.0
        if eps > 0:
            assert delta.max().item() > 0.5 * eps  # the attack actually used the budget


@pytest.mark.parametrize("random_start", [False, True, 0.5])
@pytest.mark.parametrize("attack", ["pgd", "gd", "fgsm"])
def test_l2_ball_and_box(model, batch, random_start, attack):
    images, labels = batch
    g = torch.Generator().manual_seed(4)
    for eps in (0.5, 2.0):
        if attack == "fgsm":
            adv = attacks.fgsm(model, images, labels, eps=eps, norm="l2", random_start=random_start, generator=g)
        else:
            fn = getattr(attacks, attack)
            adv = fn(
                model,
                images,
                labels,
                eps=eps,
                steps=3,
                step_size=eps / 2,
                norm="l2",
                random_start=random_start,
                generator=g,
            )
        norms = per_sample_l2(adv - images)
        assert bool((norms <= eps * (1 + 1e-6)).all()), norms.max().item()
        assert norms.max().item() > 0.5 * eps
        assert adv.min().item() >= 0.0 and adv.max().item() <= 1.0


@pytest.mark.parametrize(
    ("norm", "ref_cls", "eps", "alpha"),
    [("linf", "PGD", EPS, ALPHA), ("l2", "PGDL2", 0.5, 0.1)],
)
def test_strength_matches_torchattacks(norm, ref_cls, eps, alpha):
    # in no extra (its requests pin); the dev setup and .ci/run install it with --no-deps
    ref_cls = getattr(pytest.importorskip("torchattacks", reason=f"the reference attacks: {TORCHATTACKS}"), ref_cls)
    model = make_model(seed=5)
    images, labels = make_batch(n=32, seed=6)
    ours = attacks.pgd(model, images, labels, eps=eps, steps=10, step_size=alpha, norm=norm)
    ref = ref_cls(model, eps=eps, alpha=alpha, steps=10, random_start=False)(images, labels)
    ours_loss, ref_loss = mean_loss(model, ours, labels), mean_loss(model, ref, labels)
    assert ours_loss > mean_loss(model, images, labels)
    assert abs(ours_loss - ref_loss) / ref_loss < 0.05, (ours_loss, ref_loss)
    # Same update rule: the images agree except where a float rounding flips a near-zero gradient sign.
    assert (ours - ref).abs().mean().item() < 1e-3 * eps


def test_fgsm_is_one_signed_step(model, batch):
    images, labels = batch
    x = images.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), labels), x)
    expected = torch.clamp(images + EPS * grad.sign(), 0, 1)
    torch.testing.assert_close(attacks.fgsm(model, images, labels, eps=EPS), expected, rtol=0, atol=1e-7)


def test_fgsm_random_start_default_step_is_1_25_eps(model, batch):
    images, labels = batch
    a = attacks.fgsm(model, images, labels, eps=EPS, random_start=True, generator=torch.Generator().manual_seed(0))
    b = attacks.fgsm(
        model,
        images,
        labels,
        eps=EPS,
        random_start=True,
        step_size=1.25 * EPS,
        generator=torch.Generator().manual_seed(0),
    )
    c = attacks.fgsm(
        model, images, labels, eps=EPS, random_start=True, step_size=EPS, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


def test_gd_differs_from_pgd_in_linf_and_equals_it_in_l2(model, batch):
    images, labels = batch
    kw = dict(eps=EPS, steps=3, step_size=ALPHA)
    assert not torch.allclose(attacks.gd(model, images, labels, **kw), attacks.pgd(model, images, labels, **kw))
    kw = dict(eps=1.0, steps=3, step_size=0.2, norm="l2")
    torch.testing.assert_close(attacks.gd(model, images, labels, **kw), attacks.pgd(model, images, labels, **kw))


def test_gd_linf_step_has_sign_step_length(model, batch):
    images, labels = batch
    images = images.clamp(0.2, 0.8)  # away from the box so no clamp shortens the step
    big = 1.0  # ball larger than the step: no projection either
    adv = attacks.gd(model, images, labels, eps=big, steps=1, step_size=ALPHA)
    expected = torch.full((images.shape[0],), ALPHA * images[0].numel() ** 0.5)
    torch.testing.assert_close(per_sample_l2(adv - images), expected, rtol=1e-4, atol=0)


def test_random_start_probability_is_per_sample(model):
    images, labels = make_batch(n=400, seed=7)
    images = images.clamp(0.1, 0.9)

    def started(p):
        adv = attacks.pgd(
            model,
            images,
            labels,
            eps=EPS,
            steps=1,
            step_size=0.0,
            random_start=p,
            generator=torch.Generator().manual_seed(0),
        )
        return (adv != images).flatten(1).any(dim=1)

    assert not started(False).any()
    assert started(True).all()
    fraction = started(0.5).float().mean().item()
    assert 0.4 < fraction < 0.6
    adv = attacks.pgd(model, images, labels, eps=EPS, steps=1, step_size=0.0, random_start=True)
    assert (adv - images).abs().max().item() > 0.95 * EPS  # uniform over the whole ball


def test_parameter_grads_untouched_and_output_detached(batch):
    model = make_model()
    images, labels = batch
    images = images.clone().requires_grad_(True)
    adv = attacks.pgd(model, images, labels, eps=EPS, steps=2, step_size=ALPHA)
    assert all(p.grad is None for p in model.parameters())
    assert images.grad is None
    assert not adv.requires_grad and adv.grad_fn is None


def test_works_under_no_grad_and_keeps_dtype(batch):
    model = make_model().double()
    images, labels = batch
    with torch.no_grad():
        adv = attacks.pgd(model, images.double(), labels, eps=EPS, steps=2, step_size=ALPHA, random_start=True)
    assert adv.dtype == torch.float64
    assert (adv - images.double()).abs().max().item() <= EPS


def test_works_through_converted_model(batch):
    images, labels = batch
    net = mbn.convert_model(make_model(), ("clean", "adv"))
    with mbn.use_source(net, "adv"):
        adv = attacks.pgd(net, images, labels, eps=EPS, steps=2, step_size=ALPHA)
    assert mean_loss(net, adv, labels) > mean_loss(net, images, labels)


def test_deterministic_given_seed(model, batch):
    images, labels = batch

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return attacks.pgd(model, images, labels, eps=EPS, steps=2, step_size=ALPHA, random_start=0.7, generator=g)

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_random_wrong_labels_never_true_and_uniform():
    labels = torch.arange(10).repeat(900)
    targets = attacks.random_wrong_labels(labels, 10, torch.Generator().manual_seed(0))
    assert not (targets == labels).any()
    assert targets.min().item() >= 0 and targets.max().item() <= 9
    counts = torch.zeros(10, 10)
    counts.index_put_((labels, targets), torch.ones(len(labels)), accumulate=True)
    off_diagonal = counts[~torch.eye(10, dtype=torch.bool)]
    assert off_diagonal.min().item() > 60 and off_diagonal.max().item() < 140  # expected 100 each
    two = attacks.random_wrong_labels(torch.tensor([0, 1, 1, 0]), 2)
    assert torch.equal(two, torch.tensor([1, 0, 0, 1]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(eps=-0.1), "eps"),
        (dict(steps=0), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(step_size=-1.0), "step_size"),
        (dict(norm="l3"), "norm"),
        (dict(random_start=1.5), "random_start"),
    ],
)
def test_bad_arguments(model, batch, kwargs, match):
    images, labels = batch
    args = dict(eps=EPS, steps=2, step_size=ALPHA) | kwargs
    with pytest.raises(ValueError, match=match):
        attacks.pgd(model, images, labels, **args)


def test_bad_arguments_fgsm_and_labels(model, batch):
    images, labels = batch
    with pytest.raises(ValueError, match="eps"):
        attacks.fgsm(model, images, labels, eps=-1.0)
    with pytest.raises(ValueError, match="num_classes"):
        attacks.random_wrong_labels(labels, 1)
    with pytest.raises(ValueError, match="labels"):
        attacks.random_wrong_labels(torch.tensor([0, 12]), 10)
