"""The training engine: domains -> per-BN routed forward -> weighted sum of per-domain losses.

Implements AdvProp's training step (Xie et al. 2020, Algorithm 1) for N domains and BNs.

``Trainer.train_one_epoch`` reads top to bottom: clean batch -> domains (dependency order) ->
one split-batch forward (or one forward per BN) -> weighted loss -> optimiser step -> bookkeeping.
Every step re-seeds the RNGs from ``(trainer.seed, step)``, and the data order and augmentation
depend only on ``(trainer.seed, epoch, index)``, so a resumed run is bit-identical on CPU.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import json
import signal
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from mbn import distributed
from mbn.budget import matched_epochs
from mbn.builders import build_model
from mbn.checkpoint import CheckpointError, load_checkpoint, load_model_state, require_entries
from mbn.config import DomainSpec, RecipeError, save_recipe
from mbn.convert import convert_sync_batchnorm
from mbn.csvlog import CsvScalarLog
from mbn.data import build_data, to_device
from mbn.domain import DomainContext
from mbn.domain_checks import check_domain_output
from mbn.ema import WeightEma
from mbn.errors import (
    STOP_SIGNALS,
    DomainError,
    TrainingDivergedError,
    TrainingInterruptedError,
    first_line,
    one_line,
)
from mbn.eval.accuracy import accuracy
from mbn.fileio import WriteError, atomic_torch_save, atomic_write_text
from mbn.gradnorm import SHARED, SampleMeanGradients
from mbn.heads import forward_heads
from mbn.init_from import init_from_state
from mbn.meter import NonFiniteError, StepMeter, TrainClock
from mbn.models import weights_normalisation
from mbn.objective import CLASSES
from mbn.optim import build_optimizer, build_scheduler
from mbn.plan import RunPlan, plan_run
from mbn.progress import Progress
from mbn.resume import check_resume_config
from mbn.routing import split_sources, use_source
from mbn.rundir import RunLock, check_new_run_dir, clean_run_dir
from mbn.tblog import TensorBoardLogger

Batch = tuple[Tensor, Tensor]


#: Checkpoint entries a resume needs.
RESUME_ENTRIES = ("model", "optimizer", "scheduler", "scaler", "state", "config")


@dataclass
class TrainState:
    """Position in training; saved in every checkpoint."""

    step: int = 0  # optimisation steps done
    epoch: int = 0  # current epoch
    batch: int = 0  # next batch index inside ``epoch``
    best_acc: float = -1.0
    test_acc: dict[str, float] = field(default_factory=dict)
    test_acc_ema: dict[str, float] = field(default_factory=dict)  # the weight average's (ema.decay > 0)
    evaluated_step: int = -1  # the step test_acc belongs to

    def check(self, steps_per_epoch: int) -> None:
        """A position this run can continue from; a ``ValueError`` names the bad field."""
        for name in ("step", "epoch", "batch", "evaluated_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (-1 if name == "evaluated_step" else 0):
                raise ValueError(f"state.{name} = {value!r} is not a position")
        if self.batch > steps_per_epoch:
            raise ValueError(f"state.batch = {self.batch} is past the {steps_per_epoch} batches of an epoch")
        if not isinstance(self.test_acc, dict) or not isinstance(self.test_acc_ema, dict):
            raise ValueError("state.test_acc / state.test_acc_ema are not accuracies")
        if not isinstance(self.best_acc, (int, float)):
            raise ValueError("state.best_acc is not an accuracy")


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The RNG seed of optimisation ``step`` (domains, dropout, kornia draws) on process ``rank``.

    Rank 0 (and a single process) draws what a one-process run draws; every other rank its own stream.
    """
    base = (seed * 1_000_003 + step) % (2**63 - 1)
    return base if rank == 0 else (base + rank * 0x9E3779B97F4A7C15) % (2**63 - 1)


class _HeadsForward(nn.Module):
    """``(images, heads) -> {head: logits}`` as one module, so DistributedDataParallel sees every head's use."""

    def __init__(self, model: nn.Module, forward_model: Any) -> None:
        super().__init__()
        self.model = model
        self._forward_model = forward_model  # model itself or its compiled wrapper: the same parameters, counted once

    def forward(self, x: Tensor, heads: tuple[str, ...]) -> dict[str, Tensor]:
        if heads == (CLASSES,):
            return {CLASSES: self._forward_model(x)}
        return forward_heads(self._forward_model, x, heads)


