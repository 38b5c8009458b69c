"""Where the step runs: the device, the ranks, the training forward (DDP or not), autocast and per-draw seeding.

:class:`Runtime` is built once by :func:`mbn.train.build.build_trainer` and shared by the step, the update, the
hooks and the checkpoints. It decides nothing about *what* a step computes; it only says how a forward, a
seed or a batch reaches the device.
"""

from __future__ import annotations

import contextlib
import inspect
import random
import re
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from mbn.data import to_device
from mbn.distributed import DistContext
from mbn.errors import DomainError
from mbn.heads import forward_heads
from mbn.objective import CLASSES

Batch = tuple[Tensor, Tensor]

#: torch's refusal to train a BatchNorm layer on one value per channel (one image of a 1x1 feature map)
ONE_VALUE_PER_CHANNEL = "Expected more than 1 value per channel when training"
#: What to lower when a step runs out of memory (the memory of a step grows with each)
MEMORY_KEYS = (
    "lower data.batch_size (optim.grad_accum_steps keeps the images per update), data.image_size or model.width"
)


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The RNG seed of draw ``step`` (domains, dropout, kornia draws) on process ``rank``.

    Rank 0 (and a single process) draws what a one-process run draws; every other rank its own stream.
    """
    base = (seed * 1_000_003 + step) % (2**63 - 1)
    return base if rank == 0 else (base + rank * 0x9E3779B97F4A7C15) % (2**63 - 1)


class HeadsForward(nn.Module):
    """``(images, heads) -> {head: logits}`` as one module, so DistributedDataParallel sees every head's use."""

    def __init__(self, model: nn.Module, forward_model: Any) -> None:
        super().__init__()
        self.model = model
        self._forward_model = forward_model  # model itself or its compiled wrapper: the same parameters, counted once

    def forward(self, x: Tensor, heads: tuple[str, ...]) -> dict[str, Tensor]:
        """``{head: logits}`` of one forward."""
        if heads == (CLASSES,):
            return {CLASSES: self._forward_model(x)}
        return forward_heads(self._forward_model, x, heads)


class Runtime:
    """The model on its device, its training forward, and how randomness and batches reach that device.

    Args:
        model: the converted model, already on ``device``.
        device: this rank's device.
        dist: this process's place among the ranks (passed in, never read from a global).
        seed: ``trainer.seed``; every draw of randomness is seeded from ``(seed, draw, rank)``.
        amp: ``trainer.amp`` (``none``, ``bf16`` or ``fp16``).
        channels_last: ``trainer.channels_last``.
        compile: ``trainer.compile`` (the training forward goes through ``torch.compile``).
        find_unused_parameters: DDP's search for parameters a step leaves without a gradient.
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        dist: DistContext,
        *,
        seed: int,
        amp: str = "none",
        channels_last: bool = False,
        compile: bool = False,
        find_unused_parameters: bool = False,
    ) -> None:
        self.model, self.device, self.dist, self.seed = model, device, dist, seed
        self.channels_last = channels_last
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.generator = torch.Generator(device)  # the domains' randomness, re-seeded for every draw
        self.heads_forward = HeadsForward(model, torch.compile(model) if compile else model)
        self.ddp: DistributedDataParallel | None = None
        if dist.enabled:  # attacks use the unwrapped model: no gradient all-reduce while attacking
            self.ddp = DistributedDataParallel(
                self.heads_forward,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=find_unused_parameters,
                **_no_buffer_sync(),  # done at the start of each step instead, before the attacks
            )

    def to_device(self, batch: Batch) -> Batch:
        """A host batch on the training device (``(B, C, H, W)`` in [0, 1], channels-last if asked)."""
        return to_device(batch, self.device, self.channels_last)

    def seed_draw(self, draw: int) -> torch.Generator:
        """Seed torch's generators, numpy's and Python's global ones for ``draw``; returns the domains' generator.

        numpy's and Python's global generators are what many augmentation libraries draw from: seeded per draw,
        a plugin using them is reproducible and resumes bit for bit.
        """
        seed = step_seed(self.seed, draw, self.dist.rank)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        # Only the generators in use: torch.manual_seed also walks every accelerator backend (~1.5 ms).
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            torch.cuda.default_generators[index].manual_seed(seed)
        return self.generator.manual_seed(seed)

    def sync_buffers(self) -> None:
        """Under DDP, every rank takes rank 0's BN statistics (before the attacks of a step)."""
        if self.ddp is not None:
            self.dist.broadcast_buffers(self.model)

    def forward(self, x: Tensor, heads: tuple[str, ...]) -> dict[str, Tensor]:
        """The training forward (through DDP when it wraps the model): ``{head: logits}``."""
        with self.autocast():
            try:
                return (self.ddp or self.heads_forward)(x, heads)
            except (RuntimeError, ValueError) as err:  # BatchNorm's one-value check raises a ValueError
                ddp_unused = self.ddp is not None and not self.ddp.find_unused_parameters
                if ddp_unused and "find_unused_parameters=True" in str(err):
                    raise DomainError(
                        "some model parameters got no gradient in the last step (a forward that skips them); "
                        "set trainer.find_unused_parameters=true"
                    ) from err
                n, *image = x.shape  # (N, C, H, W)
                explained = step_size_error(err, f"the training forward of {n} images of {_dims(image)} on {x.device}")
                if explained is not None:
                    raise explained from err
                raise

    def backward(self, loss: Tensor) -> None:
        """``loss.backward()`` through the gradient scaler (fp16); running out of memory names the keys to lower."""
        try:
            self.scaler.scale(loss).backward()
        except RuntimeError as err:
            explained = step_size_error(err, f"the backward pass on {self.device}")
            if explained is None:
                raise
            raise explained from err

    def no_sync(self, keep_local: bool) -> contextlib.AbstractContextManager[Any]:
        """Under DDP, ``keep_local`` keeps a micro-batch's gradients on its rank (one all-reduce per step)."""
        return self.ddp.no_sync() if keep_local and self.ddp is not None else contextlib.nullcontext()

    def autocast(self, attack: bool = False) -> contextlib.AbstractContextManager[Any]:
        """Mixed precision as ``trainer.amp`` asks; fp16 attack gradients underflow without a scaler: fp32 then."""
        if self.amp_dtype is None or (attack and self.amp_dtype is torch.float16):
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def close(self) -> None:
        """Drop DDP now, while the process group its reducer uses still exists (not at interpreter exit)."""
        self.ddp = None


