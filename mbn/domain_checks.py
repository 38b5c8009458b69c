"""Checks of what a domain plugin returns, run once per domain (its first batch), each error naming the domain.

A plugin's ``generate`` must return ``(images, targets)``: at least one image, float ``(N, C, H, W)`` in [0, 1]
of the input's dtype (or a half type), device, channels and size (batches of all domains are concatenated);
targets of length N on the same device, either class indices (int64 ``(N,)`` in ``[0, K)``) or probabilities
(float ``(N, K)``, non-negative, rows summing to 1), K being the size of the head that scores the domain. Later
batches are not checked, so the step stays free of host synchronisation; a NaN later is caught by the trainer's
finite-loss check.

:class:`ModelGuard` checks, after every ``generate`` and for free (host-side flags and PyTorch's version counters),
that the domain left the model as it found it: every module's train/eval mode, every parameter, and every buffer
(BN statistics) unless the domain asked to update statistics through ``ctx.attack_mode("train_update")``.
"""

from __future__ import annotations

import signal
from typing import Any

import torch
from torch import Tensor, nn

from mbn.errors import DomainError, first_line


def check_domain_output(name: str, out: Any, source: Tensor, num_targets: int) -> tuple[Tensor, Tensor]:
    """Validate one ``generate`` result against its input batch; returns it unchanged.

    Args:
        name: the domain's name in the recipe.
        out: what ``generate`` returned.
        source: the images it was given, ``(N, C, H, W)``.
        num_targets: outputs of the head that scores this domain (K).

    Raises:
        DomainError: the first violation, naming the domain and what was expected.
    """

    def fail(problem: str) -> DomainError:
        return DomainError(f"domain {name!r}: generate() returned {problem}")

    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise fail(f"{type(out).__name__}; expected a pair (images, targets)")
    images, targets = out
    if not isinstance(images, Tensor) or not isinstance(targets, Tensor):
        raise fail(f"({type(images).__name__}, {type(targets).__name__}); expected two tensors")
    if images.dtype not in (source.dtype, torch.float16, torch.bfloat16):
        raise fail(f"images of dtype {images.dtype}; expected {source.dtype} images in [0, 1] (as its input)")
    if images.ndim != 4 or images.shape[1:] != source.shape[1:]:
        raise fail(f"images of shape {tuple(images.shape)}; expected (N, {', '.join(map(str, source.shape[1:]))})")
    if images.device != source.device or targets.device != source.device:
        raise fail(f"tensors on {images.device}/{targets.device}; expected them on {source.device}")
    if images.shape[0] == 0:
        raise fail("an empty batch; expected at least one image")
    if targets.shape[0] != images.shape[0]:
        raise fail(f"{targets.shape[0]} targets for {images.shape[0]} images")
    if images.numel():
        low, high = torch.aminmax(images.detach())
        low_v, high_v = float(low), float(high)  # one host sync, first batch only
        if not (low_v == low_v and high_v == high_v) or low_v < -1e-4 or high_v > 1 + 1e-4:
            hint = " (0-255 pixel values?)" if high_v > 2 else ""
            raise fail(f"images in [{low_v:.4g}, {high_v:.4g}]{hint}; expected values in [0, 1]")
    _check_targets(targets, num_targets, fail)
    return images, targets


def _check_targets(targets: Tensor, num_targets: int, fail: Any) -> None:
    if targets.is_floating_point():
        if targets.ndim != 2 or targets.shape[1] != num_targets:
            raise fail(
                f"float targets of shape {tuple(targets.shape)}; expected class indices (N,) or "
                f"probabilities (N, {num_targets})"
            )
        sums = targets.detach().float().sum(1)
        smallest, worst = float(targets.min()), float((sums - 1).abs().max())
        if not smallest >= -1e-6 or not worst <= 1e-3:
            raise fail(
                f"soft targets with minimum {smallest:.4g} and row sums off 1 by {worst:.4g}; expected probabilities"
            )
        return
    if targets.dtype != torch.int64 or targets.ndim != 1:
        raise fail(f"targets of dtype {targets.dtype} and shape {tuple(targets.shape)}; expected int64 (N,)")
    if targets.numel():
        low, high = torch.aminmax(targets)
        if int(low) < 0 or int(high) >= num_targets:
            raise fail(f"targets in [{int(low)}, {int(high)}]; expected class indices in [0, {num_targets})")


