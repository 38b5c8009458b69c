"""mbn: multi-domain N-BatchNorm training (AdvProp, Xie et al., CVPR 2020, generalised to N sources)."""

from importlib.metadata import PackageNotFoundError, version

from mbn import attacks
from mbn.convert import convert_model, convert_sync_batchnorm, export_model
from mbn.domain import Domain, DomainContext
from mbn.heads import attach_heads, forward_heads
from mbn.norm import MultiSourceBatchNorm
from mbn.objective import Objective
from mbn.registry import available_domains, create_domain, get_domain_class, register_domain
from mbn.routing import eval_mode, frozen_stats, model_sources, multi_source_norms, split_sources, use_source
from mbn.timm_models import register_when_timm_is_imported

register_when_timm_is_imported()  # mbn's CIFAR ResNets in timm's registry, once timm is imported


def __getattr__(name: str) -> object:
    """``mbn.load_exported``, imported on first use (it pulls in the export package)."""
    if name == "load_exported":
        from mbn.export.load import load_exported

        return load_exported
    raise AttributeError(f"module 'mbn' has no attribute {name!r}")


try:
    __version__ = version("mbn-advprop")  # one source of truth: pyproject.toml
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"

__all__ = [
    "Domain",
    "DomainContext",
    "MultiSourceBatchNorm",
    "Objective",
    "attach_heads",
    "attacks",
    "available_domains",
    "convert_model",
    "convert_sync_batchnorm",
    "create_domain",
    "eval_mode",
    "export_model",
    "forward_heads",
    "frozen_stats",
    "get_domain_class",
    "load_exported",
    "model_sources",
    "multi_source_norms",
    "register_domain",
    "split_sources",
    "use_source",
]
