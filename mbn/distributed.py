"""Data-parallel training under ``torchrun``: the process group, rank roles and the collectives the trainer uses.

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; :func:`init_from_env` joins the process group
(NCCL on CUDA, gloo on CPU) plus a gloo group for host-side control flags (stop requests), so agreeing on a
stop never waits on the device. A single process (no ``torchrun``, or ``--nproc_per_node=1``) gets the trivial
:class:`DistContext` and every helper is a no-op, so single-process behaviour is unchanged.

Rank 0 alone writes the run directory; every rank trains on its own shard of the global epoch order
(:class:`mbn.data.ResumableBatches`) and DistributedDataParallel averages the gradients.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


@dataclass(frozen=True)
class DistContext:
    """This process's place in the training job, and the collectives the trainer runs among the ranks.

    It is passed to whatever needs it (never read from a module global): :func:`init_from_env` makes it. A single
    process gets ``DistContext()``, on which every collective is a no-op.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    control: Any = None  # gloo process group for host-side flags (None: the default group is gloo already)

    @property
    def enabled(self) -> bool:
        """More than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The rank that writes the run directory, TensorBoard, metrics and checkpoints."""
        return self.rank == 0

    def mean_over_ranks(self, values: Tensor) -> Tensor:
        """``values`` averaged over the ranks, in place (logging windows; a host read follows anyway)."""
        if self.enabled:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
            values /= self.world_size
        return values

    def min_over_ranks(self, values: Tensor) -> Tensor:
        """Element-wise minimum over the ranks, in place."""
        if self.enabled:
            dist.all_reduce(values, op=dist.ReduceOp.MIN)
        return values

    def max_flag(self, value: int) -> int:
        """The largest of every rank's ``value`` (a host-side int: stop requests), through the control group."""
        if not self.enabled:
            return value
        flag = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control)
        return int(flag.item())

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (picklable objects, through the control group)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (picklable objects: a run directory, test accuracies)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.control)
        return box[0]

    def barrier(self) -> None:
        """Wait for every rank (host-side)."""
        if self.enabled:
            dist.barrier(group=self.control)

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Rank 0's buffers (BN running statistics) on every rank: one broadcast per dtype, no host sync.

        The trainer calls it at the start of every step, so attacks (which run before the DDP forward) see the same
        statistics on every rank, and a resume, which loads rank 0's checkpoint everywhere, continues exactly.
        """
        if not self.enabled:
            return
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for buffer in module.buffers():
            by_dtype.setdefault(buffer.dtype, []).append(buffer)
        for tensors in by_dtype.values():
            flat = _flatten_dense_tensors(tensors)
            dist.broadcast(flat, src=0)
            for tensor, value in zip(tensors, _unflatten_dense_tensors(flat, tensors), strict=True):
                tensor.copy_(value)

    def add_mean_over_ranks(self, grads: dict[Tensor, Tensor]) -> None:
        """Add each ``{parameter: gradient}`` entry, averaged over the ranks, to the parameter's ``.grad``.

        For gradients computed outside DistributedDataParallel's backward (Fast AdvProp's reused attack gradients):
        one flat all-reduce. Every rank holds the same parameters in the same order (the same domains ran on every
        rank).
        """
        params = list(grads)
        values = [grads[p] for p in params]
        if self.enabled and values:
            flat = _flatten_dense_tensors(values)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= self.world_size
            values = list(_unflatten_dense_tensors(flat, values))
        for p, g in zip(params, values, strict=True):
            p.grad = g.clone() if p.grad is None else p.grad.add_(g)

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (a data set download, a decoded-image cache), the other ranks after it."""
        if self.enabled and not self.is_main:
            self.barrier()
        yield
        if self.enabled and self.is_main:
            self.barrier()


def env_world_size() -> int:
    """``WORLD_SIZE`` as set by torchrun (1 when unset or malformed)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def resume_command(run_dir: object) -> str:
    """How to resume ``run_dir``: ``mbn-train --resume RUN``, under torchrun with the run's number of processes."""
    world = env_world_size()
    if world == 1:
        return f"mbn-train --resume {run_dir}"
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))
    except ValueError:
        local = world
    nodes = f"--nnodes={world // local} ... " if world > local else "--standalone "
    return f"torchrun {nodes}--nproc_per_node={local} -m mbn.cli.train --resume {run_dir}"


def init_from_env(device: str = "auto") -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment; a no-op for one process.

    Args:
        device: the recipe's ``trainer.device``; CUDA devices use NCCL (each rank on ``cuda:LOCAL_RANK``),
            ``cpu`` uses gloo.
    """
    world = env_world_size()
    if world == 1:
        return DistContext()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return DistContext(rank=rank, world_size=world, local_rank=local, control=control)


def shutdown() -> None:
    """Leave the process group (at exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: torch.device, ctx: DistContext) -> torch.device:
    """``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun; other devices stay."""
    if ctx.enabled and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device
