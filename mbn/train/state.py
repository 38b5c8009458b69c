"""Where a run is (:class:`TrainState`, saved in every checkpoint) and how long it runs (:class:`RunLength`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mbn.validators import is_int


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

    def check(self, batches_per_epoch: int) -> None:
        """A position this run can continue from; a ``ValueError`` names the bad field."""
        for name in ("step", "epoch", "batch", "evaluated_step"):
            value = getattr(self, name)
            if not is_int(value, low=-1 if name == "evaluated_step" else 0):
                raise ValueError(f"state.{name} = {value!r} is not a position")
        if self.batch > batches_per_epoch:
            raise ValueError(f"state.batch = {self.batch} is past the {batches_per_epoch} batches of an epoch")
        if not isinstance(self.test_acc, dict) or not isinstance(self.test_acc_ema, dict):
            raise ValueError("state.test_acc / state.test_acc_ema are not accuracies")
        if not isinstance(self.best_acc, (int, float)):
            raise ValueError("state.best_acc is not an accuracy")


@dataclass(frozen=True)
class RunLength:
    """How long a run trains, in epochs, batches and optimisation steps.

    Attributes:
        epochs: epochs to train (``trainer.epochs``, or what ``trainer.budget_of`` matches).
        steps_per_epoch: optimisation steps per epoch (an epoch's last incomplete group of micro-batches is dropped).
        accum_steps: batches per optimisation step (``optim.grad_accum_steps``).
        max_steps: ``trainer.max_steps`` (0: none).
        eval_every: evaluate every this many epochs (0: at the end only).
    """

    epochs: int
    steps_per_epoch: int
    accum_steps: int = 1
    max_steps: int = 0
    eval_every: int = 1

    @property
    def batches_per_epoch(self) -> int:
        """Batches trained per epoch (whole groups of micro-batches)."""
        return self.steps_per_epoch * self.accum_steps

    @property
    def total_steps(self) -> int:
        """Optimisation steps of every epoch (the schedule and the domains' windows span them)."""
        return self.epochs * self.steps_per_epoch

    @property
    def planned_steps(self) -> int:
        """Where this session stops: the last epoch's end, or ``trainer.max_steps`` before it."""
        return min(self.total_steps, self.max_steps or self.total_steps)

    def done(self, state: TrainState) -> bool:
        """This session has trained its planned steps."""
        return state.step >= self.planned_steps

    def epoch_done(self, state: TrainState) -> bool:
        """Every optimisation step of the current epoch is done."""
        return state.batch >= self.batches_per_epoch

    def eval_due(self, state: TrainState) -> bool:
        """Evaluate after the epoch just finished (``trainer.eval_every``, and always after the last)."""
        return state.epoch >= self.epochs or (self.eval_every > 0 and state.epoch % self.eval_every == 0)