def _no_buffer_sync() -> dict[str, Any]:
    """DDP's argument skipping its buffer broadcast in forward (``forward_sync_buffers``, else the older name)."""
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def allocation_failure(err: BaseException) -> str | None:
    """What an out-of-memory error says it tried to allocate (``"20.00 GiB"``; ``""`` when it does not say).

    None for any other error. CUDA's :class:`torch.cuda.OutOfMemoryError` (a RuntimeError), the CPU allocator's
    RuntimeError (``DefaultCPUAllocator: can't allocate memory``) and numpy's/Python's :class:`MemoryError` count.
    """
    text = str(err)
    if "DataLoader worker" in text:  # a worker killed (perhaps by the OOM killer): mbn.cli.train says so
        return None
    oom = isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError))  # torch.OutOfMemoryError from 2.5 on
    if not (oom or "can't allocate memory" in text or "out of memory" in text.lower()):
        return None
    size = re.search(r"allocate (\d+(?:\.\d+)? [KMGTPE]?i?B)\b", text)  # CUDA, MPS, numpy: "allocate 20.00 GiB"
    if size:
        return size.group(1)
    count = re.search(r"allocate (\d+) bytes", text)  # the CPU allocator: "you tried to allocate 360000000000 bytes"
    return size_text(int(count.group(1))) if count else ""


def out_of_memory_message(err: BaseException, what: str, advice: str) -> str | None:
    """``out of memory <what> (tried to allocate 2.00 GiB); <advice>`` for an out-of-memory error, else None.

    The one wording of every out-of-memory line: building the data or the model, a step, the evaluation forward.
    """
    tried = allocation_failure(err)
    if tried is None:
        return None
    return f"out of memory {what}{f' (tried to allocate {tried})' if tried else ''}; {advice}"


def step_size_error(err: BaseException, where: str) -> DomainError | None:
    """One line naming the recipe keys for what a step's sizes cause; None for any other error.

    Memory the device does not have (CUDA, the CPU allocator), and a BatchNorm layer given one value per channel
    (a BN source trained on one image while the network's feature map is 1x1: torch cannot take batch statistics).
    The run stops with exit status 1 (:class:`DomainError`); the recipe checks refuse the cases that can never fit
    before anything is written (:func:`mbn.plan.check_step_sizes`).
    """
    text = str(err)
    if ONE_VALUE_PER_CHANNEL in text:
        shape = re.search(r"torch\.Size\(\[([\d, ]+)\]\)", text)
        seen = f" (input {_dims(int(d) for d in shape.group(1).split(','))})" if shape else ""
        return DomainError(
            f"{where}: a BatchNorm layer got one value per channel{seen} and cannot normalise it in training; every BN "
            "source needs 2 or more images a step: raise data.batch_size, or the fraction of the domain that gets one "
            "image (domains.<name>.fraction)"
        )
    message = out_of_memory_message(err, f"in {where}", MEMORY_KEYS)
    return None if message is None else DomainError(message)


def size_text(size: int) -> str:
    """Bytes as people read them: ``"335.3 GiB"``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} EiB"


def _dims(sizes: Any) -> str:
    return "x".join(str(int(d)) for d in sizes)
