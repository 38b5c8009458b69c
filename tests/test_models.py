"""Tests for mbn.models: CIFAR ResNets, torchvision/timm factories and the normalising wrapper."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mbn
from mbn.config import ModelCfg
from mbn.models import ImageClassifier, ModelConfigError, cifar_resnet, create_model

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "width", "num_params"),
    [
        # Reference sizes: ResNet-20 0.27M (He et al. 2016, Table 6), CIFAR ResNet-18 11.17M.
        ("cifar_resnet8", 16, 78_042),
        ("cifar_resnet20", 16, 272_474),
        ("cifar_resnet18", 64, 11_173_962),
    ],
)
def test_cifar_resnets_shapes_and_sizes(name: str, width: int, num_params: int) -> None:
    model = create_model(ModelCfg(name=name, width=width), 10, MEAN, STD)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert _params(model) == num_params
    assert all(k.startswith("net.") for k in model.state_dict())
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    stem = model.net.conv1
    assert (stem.kernel_size, stem.stride) == ((3, 3), (1, 1))


def test_width_applies_and_num_classes() -> None:
    model = create_model(ModelCfg(name="cifar_resnet8", width=8), 7, MEAN, STD)
    assert model.net.conv1.out_channels == 8
    assert model.net.fc.in_features == 32  # 4w after three stages
    assert model(torch.rand(3, 3, 32, 32)).shape == (3, 7)


@pytest.mark.parametrize("name", ["torchvision.resnet18", "timm.resnet18"])
def test_library_models(name: str) -> None:
    model = create_model(ModelCfg(name=name), 100, MEAN, STD)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 100)


def test_models_convert_to_multi_source() -> None:
    model = create_model(ModelCfg(name="cifar_resnet8", width=8), 10, MEAN, STD)
    num_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    mbn.convert_model(model, ("clean", "adv"))
    assert len(mbn.multi_source_norms(model)) == num_bn == 1 + 3 * 2 + 2  # stem, 2 per block, 2 projections


def test_normalisation_matches_manual() -> None:
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    model = ImageClassifier(nn.Identity(), mean, std)
    x = torch.rand(4, 3, 8, 8)
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), expected)
    assert model(x.double()).dtype == torch.float64
    assert model.state_dict() == {}  # mean/std are non-persistent


def test_normalisation_buffers_follow_the_module() -> None:
    model = ImageClassifier(nn.Identity(), MEAN, STD).to(torch.float64)
    assert model.mean.dtype == torch.float64
    assert set(dict(model.named_buffers())) == {"mean", "std"}


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("resnet18", "accepted: cifar_resnet18"),
        ("cifar_resnet9", "accepted"),
        ("torchvision.not_a_net", "unknown torchvision model"),
        ("timm.not_a_net", "unknown timm model"),
    ],
)
def test_unknown_model_name(name: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_model(ModelCfg(name=name), 10, MEAN, STD)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="std"):
        ImageClassifier(nn.Identity(), MEAN, (0.1, 0.0, 0.1))
    with pytest.raises(ValueError, match="mean/std"):
        ImageClassifier(nn.Identity(), MEAN, (0.1, 0.1))
    with pytest.raises(ValueError, match="depth"):
        cifar_resnet(21)
    with pytest.raises(ValueError, match="pretrained"):
        create_model(ModelCfg(name="cifar_resnet20", pretrained=True), 10, MEAN, STD)


def test_pretrained_download_failure_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    def offline(*args: object, **kwargs: object) -> nn.Module:
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>\nsecond line")

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(ModelConfigError, match=r"could not load torchvision weights") as info:
        create_model(ModelCfg(name="torchvision.resnet18", pretrained=True), 10, MEAN, STD)
    assert "\n" not in str(info.value)
    assert info.value.field == "pretrained"


def test_pretrained_torchvision_head_is_resized(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    real = torchvision.models.get_model

    def fake_pretrained(name: str, weights: str | None = None, **kwargs: object) -> nn.Module:
        assert weights == "DEFAULT"
        return real(name, **kwargs)  # 1000-class ImageNet head, as the weights have

    monkeypatch.setattr(torchvision.models, "get_model", fake_pretrained)
    model = create_model(ModelCfg(name="torchvision.resnet18", pretrained=True), 10, MEAN, STD)
    assert model.net.fc.out_features == 10
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
