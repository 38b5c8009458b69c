"""Optimiser and per-step learning-rate schedule, through timm's factories.

``optim.name`` is any optimiser timm names (``create_optimizer_v2``: sgd, momentum, adamw, rmsproptf, lamb, lars,
lion, ...) and ``schedule.name`` any of its per-update schedules (``create_scheduler_v2``: cosine, tanh, poly, step,
multistep, constant, wsd, rsqrt), with ``optim.kwargs`` / ``schedule.kwargs`` passed through. mbn keeps three things
of its own around them:

* the parameter groups (:func:`param_groups`: no weight decay on BN weights and biases);
* its linear warm-up: optimisation step ``s`` of the first ``W`` steps trains at ``optim.lr * (s + 1) / W``, then
  timm's schedule runs over the remaining ``total - W`` steps from ``optim.lr`` (to ``schedule.min_lr``);
* the schedule's length: ``trainer.epochs`` x optimisation steps per epoch, never ``trainer.max_steps``, so a run
  stopped early and resumed follows exactly the same learning rates. Epoch-valued keys (``schedule.decay_epochs``)
  are converted to steps; ``schedule.milestones`` are fractions of the steps after the warm-up.

The learning rate of a step is a pure function of the step, the recipe and the base rate: a checkpoint holds only the
step (:class:`StepSchedule`), and a resume with a new ``optim.lr`` or ``schedule.min_lr`` follows the new values from
its first step.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mbn.errors import RecipeError, first_line

#: Arguments of timm's scheduler factory that mbn sets itself (from its own keys, or to its own warm-up and length).
_SCHEDULER_OWN = {
    "optimizer": "",
    "sched": "schedule.name",
    "num_epochs": "trainer.epochs",
    "decay_epochs": "schedule.decay_epochs",
    "decay_milestones": "schedule.milestones",
    "decay_rate": "schedule.gamma",
    "min_lr": "schedule.min_lr",
    "warmup_lr": "schedule.warmup_epochs",
    "warmup_epochs": "schedule.warmup_epochs",
    "warmup_prefix": "schedule.warmup_prefix",
    "step_on_epochs": "",
    "updates_per_epoch": "",
    "cooldown_epochs": "",  # the run's length is trainer.epochs; timm only adds the cool-down to the epochs it reports
    "patience_epochs": "",  # plateau (an epoch-wise schedule on a metric) is not offered
    "plateau_mode": "",
    "cycle_mul": "",  # one cycle spans the run (trainer.epochs): restarts are not offered
    "cycle_decay": "",
    "cycle_limit": "",
}
#: ``optim.betas``'s default: given to optimisers that take two betas, unless they have other defaults of their own.
_DEFAULT_BETAS = (0.9, 0.999)
#: Arguments of timm's optimiser factory that mbn sets from its own keys.
_OPTIMIZER_OWN = {"lr": "optim.lr", "weight_decay": "optim.weight_decay", "params": "", "momentum": "optim.momentum"}


def param_groups(model: nn.Module, optim: DictConfig) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: weight decay on every trainable parameter, or not on BN and biases.

    With ``optim.decay_norm_and_bias=false`` (the default) 1-d parameters (every BN's weight and bias, every
    bias) and any ``*.bias`` get no weight decay, as in timm and the torchvision references
    (``timm.optim.param_groups_weight_decay``); the first group is the undecayed one.
    """
    if optim.decay_norm_and_bias or not optim.weight_decay:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    from timm.optim import param_groups_weight_decay

    groups: list[dict[str, Any]] = param_groups_weight_decay(model, optim.weight_decay)
    return [g for g in groups if g["params"]]


def _plain(section: Any) -> dict[str, Any]:
    """A recipe mapping (``optim.kwargs``) as a plain dict."""
    if isinstance(section, DictConfig):
        return dict(OmegaConf.to_container(section, resolve=True))  # type: ignore[arg-type]
    return dict(section or {})


def timm_optimizer_name(optim: Any) -> str:
    """The timm name for ``optim.name``: plain ``sgd`` with ``optim.nesterov=false`` is timm's ``momentum``."""
    name = str(optim.name).lower()
    return "momentum" if name == "sgd" and not optim.nesterov else name


