"""mbn.testing.check_domain: every built-in domain keeps the plugin contract; each kind of breach is named."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import mbn
from mbn.domain import Domain, DomainContext
from mbn.testing import DomainContractError, check_domain, default_context

#: Parameters beyond the defaults that take another code path (an id per variant).
VARIANTS = {
    "pgd-l2": ("pgd", {"norm": "l2", "eps": 0.5, "step_size": 0.25, "steps": 2}),
    "pgd-reuse-grad": ("pgd", {"targeted": False, "reuse_grad": 0.5, "steps": 2}),
    "pgd-rotation": ("pgd", {"rotation_weight": 0.5, "steps": 2}),
    "fgsm-train-bn": ("fgsm", {"attack_bn": "train_update"}),
    "autoaugment-imagenet": ("autoaugment", {"policy": "imagenet", "interpolation": "bilinear"}),
    "trivialaugment-narrow": ("trivialaugment", {"wide": False}),
}


def _batch(device: torch.device, n: int = 6) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 16, 16, generator=g).to(device), torch.arange(n).to(device) % 10


@pytest.mark.parametrize("name", sorted(mbn.available_domains()))
def test_builtin_domain_keeps_the_contract(name, device):
    images, labels = _batch(device)
    out, targets = check_domain(name, images, labels)
    assert out.device == images.device and targets.shape[0] == out.shape[0]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_builtin_domain_variant_keeps_the_contract(variant, device):
    name, params = VARIANTS[variant]
    check_domain(mbn.create_domain(name, **params), *_batch(device))


@pytest.mark.parametrize("name", ["mixup", "cutmix", "clean"])
def test_soft_labels_in_soft_targets_out(name):
    images, labels = _batch(torch.device("cpu"))
    soft = torch.nn.functional.one_hot(labels, 10).float()
    check_domain(name, images, soft)  # K from the labels' width


def test_a_given_context_is_restored_between_the_two_calls():
    images, labels = _batch(torch.device("cpu"))
    domain = mbn.create_domain("pgd", steps=2, attack_bn="train_update")  # updates BN running statistics
    ctx = default_context(domain, images, seed=3)
    before = ctx.generator.get_state()
    check_domain(domain, images, labels, ctx)
    assert not torch.equal(ctx.generator.get_state(), before)  # used, and the checks passed: it was reset in between


class _Broken(Domain):
    """A domain that breaks the contract in one way (``how``)."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.name = f"broken_{how}"

    def generate(self, images: Tensor, labels: Tensor, ctx: DomainContext) -> tuple[Tensor, Tensor]:
        how = self.how
        if how == "inplace":
            return images.mul_(0.5), labels
        if how == "inplace_labels":
            return images, labels.add_(1).remainder_(10)
        if how == "range":
            return images * 255, labels
        if how == "negative":
            return images - 0.5, labels
        if how == "dtype":
            return images.double(), labels
        if how == "uint8":
            return (images * 255).to(torch.uint8), labels
        if how == "device":
            return images.to("meta"), labels
        if how == "shape":
            return images[:, :, :8], labels
        if how == "target_shape":
            return images, labels[:, None]
        if how == "target_count":
            return images, labels[:-1]
        if how == "target_range":
            return images, labels + 10
        if how == "soft_width":
            return images, torch.full((len(labels), 3), 1 / 3)
        if how == "not_a_pair":
            return images  # type: ignore[return-value]
        if how == "random":
            return (images + 0.01 * torch.rand(images.shape, device=images.device)).clamp(0, 1), labels
        if how == "grad":
            x = images.clone().requires_grad_(True)
            return (x * 1.0), labels
        if how == "backward":
            ctx.loss(ctx.forward(images), labels).backward()
            return images, labels
        if how == "eval_mode":
            ctx.model.eval()
            return images, labels
        if how == "raises":
            raise RuntimeError("boom\nsecond line")
        raise AssertionError(how)


BREACHES = {
    "inplace": "wrote into its input images in place",
    "inplace_labels": "wrote into its input labels in place",
    "range": r"images in \[0.0\d+, 255\] \(0-255 pixel values\?\); expected values in \[0, 1\]",
    "negative": r"images in \[-0.4\d+, 0.4\d+\]; expected values in \[0, 1\]",
    "dtype": "images of dtype torch.float64; expected torch.float32",
    "uint8": "images of dtype torch.uint8",
    "device": "tensors on meta/cpu; expected them on cpu",
    "shape": r"images of shape \(6, 3, 8, 16\); expected \(N, 3, 16, 16\)",
    "target_shape": r"targets of dtype torch.int64 and shape \(6, 1\); expected int64 \(N,\)",
    "target_count": "5 targets for 6 images",
    "target_range": r"targets in \[10, 15\]; expected class indices in \[0, 10\)",
    "soft_width": r"float targets of shape \(6, 3\); expected class indices \(N,\) or probabilities \(N, 10\)",
    "not_a_pair": "returned Tensor; expected a pair",
    "random": "two calls with equally seeded generators returned different batches",
    "grad": "tensors that require grad; detach",
    "backward": r"wrote parameter gradients \(.*\.grad\)",
    "eval_mode": "left the model in eval mode",
    "raises": "generate\\(\\) raised RuntimeError: boom$",
}


@pytest.mark.parametrize("how", sorted(BREACHES))
def test_a_breach_fails_with_one_line_naming_it(how):
    images, labels = _batch(torch.device("cpu"))
    with pytest.raises(DomainContractError, match=BREACHES[how]) as info:
        check_domain(_Broken(how), images, labels)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"domain 'broken_{how}': ")
    assert isinstance(info.value, AssertionError)  # a plain assertion failure to pytest


def test_the_caller_rng_is_left_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check_domain("clean", *_batch(torch.device("cpu")))
    assert torch.equal(torch.rand(3), expected)


def test_images_that_are_not_a_float_batch_are_a_value_error():
    with pytest.raises(ValueError, match=r"images must be a float .* got Tensor of shape \(2, 3, 4, 4\)$"):
        check_domain("clean", torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))


def test_labels_that_are_not_a_tensor_of_the_batch_are_a_value_error():
    with pytest.raises(ValueError, match=r"labels must be an int64 .* got list"):
        check_domain("clean", torch.rand(2, 3, 4, 4), [0, 1])
    with pytest.raises(ValueError, match=r"labels must be .* got Tensor of shape \(3,\)"):
        check_domain("clean", torch.rand(2, 3, 4, 4), torch.zeros(3, dtype=torch.long))


def test_the_plugins_doc_example_passes(scratch_registry, monkeypatch):
    import re
    import sys
    import types
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    domain_block, test_block = re.findall(r"```python\n(.*?)```", text, flags=re.S)[:2]
    scope: dict = {}
    exec(domain_block, scope)
    package = types.ModuleType("my_package.domains")
    package.ColorJitter = scope["ColorJitter"]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "my_package", types.ModuleType("my_package"))
    monkeypatch.setitem(sys.modules, "my_package.domains", package)
    tests: dict = {}
    exec(test_block, tests)
    tests["test_color_jitter_keeps_the_contract"](0.3)