class ModelGuard:
    """What a domain must not change of the model during ``generate``: modes, parameters, buffers.

    Args:
        model: the trained model (unwrapped), as the domains see it through ``ctx.model``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = list(model.named_modules())
        self.params = list(model.named_parameters())
        self.buffers = list(model.named_buffers())

    def generate(self, domain: Any, name: str, kind: str, x: Tensor, y: Tensor, ctx: Any, step: int) -> Any:
        """``domain.generate(x, y, ctx)``, stopped with one line naming the domain if it fails or changes too much.

        A domain must not change its input images (shared with other domains) or the model (:meth:`check`).

        Raises:
            DomainError: naming the domain, its type and the (1-based) ``step``.
        """
        version = x._version  # in-place writes bump it: the input is shared with other domains
        before = self.snapshot()  # modes and version counters: free, no device work
        try:
            made = domain.generate(x, y, ctx)
        except (Exception, SystemExit, KeyboardInterrupt) as err:  # under mbn's handlers a signal is StopSignal
            if "DataLoader worker" in str(err):  # a worker died (signal, OOM killer): not the domain's fault
                raise
            if isinstance(err, KeyboardInterrupt) and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                raise  # Python's own Ctrl-C handler (a second Ctrl-C in a script): the user's, not the domain's
            raise DomainError(
                f"domain {name!r} (type {kind!r}) failed at step {step}: {type(err).__name__}: {first_line(err)}"
            ) from err
        if x._version != version:
            raise DomainError(
                f"domain {name!r} changed its input images in place; other domains share them: return a "
                "new tensor (images * 0.5, not images.mul_(0.5))"
            )
        self.check(name, before, stats_updates=bool(ctx.stats_updates))
        return made

    def snapshot(self) -> tuple[list[bool], list[int], list[int]]:
        """The modes and version counters now (no device work)."""
        return (
            [m.training for _, m in self.modules],
            [p._version for _, p in self.params],
            [b._version for _, b in self.buffers],
        )

    def check(self, name: str, before: tuple[list[bool], list[int], list[int]], stats_updates: bool) -> None:
        """Raise if domain ``name`` changed the model since ``before`` (buffers allowed with ``stats_updates``).

        Raises:
            DomainError: naming the domain and the first module, parameter or buffer it changed.
        """
        modes, params, buffers = self.snapshot()
        if modes != before[0]:
            module, now = next(
                (n, m.training) for (n, m), was in zip(self.modules, before[0], strict=True) if m.training != was
            )
            where = f"module {module!r}" if module else "the model"
            raise DomainError(
                f"domain {name!r} left {where} in {'train' if now else 'eval'} mode after generate(); the trainer "
                "would train in that mode: use ctx.attack_mode('eval') (it restores the mode) or restore it yourself"
            )
        if params != before[1]:
            param = next(n for (n, p), was in zip(self.params, before[1], strict=True) if p._version != was)
            raise DomainError(
                f"domain {name!r} changed the model's parameter {param!r} in place during generate(); a domain may "
                "read the model, only the optimiser updates it"
            )
        if buffers != before[2] and not stats_updates:
            buffer = next(n for (n, b), was in zip(self.buffers, before[2], strict=True) if b._version != was)
            raise DomainError(
                f"domain {name!r} changed the model's buffer {buffer!r} (BN statistics) during generate(); run its "
                "forwards in ctx.attack_mode('eval') or ctx.attack_mode('train'), or in "
                "ctx.attack_mode('train_update') to update the statistics on purpose"
            )