def optimizer_arguments(optim: Any) -> tuple[str, dict[str, Any]]:
    """The timm optimiser name and the keyword arguments mbn passes to ``create_optimizer_v2`` (besides the groups).

    Raises :class:`RecipeError` in one line for an optimiser timm does not name, or an ``optim.kwargs`` key its class
    does not take (or one that an ``optim`` key sets).
    """
    from timm.optim import get_optimizer_class, get_optimizer_info, list_optimizers

    name = timm_optimizer_name(optim)
    try:
        info = get_optimizer_info(name)
    except (ValueError, KeyError):
        raise RecipeError(
            f"key 'optim.name': {str(optim.name)[:80]!r} is not an optimiser timm names ({len(list_optimizers())} "
            "do, e.g. sgd, momentum, adamw, rmsproptf, lamb, lars, lion: timm.optim.list_optimizers(); no "
            "lookahead_ prefix)"
        ) from None
    if info.second_order:
        raise RecipeError(f"key 'optim.name': {name} is a second-order optimiser (a backward with create_graph), "
                          "which mbn's update does not run")  # fmt: skip
    try:
        opt_class = get_optimizer_class(name, bind_defaults=False)
    except Exception as err:  # bitsandbytes / APEX missing, or CUDA required
        raise RecipeError(f"key 'optim.name': {name} cannot be built here ({first_line(err)})") from None
    extra = _plain(optim.kwargs)
    accepted = inspect.signature(opt_class).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    for key in extra:
        if _OPTIMIZER_OWN.get(key):
            raise RecipeError(f"key 'optim.kwargs.{key}': set it as {_OPTIMIZER_OWN[key]}, not in optim.kwargs")
        if (not takes_any and key not in accepted) or key == "params":
            takes = ", ".join(k for k in accepted if k not in ("self", "params"))
            shown, cls = str(key)[:80], getattr(opt_class, "__name__", name)
            raise RecipeError(
                f"key 'optim.kwargs.{shown}': {name} ({cls}) takes no argument {shown!r}; it takes: {takes}"
            )
    arguments: dict[str, Any] = {"lr": float(optim.lr), "weight_decay": float(optim.weight_decay)}
    if info.has_momentum:
        arguments["momentum"] = float(optim.momentum)
    own = accepted["betas"].default if "betas" in accepted else None
    betas = tuple(float(b) for b in optim.betas)
    if "betas" in extra:  # any number of betas (adan: 3), checked against the class's own
        if isinstance(own, tuple) and (not isinstance(extra["betas"], list) or len(extra["betas"]) != len(own)):
            raise RecipeError(f"key 'optim.kwargs.betas': {name} takes {len(own)} betas (its own: {list(own)})")
        extra["betas"] = tuple(extra["betas"])
    elif info.has_betas and isinstance(own, tuple) and len(own) == len(betas):
        if betas != _DEFAULT_BETAS or own == _DEFAULT_BETAS:  # left at the default: the optimiser keeps its own
            arguments["betas"] = betas
    elif info.has_betas and betas != _DEFAULT_BETAS:
        raise RecipeError(f"key 'optim.betas': {name} takes other betas (its own: {own}); set optim.kwargs.betas")
    return name, {**arguments, **extra}


def build_optimizer(model: nn.Module, optim: DictConfig) -> torch.optim.Optimizer:
    """The optimiser of timm's ``create_optimizer_v2`` over :func:`param_groups`, from the ``optim`` section.

    ``sgd`` (Nesterov unless ``optim.nesterov=false``) and ``adamw`` build the same torch optimisers, with the same
    arguments, as mbn did before it used timm's factory.
    """
    from timm.optim import create_optimizer_v2

    name, arguments = optimizer_arguments(optim)
    try:
        return create_optimizer_v2(param_groups(model, optim), opt=name, **arguments)
    except (TypeError, ValueError) as err:  # a value the optimiser refuses (e.g. a negative eps)
        raise RecipeError(f"key 'optim.kwargs': {name} refused its arguments ({first_line(err)})") from None


def _first_step_at(fraction: float, span: int) -> int:
    """The first step ``t`` (after the warm-up) with ``t / span >= fraction``, as mbn's step schedule tested it."""
    t = max(0, math.ceil(fraction * span))
    while t > 0 and (t - 1) / span >= fraction:
        t -= 1
    while t / span < fraction:
        t += 1
    return t


def scheduler_arguments(schedule: Any, total_steps: int, warmup_steps: int, steps_per_epoch: int) -> dict[str, Any]:
    """The arguments of timm's ``create_scheduler_v2`` for the steps after the warm-up, counted in steps."""
    prefix = bool(getattr(schedule, "warmup_prefix", True))
    span = max(1, total_steps - warmup_steps) if prefix else max(1, total_steps)
    extra = _plain(schedule.kwargs)
    for key in extra:
        if key in _SCHEDULER_OWN:
            owner = _SCHEDULER_OWN[key]
            instead = f"set it as {owner}" if owner else "mbn sets it (one per-step schedule over trainer.epochs)"
            raise RecipeError(f"key 'schedule.kwargs.{key}': {instead}, not in schedule.kwargs")
    from timm.scheduler import create_scheduler_v2

    accepted = inspect.signature(create_scheduler_v2).parameters
    for key in extra:
        if key not in accepted:
            takes = ", ".join(k for k in accepted if k not in _SCHEDULER_OWN)
            raise RecipeError(
                f"key 'schedule.kwargs.{str(key)[:80]}': timm's schedules take no argument {str(key)[:80]!r}; "
                f"they take: {takes}"
            )
    name = str(schedule.name)
    arguments: dict[str, Any] = {
        "sched": name,
        "num_epochs": span,
        "min_lr": float(schedule.min_lr),
        "decay_rate": float(schedule.gamma),
        "warmup_epochs": 0,
        "step_on_epochs": False,
        "updates_per_epoch": 1,  # timm counts in steps here
    }
    if name == "multistep":
        # timm's milestone m applies from step m - 1 on (its historical convention)
        arguments["decay_milestones"] = [_first_step_at(float(m), span) + 1 for m in schedule.milestones]
    if schedule.decay_epochs is not None:
        decay = float(schedule.decay_epochs)
        arguments["decay_epochs"] = decay if name in ("wsd", "rsqrt") and decay < 1 else decay * steps_per_epoch
        if name == "step" and arguments["decay_epochs"] < 1:
            raise RecipeError(
                f"key 'schedule.decay_epochs': {decay:g} epochs is {arguments['decay_epochs']:.3g} optimisation steps "
                "here; the step schedule decays at most once a step"
            )
    if isinstance(extra.get("stable_timescale"), (int, float)):  # rsqrt's timescale, in epochs as timm's flag
        extra["stable_timescale"] = float(extra["stable_timescale"]) * steps_per_epoch
    elif name == "rsqrt" and "stable_timescale" not in extra:  # timm's default is its own warm-up (0 here)
        arguments["stable_timescale"] = max(1, warmup_steps or steps_per_epoch)
    return {**arguments, **extra}