class Trainer:
    """Builds everything a recipe describes and trains it.

    The trainer holds ``run_dir``'s lock (:class:`mbn.rundir.RunLock`) from construction until :meth:`fit`
    returns or :meth:`close` is called; a new run refuses a directory holding another run's files, and a
    resume refuses recipe changes that alter what was trained (:mod:`mbn.resume`).

    Under ``torchrun`` (:mod:`mbn.distributed`) every rank builds a trainer: each trains on its shard of the
    epoch through DistributedDataParallel (attacks run on the unwrapped model), and rank 0 alone holds the lock
    and writes the run directory.

    Args:
        cfg: a recipe loaded with :func:`mbn.config.load_recipe`.
        run_dir: output directory (``config.yaml``, ``tb/``, ``checkpoints/``, ``metrics.json``).
        resume: continue from ``run_dir/checkpoints/last.pt``.
    """

    def __init__(self, cfg: DictConfig, run_dir: Path, *, resume: bool = False) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        plan = plan_run(cfg, resume=resume)  # every recipe error surfaces here, before the data is read
        self.dist = distributed.current()
        # before anything in run_dir is read or written; the other ranks only read it
        self.lock = RunLock(self.run_dir).acquire() if self.dist.is_main else None
        try:
            self._setup(cfg, plan, resume)
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise

    def _setup(self, cfg: DictConfig, plan: RunPlan, resume: bool) -> None:
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.device = distributed.rank_device(plan.device, self.dist)
        resume_ckpt = self._read_resume_checkpoint(self.ckpt_dir / "last.pt") if resume else None
        self.resumed = resume_ckpt is not None
        if self.dist.is_main:
            if not resume:
                check_new_run_dir(self.run_dir)
            clean_run_dir(self.run_dir)  # temporary files of writes a kill interrupted
        self.specs: list[DomainSpec] = plan.specs
        self.sources = plan.sources
        self.domains, self.objectives, self.heads = plan.domains, plan.objectives, plan.heads
        torch.manual_seed(cfg.trainer.seed)  # model initialisation
        with distributed.main_first():  # a download or a decoded-image cache is written once, by rank 0
            self.data = build_data(
                cfg.data,
                seed=cfg.trainer.seed,
                device=self.device,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
            )
        expected = weights_normalisation(cfg.model)  # pretrained weights expect their own input statistics
        saved = resume_ckpt.get("data") if resume_ckpt is not None else None
        if expected is not None and isinstance(saved, dict) and "mean" in saved and "std" in saved:
            expected = (tuple(saved["mean"]), tuple(saved["std"]))  # a resume keeps what the run was trained with
        if expected is not None and cfg.data.mean is None:
            self.data.stats = replace(self.data.stats, mean=expected[0], std=expected[1])  # and the checkpoint
        self.model = build_model(
            cfg, self.data.num_classes, self.data.mean, self.data.std, self.sources, heads=self.heads
        )
        if cfg.trainer.sync_bn:
            self.model = convert_sync_batchnorm(self.model)  # one SyncBatchNorm per source
        self.model.to(self.device)
        if cfg.trainer.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.forward_model = torch.compile(self.model) if cfg.trainer.compile else self.model
        self._heads_forward = _HeadsForward(self.model, self.forward_model)  # the training forward
        self.ddp: DistributedDataParallel | None = None
        if self.dist.enabled:  # attacks use self.model (contexts below): no gradient all-reduce while attacking
            self.ddp = DistributedDataParallel(
                self._heads_forward,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self._may_leave_parameters_unused(),
                **_no_buffer_sync(),  # done at the start of each step instead, before the attacks
            )
        self.contexts = {
            s.name: DomainContext(
                model=self.model,
                bn=s.bn,
                num_classes=self.data.num_classes,
                objective=self.objectives[s.name],
                accumulate=self._reuse_attack_gradient,
            )
            for s in self.specs
        }
        self.accum_steps = int(cfg.optim.grad_accum_steps)
        self.steps_per_epoch = len(self.data.train) // self.accum_steps  # optimisation steps
        if self.steps_per_epoch == 0:
            raise RecipeError(
                f"key 'optim.grad_accum_steps': {self.accum_steps} batches per optimisation step, but an epoch has "
                f"{len(self.data.train)}; lower it or data.batch_size"
            )
        self.batches_per_epoch = self.steps_per_epoch * self.accum_steps  # a last incomplete group is dropped
        self._micro = 0  # the micro-batch of the step in progress (gradient accumulation)
        self.data_fingerprint = self.data.fingerprint()
        self.epochs = cfg.trainer.epochs  # trainer.budget_of: the epochs costing what the baseline's would
        if cfg.trainer.budget_of:
            self.epochs = matched_epochs(cfg.trainer.epochs, self.specs, self.domains, str(cfg.trainer.budget_of))
        self.total_steps = self.epochs * self.steps_per_epoch
        if cfg.trainer.budget_of:
            self.progress_note = (
                f"trainer.budget_of={cfg.trainer.budget_of}: {self.epochs} epochs cost what {cfg.trainer.epochs} "
                f"of {cfg.trainer.budget_of} would"
            )
        self.optimizer = build_optimizer(self.model, cfg.optim)  # backbone and every head
        self._trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.normalizer = SampleMeanGradients(self.model) if cfg.optim.grad_normalization == "sample_mean" else None
        self.by_name = {s.name: s for s in self.specs}
        self._counts: dict[tuple[str, str], float] = {SHARED: 0.0}
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, self.total_steps, self.steps_per_epoch)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.trainer.amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.trainer.amp == "fp16")
        self.state = TrainState()
        main = self.dist.is_main  # the other ranks write nothing and print nothing
        self.tb = TensorBoardLogger(
            self.run_dir / "tb",
            cfg.logging.tensorboard and main,
            cfg.logging.perturbation_gain,
            csv=CsvScalarLog(self.run_dir / "scalars.csv", enabled=main),  # every logged scalar, also without TB
        )
        self.progress = Progress(cfg.trainer.progress if main else "none", total=self._planned_steps())
        self._stop_signal: int | None = None  # agreed by every rank (a single process: the signal received)
        self._generator = torch.Generator(self.device)  # the domains' randomness, re-seeded every step
        self.meter = StepMeter([spec.name for spec in self.specs], self.device)
        self.clock = TrainClock(self.device, self.dist.world_size)  # images of every rank
        self._wall_at_save = 0.0
        self._checked_domains: set[str] = set()
        self._reused: dict[Tensor, Tensor] = {}
        self._inputs: dict[str, Tensor] = {}  # each domain's input this step (its share with `fraction`)
        self.last_window: dict[str, float] = {}
        self._wall_before = 0.0  # wall time of earlier sessions of a resumed run
        if getattr(self, "progress_note", None):
            self.progress.log(self.progress_note)
        if resume_ckpt is not None:
            self._restore(resume_ckpt, self.ckpt_dir / "last.pt")
        elif plan.init_checkpoint is not None:
            self._init_from(plan.init_path, plan.init_checkpoint)
        self.ema: WeightEma | None = None  # ema.decay: the average starts from the weights training starts from
        if cfg.ema.decay > 0:
            self.ema = WeightEma(self.model, cfg.ema.decay, cfg.ema.warmup)
            if resume_ckpt is not None:
                self._restore_ema(resume_ckpt, self.ckpt_dir / "last.pt")

    # ----------------------------------------------------------------------------------------- loop
    def fit(self) -> dict[str, Any]:
        """Train until ``trainer.epochs`` or ``trainer.max_steps``; returns the final metrics."""
        try:
            finished = self._done() or self.state.epoch >= self.epochs
            idle = self.resumed and finished and self.state.evaluated_step == self.state.step
            if idle and self.dist.is_main:  # a finished run: its config.yaml keeps the recipe it was trained with
                print(
                    f"mbn-train: nothing to train: the run is at step {self.state.step} (epoch {self.state.epoch}) "
                    f"and this recipe stops at {self._planned_steps()} steps ({self.epochs} epochs"
                    + (f", trainer.max_steps={self.cfg.trainer.max_steps})" if self.cfg.trainer.max_steps else ")")
                    + "; raise trainer.epochs or trainer.max_steps to train on",
                    flush=True,
                )
            elif not idle and self.dist.is_main:
                save_recipe(self.cfg, self.run_dir / "config.yaml")  # after every check passed: never a bad recipe
                self.tb.resume_at(self.state.step)  # a resume logs the steps after its checkpoint again
                divergence = bool(self.cfg.logging.divergence_every) and not self.cfg.model.share_stats
                self.tb.layout([s.name for s in self.specs], list(self.sources), divergence=divergence)
                if not self.resumed:  # once per run, not once per session
                    self.tb.recipe(OmegaConf.to_yaml(self.cfg, resolve=True))
            self._wall_start = time.perf_counter()
            with self._signals_save_checkpoint():
                while self.state.epoch < self.epochs and not self._done() and not self.stopping:
                    self.train_one_epoch(self.state.epoch)
                    if self.epoch_done:
                        self.state.epoch, self.state.batch = self.state.epoch + 1, 0
                        if self._eval_due():
                            self.evaluate()
                        self.save_checkpoint()
                if not self.stopping and self.state.evaluated_step != self.state.step:  # max_steps mid-epoch
                    self.evaluate()
                    self.save_checkpoint()
            metrics = self._final_metrics(self._wall_at_save)
            if self.dist.is_main and not (idle and (self.run_dir / "metrics.json").is_file()):
                atomic_write_text(self.run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
            return metrics
        finally:
            self.close()

    def close(self) -> None:
        """Close the progress display and TensorBoard, and release the run directory's lock."""
        self.progress.close()
        self.tb.close()
        self.ddp = None  # its reducer goes now, while the process group it uses still exists (not at interpreter exit)
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def train_one_epoch(self, epoch: int) -> None:
        """Train on ``epoch``'s batches from ``state.batch`` on; returns early at max_steps or Ctrl-C.

        Each optimisation step takes ``optim.grad_accum_steps`` batches (micro-batches): every one is generated,
        forwarded (BN statistics per micro-batch) and back-propagated on its own, and the step applies their
        summed gradients, scaled to the mean over all of them. An epoch's last incomplete group is dropped.
        """
        self.model.train()
        self.clock.start()
        batches = self.data.train.epoch_batches(epoch, self.state.batch)
        stack = contextlib.ExitStack()
        if hasattr(batches, "close"):  # the loader's workers stop when the step count is reached or on a return
            stack.callback(batches.close)
        with stack:
            self._train_groups(itertools.islice(batches, max(0, self.batches_per_epoch - self.state.batch)))

    def _train_groups(self, batches: Iterator[Batch]) -> None:
        """Optimisation steps over ``batches``, ``optim.grad_accum_steps`` at a time."""
        k = self.accum_steps
        group: list[Batch] = []
        for batch in batches:
            group.append(batch)
            if len(group) < k:
                continue
            self.optimizer.zero_grad(set_to_none=True)  # before the domains: an attack may add reused gradients
            self._counts = {SHARED: 0.0}  # weighted samples per parameter owner (grad_normalization=sample_mean)
            self._reused = {}  # attack gradients kept for the update (under DDP; see _reuse_attack_gradient)
            for micro, micro_batch in enumerate(group):
                last = micro == k - 1
                with self._no_gradient_sync() if not last else contextlib.nullcontext():
                    outputs, images = self._micro_step(micro_batch, micro)
            group = []
            self.optimizer_step()
            self.state.step += 1
            self.state.batch += k
            self._after_step(outputs, images)
            self._agree_stop()
            if self._done() or self.stopping:
                return

    def _micro_step(self, batch: Batch, micro: int) -> tuple[dict[str, Batch], Tensor]:
        """Generate, forward and back-propagate one (micro-)batch; its gradients add to ``.grad``."""
        self._seed_step(micro)
        if self.ddp is not None:
            distributed.broadcast_buffers(self.model)  # every rank attacks with rank 0's BN statistics
        images, labels = to_device(batch, self.device, self.cfg.trainer.channels_last)  # (B, C, H, W) in [0, 1]
        outputs = self.generate(images, labels)  # domain -> (x, y)
        losses, accs = self._forward_losses_or_blame(outputs)  # domain -> scalar tensors, on the device
        sizes = {name: outputs[name][0].shape[0] for name in losses}
        self.backward(losses, sizes)
        finite = torch.stack([torch.isfinite(outputs[name][0]).all() for name in losses])
        self.meter.add(self.state.step, losses, accs, finite)
        self.clock.count(sizes)
        return outputs, images

    def _no_gradient_sync(self) -> contextlib.AbstractContextManager[Any]:
        """Under DDP, a micro-batch before the last of a step keeps its gradients local (one all-reduce a step)."""
        return self.ddp.no_sync() if self.ddp is not None else contextlib.nullcontext()

    @property
    def epoch_done(self) -> bool:
        """Every optimisation step of the current epoch is done."""
        return self.state.batch >= self.batches_per_epoch

    # ----------------------------------------------------------------------------------------- step
    def generate(self, images: Tensor, labels: Tensor) -> dict[str, Batch]:
        """Run every domain needed this step, each on its ``input`` domain's output or the clean batch."""
        needed = self._needed_domains()
        outputs: dict[str, Batch] = {}
        self._inputs = {}
        shares: dict[str, tuple[Tensor, int]] = {}  # input -> (this step's permutation, images handed out)
        draw = self._draw_index(self._micro)
        generator = self._generator.manual_seed(step_seed(self.cfg.trainer.seed, draw, self.dist.rank))
        for spec in self.specs:
            if spec.name not in needed:
                continue
            src_x, src_y = outputs[spec.input] if spec.input else (images, labels)
            if spec.fraction < 1.0:  # a seeded share of the input, disjoint from the other shares of that input
                src_x, src_y = self._share(spec, src_x, src_y, generator, shares)
            ctx = self.contexts[spec.name]
            ctx.step, ctx.epoch, ctx.generator = self.state.step, self.state.epoch, generator
            ctx.seed = (generator.initial_seed() + zlib.crc32(spec.name.encode())) % 2**63  # host-side: no sync
            version = src_x._version  # in-place writes bump it: the input is shared with other domains
            try:
                with self._autocast(attack=True):
                    out = self.domains[spec.name].generate(src_x, src_y, ctx)
            except (Exception, SystemExit) as err:
                if "DataLoader worker" in str(err):  # a worker died (signal, OOM killer): not the domain's fault
                    raise
                raise DomainError(
                    f"domain {spec.name!r} (type {spec.type!r}) failed at step {self.state.step}: "
                    f"{type(err).__name__}: {first_line(err)}"
                ) from err
            self._inputs[spec.name] = src_x  # what the domain changed (its share), for the perturbation images
            if src_x._version != version:
                raise DomainError(
                    f"domain {spec.name!r} changed its input images in place; other domains share them: return a "
                    "new tensor (images * 0.5, not images.mul_(0.5))"
                )
            if spec.name not in self._checked_domains:  # the first batch only: no host sync in later steps
                out = check_domain_output(spec.name, out, src_x, self._target_size(spec.name))
                self._checked_domains.add(spec.name)
            outputs[spec.name] = out
        return outputs

    def forward_losses(self, outputs: dict[str, Batch]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Forward each active domain's batch through its BN; per-domain objectives (weighted later)."""
        active = [s for s in self.specs if self._active(s)]
        groups: dict[str, list[DomainSpec]] = {}
        for spec in active:  # domains sharing a BN are normalised together (adversarial training)
            groups.setdefault(spec.bn, []).append(spec)
        logits = self._forward_groups(groups, outputs)  # domain -> logits of the head scoring it
        losses, accs = {}, {}
        for spec in active:
            objective, targets = self.objectives[spec.name], outputs[spec.name][1]
            losses[spec.name] = objective.loss(logits[spec.name], targets)
            accs[spec.name] = objective.correct(logits[spec.name], targets).mean()
        return losses, accs  # finiteness is checked on the device (StepMeter), read on logging steps

    def _forward_losses_or_blame(self, outputs: dict[str, Batch]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """:meth:`forward_losses`; when it fails, a domain whose batch breaks the contract is named instead."""
        try:
            return self.forward_losses(outputs)
        except (RuntimeError, IndexError, ValueError):
            for spec in self.specs:  # the contract check again, on every batch of this step
                if spec.name in outputs:
                    source = outputs[spec.input][0] if spec.input else next(iter(outputs.values()))[0]
                    check_domain_output(spec.name, outputs[spec.name], source, self._target_size(spec.name))
            raise

    def _target_size(self, name: str) -> int:
        """Outputs of the head that scores domain ``name`` (the class count for the classifier)."""
        head = self.objectives[name].head
        return self.data.num_classes if head == CLASSES else self.heads[head]

    def _forward_groups(self, groups: dict[str, list[DomainSpec]], outputs: dict[str, Batch]) -> dict[str, Tensor]:
        heads = tuple(dict.fromkeys(self.objectives[s.name].head for specs in groups.values() for s in specs))
        chunks = {bn: _cat([outputs[s.name][0] for s in specs]) for bn, specs in groups.items()}
        per_bn: dict[str, dict[str, Tensor]]
        if len(self.sources) == 1:  # nothing to route
            per_bn = {bn: self._forward(x, heads) for bn, x in chunks.items()}
        elif (self.cfg.trainer.split_batch or self.ddp is not None) and len(chunks) > 1:
            shapes = {bn: tuple(x.shape[1:]) for bn, x in chunks.items()}
            if self.ddp is not None and len(set(shapes.values())) > 1:
                raise DomainError(
                    f"under torchrun the batches of every BN go through one forward, so they need one image size; "
                    f"got {shapes}"
                )
            sizes = {bn: x.shape[0] for bn, x in chunks.items()}
            with split_sources(self.model, sizes):
                joined = self._forward(torch.cat(list(chunks.values())), heads)  # head -> (sum of sizes, K)
            per_bn = {bn: {} for bn in sizes}
            for head, out in joined.items():
                for bn, part in zip(sizes, out.split(list(sizes.values())), strict=True):
                    per_bn[bn][head] = part
        else:
            per_bn = {}
            for bn, x in chunks.items():
                with use_source(self.model, bn):
                    per_bn[bn] = self._forward(x, heads)
        logits = {}
        for bn, specs in groups.items():
            sizes_in_bn = [outputs[s.name][0].shape[0] for s in specs]
            parts = {head: out.split(sizes_in_bn) for head, out in per_bn[bn].items()}
            logits.update({s.name: parts[self.objectives[s.name].head][i] for i, s in enumerate(specs)})
        return logits

    def _forward(self, x: Tensor, heads: tuple[str, ...]) -> dict[str, Tensor]:
        with self._autocast():
            try:
                return (self.ddp or self._heads_forward)(x, heads)
            except RuntimeError as err:
                ddp_unused = self.ddp is not None and not self.ddp.find_unused_parameters
                if ddp_unused and "find_unused_parameters=True" in str(err):
                    raise DomainError(
                        "some model parameters got no gradient in the last step (a forward that skips them); "
                        "set trainer.find_unused_parameters=true"
                    ) from err
                raise

    def backward(self, losses: dict[str, Tensor], sizes: dict[str, int] | None = None) -> None:
        """Add the gradients of ``sum(weight * loss)`` (over ``optim.grad_accum_steps``) to ``.grad``.

        Gradients reused from attacks this step are already in ``.grad`` (the step zeroes them first). With
        ``optim.grad_normalization=sample_mean`` the sum is over samples and each parameter's gradient is later
        divided by the weighted count of samples that reached it (:mod:`mbn.gradnorm`); ``sizes`` gives each
        domain's batch size.
        """
        weights = {s.name: s.weight for s in self.specs}
        per_sample = self.normalizer is not None and sizes is not None
        terms = []
        for name, loss in losses.items():
            weight = weights[name] * (sizes[name] if per_sample and sizes else 1.0 / self.accum_steps)
            terms.append(weight * loss)
            if per_sample and sizes:
                self._count(name, weights[name] * sizes[name])
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        self.scaler.scale(total).backward()

    def optimizer_step(self) -> None:
        """Apply the accumulated gradients: DDP's reused-gradient mean, normalisation, clipping, step, EMA."""
        if self._reused:
            distributed.add_mean_over_ranks(self._reused)
        if self.normalizer is not None:
            self.normalizer.divide(self._counts)
        if self.cfg.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model, self.state.step + 1)

    # ---------------------------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[str, float]:
        """Test accuracy through the main BN (and every BN with ``trainer.eval_all_bns``)."""
        self.clock.stop()
        sources = self.sources if self.cfg.trainer.eval_all_bns else self.sources[:1]
        move = lambda b: to_device(b, self.device, self.cfg.trainer.channels_last)  # noqa: E731
        acc: dict[str, float] = {}
        ema: dict[str, float] = {}
        if self.dist.is_main:  # rank 0 evaluates; every rank keeps its result
            acc = {bn: accuracy(self.model, self.data.test, bn, move, self._autocast) for bn in sources}
            if self.ema is not None:
                ema = {bn: accuracy(self.ema.module, self.data.test, bn, move, self._autocast) for bn in sources}
        acc, ema = distributed.broadcast_object((acc, ema))
        self.state.test_acc, self.state.test_acc_ema, self.state.evaluated_step = acc, ema, self.state.step
        self.state.best_acc = max(self.state.best_acc, acc[self.sources[0]])
        logged = {f"acc_test/{bn}": a for bn, a in acc.items()} | {f"acc_test_ema/{bn}": a for bn, a in ema.items()}
        self.tb.scalars(logged, self.state.step)
        line = _fmt(acc, "test_acc") + (" " + _fmt(ema, "test_acc_ema") if ema else "")
        self.progress.log(f"epoch {self.state.epoch} step {self.state.step}: " + line)
        return acc

    # --------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        """Write ``last.pt`` atomically (and ``best.pt`` when the main-BN test accuracy improved).

        Raises:
            TrainingDivergedError: a step since the last check had a non-finite loss; nothing is written.
        """
        self._check_finite()
        self.clock.stop()
        wall = self._wall_time()
        meter = self.meter.state_dict()  # a collective under torchrun: every rank computes it
        self._wall_at_save = wall
        if not self.dist.is_main:
            return
        ckpt = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "state": asdict(self.state),
            "sources": list(self.sources),
            "heads": dict(self.heads),
            "data": self.data.stats.to_dict(),
            "data_fingerprint": self.data_fingerprint,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "train_time": self.clock.train_time,
            "wall_time": wall,
            "clock": self.clock.state_dict(),
            "last_window": dict(self.last_window),
            "meter": meter,  # the open logging window: a resumed run logs the same means
            "world_size": self.dist.world_size,
        }
        if self.ema is not None:
            ckpt["ema"] = self.ema.module.state_dict()
        atomic_torch_save(ckpt, self.ckpt_dir / "last.pt")
        main = self.state.test_acc.get(self.sources[0])
        if main is not None and main >= self.state.best_acc:
            atomic_torch_save(ckpt, self.ckpt_dir / "best.pt")

    def _init_from(self, path: Path | None, ckpt: dict[str, Any]) -> None:
        """``model.init_from``: load every tensor of that checkpoint that fits; log what stayed fresh."""
        report = init_from_state(self.model, ckpt["model"], ckpt.get("sources", ()))
        self.progress.log(report.summary(path))
        self.init_report = {"path": str(path), "loaded": len(report.loaded), "fresh": sorted(report.fresh)}

    def _read_resume_checkpoint(self, path: Path) -> dict[str, Any]:
        """The checkpoint to resume from, checked against the recipe before anything is built."""
        ckpt = load_checkpoint(path, map_location=self.device)
        require_entries(ckpt, RESUME_ENTRIES, path, "a training checkpoint to resume")
        for key, kind in (("config", dict), ("model", dict), ("optimizer", dict), ("state", dict)):
            if not isinstance(ckpt[key], kind):
                raise CheckpointError(f"{path}: its {key!r} entry is not a {kind.__name__}")
        if not isinstance(ckpt.get("sources", []), (list, tuple)) or not isinstance(ckpt.get("data", {}), dict):
            raise CheckpointError(f"{path}: its 'sources' or 'data' entry is malformed")
        self.resume_changes = check_resume_config(ckpt["config"], self.cfg)
        return ckpt

    def _restore(self, ckpt: dict[str, Any], path: Path) -> None:
        saved_world = ckpt.get("world_size", 1)
        if saved_world != self.dist.world_size:
            raise RecipeError(
                f"resume with the number of processes the run was trained with: {saved_world} "
                f"(torchrun --nproc_per_node x --nnodes), not {self.dist.world_size}; each process's shard of the "
                "epoch depends on it"
            )
        if list(ckpt.get("sources", self.sources)) != list(self.sources):
            raise RecipeError(
                f"resume cannot change the BN sources {list(ckpt['sources'])} -> {list(self.sources)} (the first "
                "is the main BN); restore the domains' order and bn names"
            )
        self._check_same_data(ckpt.get("data"), path)
        saved = ckpt.get("data_fingerprint")
        if saved is not None and saved not in (self.data_fingerprint, self.data.legacy_fingerprint):
            raise RecipeError(
                f"key 'data.root': the training set under {self.cfg.data.root} is not the one this run was trained on "
                f"(another image count, labels or images than in {path}); resume on the same data"
            )
        load_model_state(self.model, ckpt["model"], path)
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
            self.state = TrainState(**ckpt["state"])
            self.state.check(self.batches_per_epoch)
            self.clock.load_state_dict(ckpt.get("clock", {"train_time": ckpt.get("train_time", 0.0)}))
            self._wall_before = self._wall_at_save = float(ckpt.get("wall_time", 0.0))
            self.last_window = {str(k): float(v) for k, v in ckpt.get("last_window", {}).items()}
            self.meter.load_state_dict(ckpt.get("meter", {}))
        except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as err:
            detail = first_line(err)
            raise CheckpointError(f"{path}: optimiser or training state does not fit this run ({detail})") from None
        self._note_schedule_change(ckpt)

    def _restore_ema(self, ckpt: dict[str, Any], path: Path) -> None:
        """The weight average a resumed run continues; a run saved without one starts it from its weights."""
        assert self.ema is not None
        state = ckpt.get("ema")
        if state is None:
            self.progress.log(f"{path} holds no weight average: ema starts from the weights at step {self.state.step}")
            return
        try:
            self.ema.module.load_state_dict(state)
        except (RuntimeError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{path}: its 'ema' entry does not fit this model ({first_line(err)})") from None

    def _check_same_data(self, saved: Any, path: Path) -> None:
        """A resume trains on the data it started with: same classes, same normalisation statistics."""
        if not isinstance(saved, dict):
            return
        now = self.data.stats.to_dict()
        if list(saved.get("class_names", [])) != now["class_names"]:
            raise RecipeError(
                f"key 'data.root': {self.cfg.data.root} holds classes {now['class_names'][:5]}..., the run was "
                f"trained on {list(saved.get('class_names', []))[:5]}... ({path}); resume on the same data"
            )
        for key in ("mean", "std"):
            old, new = saved.get(key), now[key]
            if old is not None and any(abs(a - b) > 1e-5 for a, b in zip(old, new, strict=False)):
                raise RecipeError(
                    f"key 'data.root': the training images under {self.cfg.data.root} differ from the run's "
                    f"({key} {_rounded(old)} in {path}, {_rounded(new)} now); resume on the same data"
                )

    def _note_schedule_change(self, ckpt: dict[str, Any]) -> None:
        old_epochs = ckpt["config"].get("trainer", {}).get("epochs")
        if old_epochs is None or old_epochs == self.cfg.trainer.epochs:
            return
        old_lr = self.optimizer.param_groups[0]["lr"]
        lambdas = [fn(self.state.step) for fn in getattr(self.scheduler, "lr_lambdas", [])]
        new_lr = self.optimizer.param_groups[0]["initial_lr"] * lambdas[0] if lambdas else old_lr
        self.progress.log(
            f"trainer.epochs {old_epochs} -> {self.cfg.trainer.epochs}: the learning-rate schedule and the domains' "
            f"start/end windows now span the new length (lr at step {self.state.step}: {old_lr:.4g} -> {new_lr:.4g})"
        )

    # ------------------------------------------------------------------------------------- helpers
    def _draw_index(self, micro: int = 0) -> int:
        """Which draw a (micro-)batch's randomness is: the step itself without gradient accumulation."""
        return self.state.step * self.accum_steps + micro

    def _seed_step(self, micro: int = 0) -> None:
        # Only the generators in use: torch.manual_seed also walks every accelerator backend (~1.5 ms).
        self._micro = micro
        seed = step_seed(self.cfg.trainer.seed, self._draw_index(micro), self.dist.rank)
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.default_generators[
                self.device.index if self.device.index is not None else torch.cuda.current_device()
            ].manual_seed(seed)

    def _autocast(self, attack: bool = False) -> contextlib.AbstractContextManager[Any]:
        # fp16 attack gradients underflow without a scaler; attacks run in fp32 unless bf16.
        if self.amp_dtype is None or (attack and self.amp_dtype is torch.float16):
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _may_leave_parameters_unused(self) -> bool:
        """``trainer.find_unused_parameters``, else whether a BN source or head can miss a step's training forward.

        That happens with a domain window (``start``/``end``) or a head no domain is scored by (every BN source is
        some domain's ``bn``, so each is trained). Otherwise every parameter gets a gradient every step, and DDP is
        spared the search of the autograd graph it otherwise makes after every backward.
        """
        if self.cfg.trainer.find_unused_parameters is not None:
            return bool(self.cfg.trainer.find_unused_parameters)
        windowed = any(s.start > 0 or s.end < 1 for s in self.specs)
        unscored_head = {CLASSES, *self.heads} - {self.objectives[s.name].head for s in self.specs}
        return windowed or bool(unscored_head)

    def _fraction(self) -> float:
        return self.state.step / max(1, self.total_steps)

    def _active(self, spec: DomainSpec) -> bool:
        return spec.start <= self._fraction() < spec.end

    def _needed_domains(self) -> set[str]:
        by_name = {s.name: s for s in self.specs}
        needed: set[str] = set()
        for spec in self.specs:
            cur: DomainSpec | None = spec if self._active(spec) else None
            while cur is not None and cur.name not in needed:
                needed.add(cur.name)
                cur = by_name[cur.input] if cur.input else None
        return needed

    def _share(
        self, spec: DomainSpec, x: Tensor, y: Tensor, generator: torch.Generator, shares: dict[str, tuple[Tensor, int]]
    ) -> Batch:
        """``round(fraction * N)`` images of the input: the next slice of one seeded permutation per input and step.

        Domains with a ``fraction`` of the same input get disjoint slices in recipe order while their fractions
        sum to at most 1 (Fast AdvProp: clean 0.8, attacked 0.2); beyond that the slices wrap around.
        """
        key, n = spec.input or "", x.shape[0]
        if key not in shares:  # drawn before any domain's own draws: reproducible whatever the domains do
            shares[key] = (torch.randperm(n, generator=generator, device=generator.device).to(x.device), 0)
        perm, used = shares[key]
        keep = max(1, round(spec.fraction * n))
        pick = (
            perm[(torch.arange(used, used + keep, device=x.device) % n)]
            if used + keep > n
            else perm[used : used + keep]
        )
        shares[key] = (perm, used + keep)
        return x.index_select(0, pick), y.index_select(0, pick)

    def _reuse_attack_gradient(self, loss: Tensor, images: Tensor, weight: float, bn: str) -> Tensor:
        """An attack step's ``d loss / d images``; ``weight`` x its parameter gradients join this step's update."""
        n = images.shape[0]
        scaled = loss * (weight * n if self.normalizer is not None else weight / self.accum_steps)
        params = self._trainable
        grads = torch.autograd.grad(self.scaler.scale(scaled), [images, *params], allow_unused=True)
        # under DDP they are kept aside and averaged over the ranks after the backward (a parameter the training
        # forward does not reach would otherwise keep its rank's own gradient)
        into = self._reused if self.ddp is not None else None
        for p, g in zip(params, grads[1:], strict=True):
            if g is None:
                continue
            if into is not None:
                into[p] = g if p not in into else into[p].add_(g)
            else:
                p.grad = g if p.grad is None else p.grad.add_(g)
        if self.normalizer is not None:
            self._counts[SHARED] += weight * n
            self._counts[("bn", bn)] = self._counts.get(("bn", bn), 0.0) + weight * n
        return grads[0]

    def _count(self, name: str, samples: float) -> None:
        self._counts[SHARED] += samples
        bn, head = self.by_name[name].bn, self.objectives[name].head
        self._counts[("bn", bn)] = self._counts.get(("bn", bn), 0.0) + samples
        if head != CLASSES:
            self._counts[("head", head)] = self._counts.get(("head", head), 0.0) + samples

    def _check_finite(self) -> None:
        """Stop on a non-finite loss since the last check (one host sync: logging steps and checkpoints only)."""
        try:
            self.meter.check_finite()
        except NonFiniteError as err:
            last = self.ckpt_dir / "last.pt"
            kept = f"last good checkpoint kept at {last}" if last.exists() else "no checkpoint written yet"
            raise TrainingDivergedError(f"{err}; {kept}") from None

    def _planned_steps(self) -> int:
        return min(self.total_steps, self.cfg.trainer.max_steps or self.total_steps)

    def _done(self) -> bool:
        return self.state.step >= self._planned_steps()

    def _eval_due(self) -> bool:
        every = self.cfg.trainer.eval_every
        return self.state.epoch >= self.epochs or (every > 0 and self.state.epoch % every == 0)

    def _after_step(self, outputs: dict[str, Batch], images: Tensor) -> None:
        self.progress.update()
        step, log = self.state.step, self.cfg.logging
        if step % self.cfg.trainer.log_every == 0 or self._done():
            self._check_finite()
            # a max_steps stop between logging steps peeks at the window: a resumed run closes it as an
            # uninterrupted run would, so both report the same means
            means = self.meter.read(reset=step % self.cfg.trainer.log_every == 0)  # the step's only host sync
            self.clock.lap()
            weights = {s.name: s.weight for s in self.specs}
            means["loss/total"] = sum(weights[n] * means[f"loss/{n}"] for n in weights if f"loss/{n}" in means)
            means["lr"] = self.optimizer.param_groups[0]["lr"]
            means.update(self.clock.throughput())
            self.tb.scalars(means, step)
            self.progress.log(f"epoch {self.state.epoch} step {step}: " + _fmt(means))
            self.progress.show({k[5:]: v for k, v in means.items() if k.startswith("loss/")})
            self.last_window = means
        if log.image_every and (step % log.image_every == 0 or step == 1):
            for name, (x, _) in outputs.items():
                self.tb.images(name, x, self._inputs.get(name, images), step)
        if log.divergence_every and step % log.divergence_every == 0 and len(self.sources) > 1:
            self.tb.divergence(self.model, step)
        every = self.cfg.trainer.checkpoint_every_steps
        if every and step % every == 0 and not self.epoch_done:
            self.save_checkpoint()

    def _wall_time(self) -> float:
        start = getattr(self, "_wall_start", None)
        return self._wall_before + (time.perf_counter() - start if start is not None else 0.0)

    @property
    def stopping(self) -> bool:
        """A stop signal was taken (agreed by every rank under torchrun): the trainer checkpoints and stops."""
        return self._stop_signal is not None

    def _save_checkpoint_on_every_rank(self) -> None:
        """:meth:`save_checkpoint`, then rank 0's outcome on every rank: no rank exits before rank 0 has written.

        A rank leaving first would have the torchrun agent stop the others mid-write; a rank waiting at a barrier while
        rank 0 fails to write would be killed by the agent without a word. So rank 0 sends its error (or none) and
        every rank raises it as one line.
        """
        if not self.dist.enabled:
            self.save_checkpoint()
            return
        failure: Exception | None = None
        try:
            self.save_checkpoint()
        except (WriteError, TrainingDivergedError) as err:  # the others reach the broadcast before raising
            failure = err
        reason = distributed.broadcast_object(one_line(failure) if failure is not None else None)
        if failure is not None:
            raise failure
        if reason is not None:
            raise WriteError(f"rank 0 could not save the checkpoint: {reason}")

    def _agree_stop(self) -> None:
        """Under torchrun, a signal received by any rank stops every rank after the same step (host-side flag)."""
        if self.dist.enabled:
            signum = distributed.max_flag(getattr(self, "_signal_received", None) or 0)
            self._stop_signal = signum or None

    def _final_metrics(self, wall: float) -> dict[str, Any]:
        window = self.last_window
        return {
            "steps": self.state.step,
            "epochs": self.epochs,
            "budget_of": self.cfg.trainer.budget_of,
            "epochs_completed": self.state.epoch,
            "train": {
                s.name: {"loss": window.get(f"loss/{s.name}"), "acc": window.get(f"acc/{s.name}")} for s in self.specs
            },
            "test_acc": self.state.test_acc,
            "test_acc_main": self.state.test_acc.get(self.sources[0]),
            "test_acc_ema": self.state.test_acc_ema if self.ema is not None else None,
            "sources": list(self.sources),
            "heads": {CLASSES: self.data.num_classes, **self.heads},
            "init_from": getattr(self, "init_report", None),
            **self.clock.summary(),
            "wall_time_s": wall,
            "device": str(self.device),
            "world_size": self.dist.world_size,
        }

    @contextlib.contextmanager
    def _signals_save_checkpoint(self) -> Iterator[None]:
        """SIGINT, SIGTERM or SIGHUP finishes the current step, saves a checkpoint and stops; a second one aborts."""
        if sys.platform == "win32" or not _in_main_thread():
            yield
            return
        previous: dict[int, Any] = {}

        def request_stop(signum: int, frame: object) -> None:
            self._signal_received = signum
            if self.dist.enabled:
                # under torchrun the ranks agree after the step (_agree_stop); the same preemption reaches a rank
                # twice (SLURM signals every process, the torchrun agent forwards it again): repeats are not an
                # abort, the agent's own kill after its shutdown timeout is
                return
            self._stop_signal = signum
            for sig, handler in previous.items():  # a second signal acts as it would without mbn
                signal.signal(sig, handler)

        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup / trap '' TERM: the user said ignore it
                previous[sig] = signal.signal(sig, request_stop)
        try:
            yield
            self._agree_stop()  # a signal after the last step's agreement (every rank gets here)
            if self._stop_signal is not None:
                # still under request_stop: under torchrun, a repeat of the same preemption (or the agent's SIGTERM
                # once another rank exits) cannot cut the save short
                self._save_checkpoint_on_every_rank()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self._stop_signal is not None:
            name = signal.Signals(self._stop_signal).name
            raise TrainingInterruptedError(
                f"{name} at step {self.state.step}; checkpoint saved, resume with: "
                f"{distributed.resume_command(self.run_dir)}",
                self._stop_signal,
            )


def _rounded(values: Any) -> list[float]:
    return [round(float(v), 4) for v in values]


def _cat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)  # (sum of N, C, H, W)


def _no_buffer_sync() -> dict[str, Any]:
    """DDP's argument skipping its buffer broadcast in forward (``forward_sync_buffers``, else the older name)."""
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _fmt(values: dict[str, float], prefix: str = "") -> str:
    items = (f"{prefix + '/' if prefix else ''}{k}={v:.4g}" for k, v in values.items())
    return " ".join(items)
