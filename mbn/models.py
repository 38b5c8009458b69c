"""Model zoo: CIFAR ResNets, torchvision and timm networks, wrapped with in-model input normalisation.

CIFAR ResNets use a 3x3 stem without max-pool. ``cifar_resnet18``/``cifar_resnet34`` are the standard
CIFAR variants of He et al. (CVPR 2016) ResNet-18/34 (BasicBlock stages [2,2,2,2]/[3,4,6,3], widths
w, 2w, 4w, 8w), as used by the AdvProp/adversarial-training literature on CIFAR; ``cifar_resnet{6n+2}``
(8, 14, 20, 32, 44, 56, 110) are the 3-stage CIFAR ResNets of He et al. §4.2 (widths w, 2w, 4w) with
1x1-conv projection shortcuts (option B) instead of the paper's zero-padding shortcuts. Every norm layer
is a plain ``BatchNorm2d``; :func:`mbn.convert_model` turns them into multi-source BNs later.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchvision.models.resnet import BasicBlock

from mbn.config import ModelCfg
from mbn.errors import first_line


class ImageClassifier(nn.Module):
    """A network taking float images in [0, 1] that normalises them internally.

    Keeping ``(x - mean) / std`` inside the model lets attacks and augmentations work in pixel
    space. ``mean``/``std`` are non-persistent buffers, so state-dict keys are the wrapped network's
    under ``net.``.

    Args:
        net: the network; it receives normalised NCHW images.
        mean: per-channel mean in [0, 1] units.
        std: per-channel standard deviation in [0, 1] units (all > 0).

    Raises:
        ValueError: if ``mean`` and ``std`` differ in length or a std is not positive.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or not mean:
            raise ValueError(f"mean/std: expected equal non-empty lengths, got {len(mean)} and {len(std)}")
        if min(std) <= 0:
            raise ValueError(f"std: expected positive values, got {list(std)}")
        self.net = net
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.mean: torch.Tensor
        self.std: torch.Tensor

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` in ``x``'s dtype."""
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for float images in [0, 1] of shape (N, C, H, W)."""
        return self.net(self.normalize(x))


class CifarResNet(nn.Module):
    """ResNet with a 3x3 stride-1 stem and no max-pool, built from torchvision's ``BasicBlock``.

    Args:
        layers: number of blocks per stage; stage ``i`` has ``width * 2**i`` channels and stride 2
            from the second stage on.
        num_classes: output logits.
        width: channels of the stem and the first stage.
        in_chans: input channels.
        global_pool: only ``avg`` (timm records and passes this argument).

    The attributes and methods timm's tools look for (``num_classes``, ``num_features``, ``global_pool``,
    ``forward_features``, ``forward_head``, ``get_classifier``, ``reset_classifier``) are there, so the
    network also serves as a timm model (:mod:`mbn.timm_models`).
    """

    def __init__(
        self, layers: Sequence[int], num_classes: int = 10, width: int = 64, in_chans: int = 3, global_pool: str = "avg"
    ) -> None:
        super().__init__()
        if width < 1 or num_classes < 1 or in_chans < 1:
            raise ValueError(
                f"width/num_classes/in_chans: expected positive values, got {width}, {num_classes} and {in_chans}"
            )
        if global_pool != "avg":
            raise ValueError(f"global_pool: only 'avg' is offered, got {global_pool!r}")
        self.num_classes, self.in_chans, self.global_pool = num_classes, in_chans, "avg"
        self.conv1 = nn.Conv2d(in_chans, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages, channels = [], width
        for i, blocks in enumerate(layers):
            planes, stride = width * 2**i, 1 if i == 0 else 2
            stages.append(self._stage(channels, planes, blocks, stride))
            channels = planes
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = channels
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        first = BasicBlock(inplanes, planes, stride, downsample)
        return nn.Sequential(first, *(BasicBlock(planes, planes) for _ in range(blocks - 1)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map for normalised NCHW images."""
        return self.layers(self.relu(self.bn1(self.conv1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooled features (``pre_logits``) or logits from a feature map."""
        x = torch.flatten(self.pool(x), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for normalised NCHW images."""
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The final linear layer."""
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh linear layer with ``num_classes`` outputs (only average pooling is offered)."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool: only 'avg' is offered, got {global_pool!r}")
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes)


def cifar_resnet18(num_classes: int = 10, width: int = 64) -> CifarResNet:
    """CIFAR ResNet-18 (BasicBlock [2, 2, 2, 2], widths w..8w; 11.2M parameters at w=64)."""
    return CifarResNet([2, 2, 2, 2], num_classes, width)


def cifar_resnet34(num_classes: int = 10, width: int = 64) -> CifarResNet:
    """CIFAR ResNet-34 (BasicBlock [3, 4, 6, 3], widths w..8w)."""
    return CifarResNet([3, 4, 6, 3], num_classes, width)


def cifar_resnet(depth: int, num_classes: int = 10, width: int = 16) -> CifarResNet:
    """He et al.'s 3-stage CIFAR ResNet of depth ``6n + 2`` (widths w, 2w, 4w).

    Raises:
        ValueError: if ``depth`` is not of the form ``6n + 2`` with n >= 1.
    """
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth: expected 6n+2 (8, 14, 20, 32, 44, 56, 110), got {depth}")
    n = (depth - 2) // 6
    return CifarResNet([n, n, n], num_classes, width)


def cifar_resnet20(num_classes: int = 10, width: int = 16) -> CifarResNet:
    """CIFAR ResNet-20 (3 stages of 3 blocks; 0.27M parameters at w=16)."""
    return cifar_resnet(20, num_classes, width)


def cifar_resnet8(num_classes: int = 10, width: int = 16) -> CifarResNet:
    """CIFAR ResNet-8 (3 stages of 1 block; 78k parameters at w=16), for fast CPU runs."""
    return cifar_resnet(8, num_classes, width)


_ACCEPTED = "cifar_resnet18, cifar_resnet34, cifar_resnet<6n+2> (8, 20, 56, ...), torchvision.<name>, timm.<name>"


class ModelConfigError(ValueError):
    """A bad ``model`` setting; ``field`` names the setting (``name`` or ``pretrained``), the message does not."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def cifar_depth(name: str) -> int | None:
    """The depth of a CIFAR ResNet model name (``cifar_resnet20`` -> 20); None for other names or bad depths."""
    match = re.fullmatch(r"cifar_resnet(\d+)", name)
    if match is None:
        return None
    depth = int(match.group(1))
    return depth if depth in (18, 34) or (depth >= 8 and (depth - 2) % 6 == 0) else None


def cifar_resnet_layers(depth: int) -> list[int]:
    """Blocks per stage of the CIFAR ResNet of this depth: 18, 34, or 6n+2 (three stages of n).

    Raises:
        ValueError: any other depth.
    """
    if depth == 18:
        return [2, 2, 2, 2]
    if depth == 34:
        return [3, 4, 6, 3]
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth: expected 6n+2 (8, 14, 20, 32, 44, 56, 110), 18 or 34, got {depth}")
    return [(depth - 2) // 6] * 3


def check_model_config(cfg: ModelCfg) -> None:
    """Check ``cfg.name`` (and ``pretrained`` for it) without building anything or downloading weights.

    Raises:
        ModelConfigError: unknown name, bad depth, or ``pretrained`` for a CIFAR ResNet.
    """
    name = cfg.name
    if name.startswith("torchvision."):
        if name.removeprefix("torchvision.") not in torchvision.models.list_models():
            raise ModelConfigError("name", f"unknown torchvision model {name!r} (see torchvision.models.list_models())")
        _check_kwargs(cfg)
        return
    if name.startswith("timm."):
        _check_timm_name(name.removeprefix("timm."))
        _check_kwargs(cfg)
        return
    for key in model_kwargs(cfg):
        raise ModelConfigError(
            f"kwargs.{str(key)[:80]}",
            f"{name} takes no keyword arguments (model.kwargs is for timm.* and torchvision.*)",
        )
    if cifar_depth(name) is None:
        hint = " (depth: expected 6n+2, e.g. 8, 20, 56, or 18/34)" if name.startswith("cifar_resnet") else ""
        raise ModelConfigError("name", f"unknown model {name!r}{hint}; accepted: {_ACCEPTED}")
    if cfg.pretrained:
        raise ModelConfigError("pretrained", f"no pretrained weights for {name!r}; set model.pretrained=false")


def model_kwargs(cfg: ModelCfg) -> dict[str, Any]:
    """``model.kwargs`` as a plain dict: keyword arguments of the network's constructor."""
    kwargs = getattr(cfg, "kwargs", None) or {}
    plain = OmegaConf.to_container(kwargs, resolve=True) if isinstance(kwargs, DictConfig) else kwargs
    assert isinstance(plain, dict)
    return {str(k): v for k, v in plain.items()}


def _check_kwargs(cfg: ModelCfg) -> None:
    """The network's constructor takes every ``model.kwargs`` key: it is built once on the meta device (no memory)."""
    kwargs = model_kwargs(cfg)
    if not kwargs:
        return
    for key in ("num_classes", "pretrained", "weights", "in_chans", "features_only"):
        if key in kwargs:
            raise ModelConfigError(
                f"kwargs.{key}", "set by mbn (the data's classes and RGB images, model.pretrained, a classifier)"
            )
    for key in ("drop_rate", "drop_path_rate", "attn_drop_rate", "proj_drop_rate", "dropout", "stochastic_depth_prob"):
        value = kwargs.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1):
            raise ModelConfigError(f"kwargs.{key}", f"a probability in [0, 1), got {str(value)[:80]!r}")
    name = cfg.name
    try:
        with torch.device("meta"):
            if name.startswith("timm."):
                import timm

                timm.create_model(name.removeprefix("timm.").partition(".")[0], pretrained=False, **kwargs)
            else:
                torchvision.models.get_model(name.removeprefix("torchvision."), **kwargs)
    except TypeError as err:
        match = re.search(r"unexpected keyword argument '([^']+)'", str(err))
        if match is None:
            raise ModelConfigError("kwargs", f"{name} refused them ({first_line(err)})") from None
        key = match.group(1)
        raise ModelConfigError(f"kwargs.{key[:80]}", f"{name} takes no argument {key[:80]!r}") from None
    except Exception as err:  # a value the constructor refuses
        raise ModelConfigError("kwargs", f"{name} refused them ({first_line(err)})") from None


def _replace_head(net: nn.Module, num_classes: int) -> None:
    """Swap the last ``nn.Linear`` of a pretrained torchvision net for a fresh one with ``num_classes`` outputs."""
    name, head = next(((n, m) for n, m in reversed(list(net.named_modules())) if isinstance(m, nn.Linear)), ("", None))
    if head is None:
        raise ModelConfigError("name", f"cannot find a Linear classifier head to resize to {num_classes} classes")
    parent_name, _, attr = name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    setattr(parent, attr, nn.Linear(head.in_features, num_classes, bias=head.bias is not None))


def _download_error(source: str, name: str, err: Exception, hint: str) -> ModelConfigError:
    detail = first_line(err)
    return ModelConfigError(
        "pretrained", f"could not load {source} weights for {name!r} ({type(err).__name__}: {detail}); {hint}"
    )


def _torchvision_net(name: str, num_classes: int, pretrained: bool, kwargs: Mapping[str, Any]) -> nn.Module:
    if not pretrained:
        return torchvision.models.get_model(name, num_classes=num_classes, **kwargs)
    try:
        net = torchvision.models.get_model(name, weights="DEFAULT", **kwargs)
    except Exception as err:  # urllib / hash errors
        hint = "offline? put the weights under $TORCH_HOME/hub/checkpoints or set model.pretrained=false"
        raise _download_error("torchvision", name, err, hint) from None
    if num_classes != 1000:
        _replace_head(net, num_classes)
    return net


def _check_timm_name(name: str) -> None:
    """``<arch>`` or ``<arch>.<tag>`` as timm spells them (``tf_efficientnet_b0.ap_in1k``: AdvProp's weights)."""
    import timm  # imports slowly; only for timm names

    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        raise ModelConfigError("name", f"unknown timm model 'timm.{arch}' (see timm.list_models())")
    if tag and name not in timm.list_pretrained(f"{arch}.*"):
        tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{arch}.*")]
        raise ModelConfigError("name", f"timm model {arch!r} has no weights tagged {tag!r}; tags: {tags}")


def _timm_weights_cached(name: str) -> bool:
    """Whether timm finds ``name``'s pretrained weights locally (Hugging Face cache or torch hub folder)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return False
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        for filename in ("model.safetensors", "pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(repo, filename, revision=revision or None), str):
                return True
    if isinstance(cfg.url, str) and cfg.url:
        return (Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name).is_file()
    return False


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether a download can be tried: False under ``HF_HUB_OFFLINE=1`` or when one quick direct connection fails.

    Behind a proxy (``HTTPS_PROXY``) or with a mirror (``HF_ENDPOINT``) a direct connection proves nothing, so the
    download is tried (and a failure reported in one line all the same).
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT")):
        return True
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _timm_net(name: str, num_classes: int, pretrained: bool, kwargs: Mapping[str, Any]) -> nn.Module:
    import timm

    if pretrained and not _timm_weights_cached(name) and not hub_reachable():
        raise ModelConfigError(
            "pretrained",
            f"weights for 'timm.{name}' are not in the local cache and huggingface.co cannot be reached (offline?); "
            "download them once where there is a network (HF_HOME names the cache) or set model.pretrained=false",
        )
    try:
        return timm.create_model(name, num_classes=num_classes, pretrained=pretrained, **kwargs)
    except Exception as err:
        if not pretrained:
            raise
        hint = "offline? pre-populate the Hugging Face cache or set model.pretrained=false"
        raise _download_error("timm", name, err, hint) from None


def weights_normalisation(cfg: ModelCfg) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The input mean and std (0-1 units) that ``cfg``'s pretrained weights expect; None without pretrained weights.

    AdvProp's released EfficientNets (``timm.tf_efficientnet_b*.ap_in1k``) expect inputs in [-1, 1]
    (mean 0.5, std 0.5); torchvision's and most timm weights ImageNet's statistics. Read from the weights'
    metadata, nothing is downloaded.
    """
    if not cfg.pretrained:
        return None
    if cfg.name.startswith("timm."):
        from timm.models import get_pretrained_cfg

        pretrained = get_pretrained_cfg(cfg.name.removeprefix("timm."))
        if pretrained is None:
            return None
        return tuple(float(v) for v in pretrained.mean), tuple(float(v) for v in pretrained.std)
    if cfg.name.startswith("torchvision."):
        transforms = torchvision.models.get_model_weights(cfg.name.removeprefix("torchvision.")).DEFAULT.transforms()
        return tuple(float(v) for v in transforms.mean), tuple(float(v) for v in transforms.std)
    return None


def build_network(cfg: ModelCfg, num_classes: int) -> nn.Module:
    """The bare network named by ``cfg.name`` (no normalisation wrapper).

    ``cfg.width`` is the base width of every CIFAR ResNet (recipes for the small nets set 16);
    it is ignored for torchvision and timm models.

    Raises:
        ModelConfigError: unknown name, bad depth, ``pretrained`` for a CIFAR ResNet, or pretrained
            weights that could not be loaded.
    """
    check_model_config(cfg)
    name = cfg.name
    if name.startswith("torchvision."):
        return _torchvision_net(name.removeprefix("torchvision."), num_classes, cfg.pretrained, model_kwargs(cfg))
    if name.startswith("timm."):
        return _timm_net(name.removeprefix("timm."), num_classes, cfg.pretrained, model_kwargs(cfg))
    depth = cifar_depth(name)
    if depth == 18:
        return cifar_resnet18(num_classes, cfg.width)
    if depth == 34:
        return cifar_resnet34(num_classes, cfg.width)
    return cifar_resnet(int(depth), num_classes, cfg.width)  # type: ignore[arg-type]


def create_model(cfg: ModelCfg, num_classes: int, mean: Sequence[float], std: Sequence[float]) -> ImageClassifier:
    """Build ``cfg.name`` with ``num_classes`` outputs, wrapped in an :class:`ImageClassifier`.

    Names: ``cifar_resnet18``, ``cifar_resnet34``, ``cifar_resnet<6n+2>`` (e.g. 8, 20, 56),
    ``torchvision.<name>`` (``torchvision.models.get_model``) and ``timm.<name>``
    (``timm.create_model``). The model keeps plain BatchNorm layers; the trainer converts them.

    Args:
        cfg: model section of the recipe.
        num_classes: number of output logits.
        mean: per-channel input mean in [0, 1] units (the dataset's; ImageNet's for pretrained nets).
        std: per-channel input standard deviation in [0, 1] units.

    Raises:
        ModelConfigError: unknown name, or pretrained weights that could not be loaded.
        ValueError: bad arguments.

    Examples:
        >>> from mbn.config import ModelCfg
        >>> model = create_model(ModelCfg(name="cifar_resnet8", width=16), 10, [0.5] * 3, [0.25] * 3)
        >>> model(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    if num_classes < 1:
        raise ValueError(f"num_classes: expected a positive integer, got {num_classes}")
    return ImageClassifier(build_network(cfg, num_classes), mean, std)
