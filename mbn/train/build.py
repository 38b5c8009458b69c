"""How a recipe becomes a run: *which* data, model, domains, optimiser and files. The only recipe reader here.

:func:`build_trainer` validates the whole recipe first (:func:`mbn.plan.plan_run`: every recipe error surfaces
before the data is read), takes the run directory's lock, then builds in this order: the resume checkpoint (read
and checked against the recipe), the data, the model on its device (:class:`~mbn.train.runtime.Runtime`), the
step, the optimiser and schedule, the checkpoints (restoring a resumed run, or ``model.init_from``), the weight
average and update, and the hooks. The :class:`~mbn.train.loop.Trainer` it returns only trains.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mbn import distributed
from mbn.budget import matched_epochs
from mbn.builders import build_model
from mbn.config import DomainSpec, RecipeError
from mbn.convert import convert_sync_batchnorm
from mbn.csvlog import CsvScalarLog
from mbn.data import DataBundle, build_data
from mbn.distributed import DistContext
from mbn.ema import WeightEma
from mbn.gradnorm import SampleMeanGradients
from mbn.logger import RunLogger
from mbn.models import weights_normalisation
from mbn.objective import CLASSES, Objective
from mbn.optim import StepSchedule, build_optimizer, build_scheduler
from mbn.plan import RunPlan, plan_run
from mbn.resume import check_resume_config, flatten
from mbn.rundir import RunDirError, RunLock, check_new_run_dir, clean_run_dir
from mbn.tblog import TensorBoardLogger
from mbn.trackers import trackers
from mbn.train.checkpoints import Checkpoint, RunCheckpoints, init_model_from, read_checkpoint
from mbn.train.hooks import HookSettings, TrainHooks
from mbn.train.loop import Trainer
from mbn.train.runtime import Runtime, out_of_memory_message
from mbn.train.state import RunLength, TrainState
from mbn.train.step import MultiDomainStep
from mbn.train.update import Update
from mbn.written_recipe import resolve_stored


def build_trainer(
    cfg: DictConfig, run_dir: Path | str, *, resume: bool = False, dist: DistContext | None = None
) -> Trainer:
    """A :class:`Trainer` for recipe ``cfg`` writing ``run_dir`` (continuing its ``last.pt`` with ``resume``).

    Args:
        cfg: a recipe loaded with :func:`mbn.config.load_recipe`.
        run_dir: output directory (``config.yaml``, ``tb/``, ``checkpoints/``, ``metrics.json``).
        resume: continue from ``run_dir/checkpoints/last.pt``.
        dist: this process's place among the ranks; by default joined from the environment torchrun sets, so a
            script building a trainer under torchrun trains with DDP as ``mbn-train`` does (a script building
            several trainers passes the one :func:`mbn.distributed.init_from_env` returned).

    Raises:
        RecipeError: a recipe problem, naming its key. CheckpointError: an unusable checkpoint to resume.
    """
    run_dir = Path(run_dir)
    plan = plan_run(cfg, resume=resume)  # every recipe error surfaces here, before the data is read
    dist = dist if dist is not None else distributed.init_from_env(str(cfg.trainer.device))
    check_same_recipe_on_every_rank(cfg, dist)  # an environment-dependent value may resolve otherwise on a rank
    lock = acquire_on_rank_0(run_dir, dist)  # before anything in run_dir is read or written
    try:
        return _build(cfg, run_dir, plan, dist, resume, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _build(
    cfg: DictConfig, run_dir: Path, plan: RunPlan, dist: DistContext, resume: bool, lock: RunLock | None
) -> Trainer:
    ckpt_dir = run_dir / "checkpoints"
    device = distributed.rank_device(plan.device, dist)
    ckpt = read_checkpoint(ckpt_dir / "last.pt", "resume", map_location=device) if resume else None
    if ckpt is not None:  # before anything is built: a resume may not change what was trained
        check_resume_config(ckpt["config"], cfg, ckpt.get("interpolated"))
    if dist.is_main:
        if not resume:
            check_new_run_dir(run_dir)
        clean_run_dir(run_dir)  # temporary files of writes a kill interrupted
    torch.manual_seed(cfg.trainer.seed)  # model initialisation
    with dist.main_first(), _out_of_memory("holding the data set", "data.image_size or data.train_limit"):
        data = build_data(cfg.data, seed=cfg.trainer.seed, device=device, rank=dist.rank, world_size=dist.world_size)
    _normalise_as_trained(cfg, data, ckpt)
    with _out_of_memory(f"building the model on {device}", "model.width, or choose a smaller model.name"):
        model = build_model(cfg, data.num_classes, data.mean, data.std, plan.sources, heads=plan.heads)
        if cfg.trainer.sync_bn:
            model = convert_sync_batchnorm(model)  # one SyncBatchNorm per source
        model.to(device)
    if cfg.trainer.channels_last:
        model.to(memory_format=torch.channels_last)
    runtime = Runtime(
        model,
        device,
        dist,
        seed=cfg.trainer.seed,
        amp=cfg.trainer.amp,
        channels_last=cfg.trainer.channels_last,
        compile=cfg.trainer.compile,
        find_unused_parameters=may_leave_parameters_unused(cfg, plan.specs, plan.heads, plan.objectives),
    )
    with contextlib.ExitStack() as undo:  # a failure below closes what was built (DDP, TensorBoard)
        undo.callback(runtime.close)
        length, notes = run_length(cfg, plan, len(data.train))
        step = MultiDomainStep(
            runtime,
            plan.specs,
            plan.domains,
            plan.objectives,
            plan.heads,
            data.num_classes,
            total_steps=length.total_steps,
            accum_steps=length.accum_steps,
            sample_mean=cfg.optim.grad_normalization == "sample_mean",
            split_batch=cfg.trainer.split_batch,
            routed=len(plan.sources) > 1,
        )
        optimizer = build_optimizer(model, cfg.optim)  # backbone and every head
        scheduler = build_scheduler(optimizer, cfg.schedule, length.total_steps, length.steps_per_epoch)
        checkpoints = RunCheckpoints(
            ckpt_dir,
            dist,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=runtime.scaler,
            ema=None,  # below: the average starts from the weights training starts from
            cfg=cfg,
            data=data,
            sources=plan.sources,
            heads=plan.heads,
            gentler=gentler_overrides(cfg),
            keep_best_k=int(cfg.trainer.keep_best_k),
        )
        state, init_report = TrainState(), None
        if ckpt is not None:
            checkpoints.check_same_run(ckpt, ckpt_dir / "last.pt", cfg.data.root)
            state = checkpoints.restore(ckpt, ckpt_dir / "last.pt", length.batches_per_epoch)
            notes.extend(_schedule_change(cfg, ckpt, optimizer, scheduler, state))
        elif plan.init_checkpoint is not None:
            report = init_model_from(model, plan.init_checkpoint)
            notes.append(report.summary(plan.init_path))
            init_report = {"path": str(plan.init_path), "loaded": len(report.loaded), "fresh": sorted(report.fresh)}
        ema = WeightEma(model, cfg.ema.decay, cfg.ema.warmup) if cfg.ema.decay > 0 else None
        checkpoints.ema = ema
        if ckpt is not None and ema is not None and not checkpoints.restore_ema(ckpt, ckpt_dir / "last.pt"):
            notes.append(
                f"{ckpt_dir / 'last.pt'} holds no weight average: ema starts from the weights at step {state.step}"
            )
        normalizer = SampleMeanGradients(model) if cfg.optim.grad_normalization == "sample_mean" else None
        update = Update(
            model,
            optimizer,
            scheduler,
            runtime.scaler,
            dist,
            grad_clip=cfg.optim.grad_clip,
            normalizer=normalizer,
            ema=ema,
        )
        loggers = run_loggers(cfg, run_dir) if dist.is_main else []
        hooks = TrainHooks(
            cfg, hook_settings(cfg), run_dir, runtime, update, checkpoints, data, plan.specs, length, loggers
        )
        hooks.init_report = init_report
        undo.callback(hooks.close)  # TensorBoard's writer thread, the progress bar
        if ckpt is not None:
            hooks.load_session(ckpt, ckpt_dir / "last.pt")
        for note in notes:
            hooks.progress.log(note)
        undo.pop_all()
        return Trainer(
            cfg=cfg,
            run_dir=run_dir,
            data=data,
            runtime=runtime,
            step=step,
            update=update,
            hooks=hooks,
            checkpoints=checkpoints,
            length=length,
            state=state,
            resumed=ckpt is not None,
            lock=lock,
        )


def acquire_on_rank_0(run_dir: Path, dist: DistContext) -> RunLock | None:
    """Rank 0 takes ``run_dir``'s lock; every rank learns whether it could (a busy directory stops them all alike).

    Raises:
        RunDirError: the directory is in use by another run (on every rank, with rank 0's message).
    """
    lock, failure = None, None
    if dist.is_main:
        try:
            lock = RunLock(run_dir).acquire()
        except RunDirError as err:
            failure = err
    reason = dist.broadcast_object(str(failure) if failure is not None else None) if dist.enabled else None
    if failure is not None:
        raise failure
    if reason is not None:
        raise RunDirError(reason)
    return lock


#: Keys that may differ between ranks: where each rank finds or writes the same files (a node's own mount).
PER_RANK_KEYS: tuple[str, ...] = (
    "trainer.out_dir",
    "data.root",
    "model.init_from",
    "eval.",
    "data.num_workers",  # loading, not the data order (a node's own CPU count)
    "data.eval_batch_size",  # rank 0 alone evaluates
    "data.download",
    "trainer.progress",
)


def check_same_recipe_on_every_rank(cfg: DictConfig, dist: DistContext) -> None:
    """Under torchrun every rank trains with rank 0's recipe: one resolved otherwise (``${oc.env:RANK}``) is refused.

    Rank 0's resolved recipe is broadcast; every rank compares it with its own outside :data:`PER_RANK_KEYS`, and
    the ranks agree (a collective) so that all stop, not only the one that differs.

    Raises:
        RecipeError: naming the first key that differs and its values on rank 0 and here.
    """
    if not dist.enabled:
        return
    mine = dict(flatten(OmegaConf.to_container(cfg, resolve=True)))  # type: ignore[arg-type]
    mine = {
        k: v for k, v in mine.items() if not any(k == p or (p.endswith(".") and k.startswith(p)) for p in PER_RANK_KEYS)
    }
    main = dist.broadcast_object(mine)
    differ = [k for k in sorted(main.keys() | mine.keys()) if main.get(k) != mine.get(k)]
    found = dist.gather_objects((differ[0], mine.get(differ[0]), len(differ)) if differ else None)
    others = [(rank, f) for rank, f in enumerate(found) if f is not None]
    if others:  # every rank gives the same message, so the one the agent lets print names the key
        rank, (key, value, count) = others[0]
        more = f" and {count - 1} more key(s)" if count > 1 else ""
        raise RecipeError(
            f"key '{key}': {main.get(key)!r} on rank 0, {value!r} on rank {rank}{more}; every rank must resolve "
            "the recipe alike (a value from the environment, e.g. ${oc.env:...}, that differs between ranks?)"
        )


@contextlib.contextmanager
def _out_of_memory(what: str, keys: str) -> Iterator[None]:
    """Running out of memory while ``what`` is one line naming the recipe ``keys`` to lower (exit status 2)."""
    try:
        yield
    except (RuntimeError, MemoryError) as err:
        message = out_of_memory_message(err, what, f"lower {keys}")
        if message is None:
            raise
        raise RecipeError(message) from None


def run_length(cfg: DictConfig, plan: RunPlan, batches: int) -> tuple[RunLength, list[str]]:
    """How long the run trains (``trainer.budget_of`` matched), and the note saying so when it was matched."""
    accum = int(cfg.optim.grad_accum_steps)
    steps_per_epoch = batches // accum  # optimisation steps; a last incomplete group of micro-batches is dropped
    if steps_per_epoch == 0:
        raise RecipeError(
            f"key 'optim.grad_accum_steps': {accum} batches per optimisation step, but an epoch has "
            f"{batches}; lower it or data.batch_size"
        )
    epochs, notes = int(cfg.trainer.epochs), []
    if cfg.trainer.budget_of:  # the epochs costing what the baseline's would
        epochs = plan.budget_epochs or matched_epochs(
            cfg.trainer.epochs, plan.specs, plan.domains, str(cfg.trainer.budget_of)
        )
        notes.append(
            f"trainer.budget_of={cfg.trainer.budget_of}: {epochs} epochs cost what {cfg.trainer.epochs} "
            f"of {cfg.trainer.budget_of} would"
        )
    length = RunLength(epochs, steps_per_epoch, accum, int(cfg.trainer.max_steps or 0), int(cfg.trainer.eval_every))
    return length, notes


def gentler_overrides(cfg: DictConfig) -> str:
    """What a divergence message suggests to resume with: a tenth of the learning rate, and clipping if off."""
    return f"optim.lr={float(cfg.optim.lr) / 10:g}" + ("" if cfg.optim.grad_clip else " optim.grad_clip=1.0")


def run_loggers(cfg: DictConfig, run_dir: Path) -> list[RunLogger]:
    """Where rank 0 reports: TensorBoard, ``scalars.csv`` and the trackers the recipe enables.

    TensorBoard with ``logging.tensorboard``, ``scalars.csv`` always, W&B and MLflow with ``logging.wandb`` and
    ``logging.mlflow``. Nothing is written until the first report.
    """
    loggers: list[RunLogger] = [CsvScalarLog(run_dir / "scalars.csv")]  # every logged scalar, also without TB
    if cfg.logging.tensorboard:
        loggers.insert(0, TensorBoardLogger(run_dir / "tb"))
    return loggers + trackers(cfg.logging, run_dir)


def hook_settings(cfg: DictConfig) -> HookSettings:
    """The logging, evaluation and checkpoint cadence the recipe asks for."""
    return HookSettings(
        log_every=int(cfg.trainer.log_every),
        image_every=int(cfg.logging.image_every or 0),
        divergence_every=int(cfg.logging.divergence_every or 0),
        checkpoint_every_steps=int(cfg.trainer.checkpoint_every_steps or 0),
        eval_all_bns=bool(cfg.trainer.eval_all_bns),
        perturbation_gain=float(cfg.logging.perturbation_gain),
        progress=str(cfg.trainer.progress),
        divergence_layout=bool(cfg.logging.divergence_every) and not cfg.model.share_stats,
        budget_of=cfg.trainer.budget_of,
    )


def may_leave_parameters_unused(
    cfg: DictConfig, specs: list[DomainSpec], heads: dict[str, int], objectives: dict[str, Objective]
) -> bool:
    """``trainer.find_unused_parameters``, else whether a BN source or head can miss a step's training forward.

    That happens with a domain window (``start``/``end``) or a head no domain is scored by (every BN source is
    some domain's ``bn``, so each is trained). Otherwise every parameter gets a gradient every step, and DDP is
    spared the search of the autograd graph it otherwise makes after every backward.
    """
    if cfg.trainer.find_unused_parameters is not None:
        return bool(cfg.trainer.find_unused_parameters)
    windowed = any(s.start > 0 or s.end < 1 for s in specs)
    unscored_head = {CLASSES, *heads} - {objectives[s.name].head for s in specs}
    return windowed or bool(unscored_head)


def _normalise_as_trained(cfg: DictConfig, data: DataBundle, ckpt: Checkpoint | None) -> None:
    """Pretrained weights expect their own input statistics; a resume keeps those the run was trained with."""
    expected = weights_normalisation(cfg.model)
    saved = ckpt.get("data") if ckpt is not None else None
    if expected is not None and isinstance(saved, dict) and "mean" in saved and "std" in saved:
        expected = (tuple(saved["mean"]), tuple(saved["std"]))
    if expected is not None and cfg.data.mean is None:
        data.stats = replace(data.stats, mean=expected[0], std=expected[1])  # and the checkpoint


def _schedule_change(
    cfg: DictConfig, ckpt: Checkpoint, optimizer: torch.optim.Optimizer, scheduler: StepSchedule, state: TrainState
) -> list[str]:
    """A note of what a resume changed of the update, the learning rate of the resumed step set to follow it.

    ``trainer.epochs`` (the schedule spans the new length), ``optim.lr`` or ``schedule.min_lr`` (the schedule
    scaled), ``optim.grad_clip``.

    The saved schedule holds the trained base learning rate; it is replaced by the recipe's, and every parameter
    group's rate set to the recipe's schedule at the resumed step, so the first step after the resume already
    uses it. A resume that changes none of these keys leaves the restored state untouched (bit-identical).
    """
    trained = resolve_stored(ckpt["config"])
    optim, schedule = trained.get("optim", {}), trained.get("schedule", {})
    old = {
        "trainer.epochs": trained.get("trainer", {}).get("epochs", cfg.trainer.epochs),
        "optim.lr": optim.get("lr", cfg.optim.lr),
        "schedule.min_lr": schedule.get("min_lr", cfg.schedule.min_lr),
        "optim.grad_clip": optim.get("grad_clip", cfg.optim.grad_clip),
    }
    new = {
        "trainer.epochs": cfg.trainer.epochs,
        "optim.lr": cfg.optim.lr,
        "schedule.min_lr": cfg.schedule.min_lr,
        "optim.grad_clip": cfg.optim.grad_clip,
    }
    changed = [k for k in old if old[k] != new[k]]
    if not changed:
        return []
    listed = ", ".join(f"{k} {old[k]} -> {new[k]}" for k in changed)
    if changed == ["optim.grad_clip"]:
        return [f"resumed at step {state.step} with {listed}"]
    saved_groups = ckpt["optimizer"].get("param_groups") or [{}]
    old_lr = float(saved_groups[0].get("lr", optimizer.param_groups[0]["lr"]))
    scheduler.set_base_lr(cfg.optim.lr, cfg.schedule.min_lr)  # the rate of the resumed step from the new schedule
    new_lr = optimizer.param_groups[0]["lr"]
    windows = " and the domains' start/end windows" if "trainer.epochs" in changed else ""
    return [
        f"resumed at step {state.step} with {listed}: the learning-rate schedule{windows} follow the new values "
        f"(lr at step {state.step}: {old_lr:.4g} -> {new_lr:.4g})"
    ]
