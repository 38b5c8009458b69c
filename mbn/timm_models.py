"""mbn's CIFAR ResNets in timm's model registry, so ``timm.create_model`` builds and loads them after ``import mbn``.

Registered names carry an ``mbn_`` prefix that timm's own models never use: ``mbn_cifar_resnet8``, ``14``, ``20``,
``32``, ``44``, ``56``, ``110``, ``18``, ``34`` (keyword arguments ``num_classes``, ``width``, ``in_chans``) and
``mbn_cifar_resnet`` for any other depth (``layers=[n, n, n]``). A folder written by ``mbn-export`` from a CIFAR
ResNet names one of them in its ``config.json``, so::

    import mbn, timm
    model = timm.create_model("local-dir:exported/", pretrained=True)

works in a fresh process. Importing timm costs about a second, and ``mbn-eval`` does without it, so
``import mbn`` does not import timm: it registers at once when timm is already imported, and otherwise right after
timm's own import finishes (a one-shot import hook, :func:`register_when_timm_is_imported`).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from torch import nn

#: Depths with a name of their own; others go through ``mbn_cifar_resnet`` with ``layers``.
NAMED_DEPTHS = (8, 14, 20, 32, 44, 56, 110, 18, 34)
GENERIC = "mbn_cifar_resnet"

# CIFAR-10's statistics: what a fresh model's data config says (an export replaces them with its run's own)
_CIFAR10_MEAN, _CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _cfg(**overrides: Any) -> dict[str, Any]:
    cfg = {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": _CIFAR10_MEAN,
        "std": _CIFAR10_STD,
        "first_conv": "conv1",
        "classifier": "fc",
        "origin_url": "https://arxiv.org/abs/1911.09665",
    }
    return {**cfg, **overrides}


def architecture_name(depth: int) -> str:
    """The registered name of the CIFAR ResNet of this depth (``mbn_cifar_resnet`` when it has none)."""
    return f"mbn_cifar_resnet{depth}" if depth in NAMED_DEPTHS else GENERIC


def _build(variant: str, layers: Sequence[int], pretrained: bool, default_width: int, **kwargs: Any) -> nn.Module:
    from timm.models import build_model_with_cfg

    from mbn.models import CifarResNet

    kwargs.setdefault("width", default_width)
    return build_model_with_cfg(CifarResNet, variant, pretrained, layers=list(layers), **kwargs)


def _named(depth: int) -> Callable[..., nn.Module]:
    name = architecture_name(depth)
    width = 64 if depth in (18, 34) else 16

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        from mbn.models import cifar_resnet_layers

        return _build(name, cifar_resnet_layers(depth), pretrained, width, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = f"The CIFAR ResNet-{depth} of mbn (3x3 stem, no max-pool; base width {width})."
    entrypoint.__module__ = __name__
    return entrypoint


def mbn_cifar_resnet(pretrained: bool = False, layers: Sequence[int] = (3, 3, 3), **kwargs: Any) -> nn.Module:
    """The CIFAR ResNet of mbn with ``layers`` blocks per stage (base width 16 unless ``width`` is given)."""
    return _build(GENERIC, layers, pretrained, 16, **kwargs)


ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {architecture_name(d): _named(d) for d in NAMED_DEPTHS}
ENTRYPOINTS[GENERIC] = mbn_cifar_resnet
globals().update(ENTRYPOINTS)  # timm's register_model finds each entrypoint and its cfg in this module
default_cfgs = {name: _cfg() for name in ENTRYPOINTS}


def register() -> None:
    """Add mbn's CIFAR ResNets to timm's registry (idempotent)."""
    from timm.models import is_model, register_model

    for name, fn in ENTRYPOINTS.items():
        if not is_model(name):
            register_model(fn)


class _RegisterAfterTimm(importlib.abc.MetaPathFinder):
    """Finds timm like the other finders, with a loader that runs :func:`register` once timm's import finishes.

    A probe (``importlib.util.find_spec("timm")``, as many libraries do) gets a spec and changes nothing; the finder
    leaves ``sys.meta_path`` only once timm is imported.
    """

    def __init__(self) -> None:
        self._searching = False

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if fullname != "timm" or self._searching:
            return None
        self._searching = True  # importlib.util.find_spec asks every finder, this one included
        try:
            spec = importlib.util.find_spec("timm")
        finally:
            self._searching = False
        if spec is None or spec.loader is None:
            return None
        spec.loader = _ThenRegister(spec.loader, self)
        return spec


class _ThenRegister(importlib.abc.Loader):
    """timm's own loader, followed by :func:`register`."""

    def __init__(self, loader: importlib.abc.Loader, finder: _RegisterAfterTimm) -> None:
        self._loader, self._finder = loader, finder

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self._loader  # timm's own loader from now on
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self._finder)
        register()


def register_when_timm_is_imported() -> None:
    """Register now if timm is imported, else right after it is (``import mbn`` calls this)."""
    if "timm" in sys.modules and hasattr(sys.modules["timm"], "create_model"):
        register()
    elif not any(isinstance(finder, _RegisterAfterTimm) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTimm())
