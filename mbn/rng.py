"""Random draws from a seeded generator that land on another device.

A :class:`torch.Generator` only samples on its own device; the trainer's generator lives on the training device,
but a test or a CPU-side helper may pass a CPU generator for CUDA images (or the reverse). Each function here draws
on ``generator.device`` (on ``device`` when there is no generator: torch's global generator of that device) and
then moves the result to ``device``, so a draw depends only on the generator's state, never on where the data
lives. The signatures are torch's own, ``generator`` and ``device`` being keywords.
:class:`~mbn.domain.DomainContext` has the same four as methods on ``ctx.generator``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Device = torch.device | str | None


def draw_device(generator: torch.Generator | None, device: Device) -> Device:
    """Where a draw happens: the generator's device, else ``device`` (None: torch's default device)."""
    return generator.device if generator is not None else device


def _land(draw: Tensor, device: Device) -> Tensor:
    return draw if device is None else draw.to(device)


def rand(
    shape: Sequence[int], *, generator: torch.Generator | None, device: Device = None, dtype: torch.dtype | None = None
) -> Tensor:
    """Uniform ``[0, 1)`` draws of ``shape`` from ``generator``, moved to ``device`` (None: left where drawn).

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> rand((2,), generator=g, device="cpu").shape
        torch.Size([2])
    """
    where = draw_device(generator, device)
    return _land(torch.rand(tuple(shape), generator=generator, device=where, dtype=dtype), device)


def randn(
    shape: Sequence[int], *, generator: torch.Generator | None, device: Device = None, dtype: torch.dtype | None = None
) -> Tensor:
    """Standard normal draws of ``shape`` from ``generator``, moved to ``device`` (None: left where drawn)."""
    where = draw_device(generator, device)
    return _land(torch.randn(tuple(shape), generator=generator, device=where, dtype=dtype), device)


def randint(
    low: int, high: int, shape: Sequence[int], *, generator: torch.Generator | None, device: Device = None
) -> Tensor:
    """int64 draws of ``shape`` uniform in ``[low, high)`` from ``generator``, moved to ``device``."""
    where = draw_device(generator, device)
    return _land(torch.randint(low, high, tuple(shape), generator=generator, device=where), device)


def randperm(n: int, *, generator: torch.Generator | None, device: Device = None) -> Tensor:
    """A random permutation of ``0 .. n-1`` (int64) from ``generator``, moved to ``device``."""
    where = draw_device(generator, device)
    return _land(torch.randperm(n, generator=generator, device=where), device)