class StepSchedule:
    """The learning rate of every optimisation step: mbn's linear warm-up, then timm's schedule.

    Stepped once per optimisation step (:meth:`step`, like a torch scheduler). Its state is the step alone; the base
    rate is the recipe's ``optim.lr``, so loading the state of a run trained with another rate sets this run's.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Any, total_steps: int, steps_per_epoch: int) -> None:
        from timm.scheduler import create_scheduler_v2

        self.optimizer = optimizer
        self.warmup_steps = round(float(schedule.warmup_epochs) * steps_per_epoch)
        self.warmup_prefix = bool(getattr(schedule, "warmup_prefix", True))
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        for group, base in zip(optimizer.param_groups, self.base_lrs, strict=True):
            group["initial_lr"] = base  # timm's schedule starts from it
        arguments = scheduler_arguments(schedule, total_steps, self.warmup_steps, steps_per_epoch)
        key = "schedule.kwargs" if schedule.kwargs else "schedule.name"
        refused = f"key '{key}': timm's {arguments['sched']!r} schedule refused"
        try:
            self.decay, _ = create_scheduler_v2(optimizer, **arguments)
            # the rates of the first and last steps after the warm-up: a bad argument fails here, not mid-run
            probes = [lr for t in {self.warmup_steps, (self.warmup_steps + total_steps) // 2, total_steps - 1}
                      for lr in self.lr_at(max(t, 0))]  # fmt: skip
        except (ValueError, TypeError, AssertionError, ArithmeticError) as err:
            raise RecipeError(f"{refused} ({first_line(err)})") from None
        if not all(math.isfinite(lr) and lr >= 0 for lr in probes):
            raise RecipeError(f"{refused}: it gives learning rates {probes} (expected finite, at least 0)")
        self.last_step = 0
        self._apply()

    def lr_at(self, step: int) -> list[float]:
        """Every parameter group's learning rate at optimisation ``step`` (0-based)."""
        if step < self.warmup_steps:
            return [base * ((step + 1) / self.warmup_steps) for base in self.base_lrs]
        t = step - self.warmup_steps if self.warmup_prefix else step
        return list(self.decay._add_noise(self.decay._get_lr(t), t))  # schedule.kwargs.noise: timm's, seeded by t

    def _apply(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.lr_at(self.last_step), strict=True):
            group["lr"] = lr

    def step(self) -> None:
        """One optimisation step is done: the next one's learning rate."""
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        """The learning rates of the next optimisation step (as torch schedulers name it)."""
        return [float(group["lr"]) for group in self.optimizer.param_groups]

    def set_base_lr(self, lr: float, min_lr: float | None = None) -> None:
        """Follow a new ``optim.lr`` (and ``schedule.min_lr``) from the current step on: a resume that changed them."""
        self.base_lrs = [float(lr)] * len(self.optimizer.param_groups)
        self.decay.base_values = list(self.base_lrs)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = float(lr)
        if min_lr is not None and hasattr(self.decay, "lr_min"):
            self.decay.lr_min = float(min_lr)
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        """The step (and, for information, the base rates)."""
        return {"step": self.last_step, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue at a saved step; the ``LambdaLR`` state of mbn < 0.5's checkpoints gives its ``last_epoch``."""
        step = state["step"] if "step" in state else state["last_epoch"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"the saved schedule's step is {step!r}, not a count of steps")
        self.last_step = step
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["initial_lr"] = base
        self._apply()


def check_schedule_builds(schedule: Any, epochs: int, lr: float) -> None:
    """Build the schedule once at recipe load (10,000 steps an epoch, a throw-away optimiser).

    A bad argument is one line before anything is read or written; the run's own steps are checked when it builds.
    """
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=float(lr))
    StepSchedule(optimizer, schedule, int(epochs) * 10_000, 10_000)


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: DictConfig, total_steps: int, steps_per_epoch: int
) -> StepSchedule:
    """The run's :class:`StepSchedule`, stepped once per optimisation step."""
    return StepSchedule(optimizer, schedule, total_steps, steps_per_epoch)
