"""The ``clean`` domain: the identity source, i.e. the main BN's unmodified batch (AdvProp's clean images)."""

from __future__ import annotations

from torch import Tensor

from mbn.domain import Domain, DomainContext
from mbn.registry import register_domain


@register_domain("clean")
class CleanDomain(Domain):
    """Pass the batch through unchanged; the source for the clean (main) BatchNorm (Xie et al. 2020)."""

    def generate(self, images: Tensor, labels: Tensor, ctx: DomainContext) -> tuple[Tensor, Tensor]:
        """Return ``(images, labels)`` as given (no copy)."""
        return images, labels
