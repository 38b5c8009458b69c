"""The one owner of mbn's checkpoint format: its schema, where it is written, how a run is restored from it.

A checkpoint is a dict (:class:`Checkpoint`) written by rank 0 through :mod:`mbn.fileio` (temporary file, fsync,
``os.replace``), so an interrupted save never leaves a truncated ``last.pt``; ``best.pt`` is the same dict when the
main BN's test accuracy improved. It is read with ``torch.load(..., weights_only=True)``, checked against the schema
(:func:`validate`) and against the run it continues (same processes, BN sources, data), and every problem (an
empty or foreign file, a model of another shape, a missing entry, other data) is one line naming the file or key.
``mbn-train --resume``, ``model.init_from`` and ``mbn-eval`` all read checkpoints through this module; the
checkpoints of mbn 0.3.x load and resume unchanged.

With ``trainer.keep_best_k`` > 0, :class:`KeptCheckpoints` also keeps the k checkpoints with the best test accuracy
so far under ``RUN/best/`` (``step-000123.pt``, the same dict as ``last.pt``), ranked in ``RUN/best/ledger.json``;
``mbn-avg-checkpoints`` averages them.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from mbn.config import RecipeError
from mbn.distributed import DistContext, resume_command
from mbn.errors import TrainingDivergedError, first_line, one_line
from mbn.fileio import WriteError, atomic_torch_save, atomic_write_text
from mbn.init_from import InitReport, init_from_state
from mbn.resume import resumable
from mbn.train.state import TrainState
from mbn.written_recipe import interpolation_digests, recipe_as_written

if TYPE_CHECKING:  # mbn-eval reads checkpoints without importing the data pipeline or timm
    from mbn.data import DataBundle
    from mbn.ema import WeightEma


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or from an incompatible model."""


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (tensors and plain containers only).

    Raises:
        CheckpointError: missing or unreadable file, with the path in the message.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        with path.open("rb") as f:
            head = f.read(4)
        if head[:2] != b"PK" and head[:1] != b"\x80":  # neither torch.save's zip nor a legacy pickle
            raise CheckpointError(f"{path}: not a readable checkpoint (not a file torch.save wrote)") from None
        if "GLOBAL" not in str(err) and "allowed global" not in str(err):  # a damaged pickle, not a refused object
            raise CheckpointError(f"{path}: not a readable checkpoint (damaged: {_unpickler_reason(err)})") from None
        raise CheckpointError(
            f"{path}: holds objects other than tensors and plain containers; mbn loads checkpoints with "
            f"weights_only=True and runs no code from a file ({first_line(err).split('. ')[0]})"
        ) from None
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({first_line(err)})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not an mbn checkpoint (no 'model' entry)")
    return ckpt


def _unpickler_reason(err: Exception) -> str:
    """The reason in torch's weights_only error (``Unsupported operand 254``), without its advice paragraph."""
    text = str(err)
    _, found, reason = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in reason.splitlines() if line.strip()] if found else []
    return lines[0] if lines else first_line(err)


def load_model_state(model: torch.nn.Module, state: dict[str, Any], path: Path) -> None:
    """``load_state_dict`` with a one-line error when the checkpoint belongs to another model."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        detail = (missing or unexpected)[:3]
        kind = "missing" if missing else "unexpected"
        raise CheckpointError(f"{path}: checkpoint does not match the model ({kind} keys, e.g. {detail})")
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or tensor.shape != own[key].shape:
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise CheckpointError(
                f"{path}: checkpoint does not match the model ({key}: {got} in the checkpoint, "
                f"{tuple(own[key].shape)} in the model; another width or architecture?)"
            )
    model.load_state_dict(state)


def require_entries(ckpt: dict[str, Any], keys: tuple[str, ...], path: Path, what: str) -> None:
    """Every entry of ``keys`` is in the checkpoint, else a one-line error saying which are missing."""
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not {what} (missing {', '.join(repr(k) for k in missing)})")


def resolve_checkpoint(path: Path) -> tuple[Path, Path]:
    """``(checkpoint file, run directory)`` for a run directory or a checkpoint path."""
    path = Path(path)
    if path.is_dir():
        ckpt = path / "checkpoints" / "last.pt"
        if not ckpt.is_file():
            raise CheckpointError(f"{path}: not a run directory (expected {ckpt})")
        return ckpt, path
    if not path.is_file():
        raise CheckpointError(f"{path}: no such run directory or checkpoint file")
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return path, run_dir


# --------------------------------------------------------------------------------------------------- the schema
class Checkpoint(TypedDict, total=False):
    """What ``last.pt`` / ``best.pt`` hold (every entry plain types or tensors: ``weights_only`` reads it)."""

    model: dict[str, Tensor]  # the converted model's state dict: every BN source, the heads
    ema: dict[str, Tensor]  # the weight average's (ema.decay > 0), same keys as model
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    state: dict[str, Any]  # TrainState as a dict: the position in training
    sources: list[str]  # BN sources, main first
    heads: dict[str, int]  # auxiliary heads and their sizes
    data: dict[str, Any]  # DataStats: class names, normalisation
    data_fingerprint: str  # identity of the training set (resume on the same data)
    config: dict[str, Any]  # the recipe: resolved, its interpolations as written (mbn.written_recipe)
    interpolated: dict[str, str]  # SHA-256 of what each interpolation of a non-resumable key resolved to
    train_time: float
    wall_time: float
    clock: dict[str, Any]  # throughput counters
    last_window: dict[str, float]  # the last logged means (metrics.json)
    meter: dict[str, Any]  # the open logging window
    world_size: int  # processes that trained (a resume needs as many)


#: What each use of a checkpoint needs.
REQUIRED: dict[str, tuple[str, ...]] = {
    "resume": ("model", "optimizer", "scheduler", "scaler", "state", "config"),
    "evaluate": ("model", "config", "sources"),
    "init": ("model",),
}
#: What each use reads when present (a ``None`` entry counts as absent: a checkpoint slimmed for release).
OPTIONAL: dict[str, tuple[str, ...]] = {
    "resume": ("ema", "sources", "heads", "data"),
    "evaluate": ("ema", "heads", "data"),
    "init": ("sources",),
}
_PURPOSE = {
    "resume": "a training checkpoint to resume",
    "evaluate": "a checkpoint written by mbn-train",
    "init": "an mbn checkpoint",
}
_TYPES: dict[str, type | tuple[type, ...]] = {
    "model": dict,
    "ema": dict,
    "optimizer": dict,
    "state": dict,
    "config": dict,
    "sources": (list, tuple),
    "heads": dict,
    "data": dict,
}


def validate(ckpt: Mapping[str, Any], path: Path, purpose: Literal["resume", "evaluate", "init"]) -> Checkpoint:
    """``ckpt`` checked against :class:`Checkpoint` for ``purpose``; a :class:`CheckpointError` names the entry."""
    require_entries(dict(ckpt), REQUIRED[purpose], path, _PURPOSE[purpose])
    for key in (*REQUIRED[purpose], *OPTIONAL[purpose]):
        kind = _TYPES.get(key)
        optional_and_absent = key in OPTIONAL[purpose] and ckpt.get(key) is None
        if kind is not None and not optional_and_absent and not isinstance(ckpt[key], kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise CheckpointError(f"{path}: its {key!r} entry is not a {names}")
    return ckpt  # type: ignore[return-value]


def read_checkpoint(
    path: Path, purpose: Literal["resume", "evaluate", "init"], map_location: str | torch.device = "cpu"
) -> Checkpoint:
    """:func:`load_checkpoint` then :func:`validate`."""
    return validate(load_checkpoint(path, map_location), Path(path), purpose)


# ------------------------------------------------------------------------------------------- reading for a run
#: What loading a saved optimiser, schedule or training-session state raises when it belongs to another run.
STATE_ERRORS = (ValueError, KeyError, TypeError, AttributeError, RuntimeError)


def state_does_not_fit(path: Path, err: BaseException) -> CheckpointError:
    """The one-line error for a saved state (optimiser, schedule, position, clock, meter) this run cannot take."""
    return CheckpointError(f"{path}: optimiser or training state does not fit this run ({first_line(err)})")


def init_model_from(model: nn.Module, ckpt: Mapping[str, Any]) -> InitReport:
    """``model.init_from``: load every tensor of that checkpoint that fits the model; the report says what."""
    return init_from_state(model, ckpt["model"], ckpt.get("sources") or ())


def check_same_data(saved: Any, data: DataBundle, root: Any, path: Path) -> None:
    """A resume trains on the data it started with: same classes, same normalisation statistics."""
    if not isinstance(saved, dict):
        return
    now = data.stats.to_dict()
    if list(saved.get("class_names", [])) != now["class_names"]:
        raise RecipeError(
            f"key 'data.root': {root} holds classes {now['class_names'][:5]}..., the run was "
            f"trained on {list(saved.get('class_names', []))[:5]}... ({path}); resume on the same data"
        )
    for key in ("mean", "std"):
        old, new = saved.get(key), now[key]
        if old is not None and any(abs(a - b) > 1e-5 for a, b in zip(old, new, strict=False)):
            raise RecipeError(
                f"key 'data.root': the images of {data.describe_training_set(root)} differ from the run's "
                f"({key} {_rounded(old)} in {path}, {_rounded(new)} now); resume on the same data"
            )


def _rounded(values: Any) -> list[float]:
    return [round(float(v), 4) for v in values]


# ---------------------------------------------------------------------------------- the k best checkpoints kept
#: The directory of the kept best checkpoints, under the run directory, and its ranking.
KEPT_DIR = "best"
LEDGER = "ledger.json"


def kept_name(step: int) -> str:
    """``step-000123.pt``: the file of the checkpoint kept at ``step``."""
    return f"step-{step:06d}.pt"


@dataclass(frozen=True)
class KeptEntry:
    """One kept checkpoint: its step, the test accuracy it was ranked by, its file in ``RUN/best/``."""

    step: int
    metric: float
    file: str


def _rank(entries: list[KeptEntry]) -> list[KeptEntry]:
    """Best first; a tie keeps the earlier step first (a later checkpoint must beat a kept one to displace it)."""
    return sorted(entries, key=lambda e: (-e.metric, e.step))


def read_ledger(directory: Path) -> tuple[str | None, list[KeptEntry]]:
    """``(metric tag, kept entries best first)`` of ``directory/ledger.json``; ``(None, [])`` when there is none.

    Raises:
        CheckpointError: an unreadable ledger, naming it.
    """
    path = Path(directory) / LEDGER
    if not path.is_file():
        return None, []
    try:
        ledger = json.loads(path.read_text())
        entries = [KeptEntry(int(e["step"]), float(e["metric"]), str(e["file"])) for e in ledger["kept"]]
        metric = ledger.get("metric")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: not a readable ledger of kept checkpoints ({first_line(err)})") from None
    if any(Path(e.file).name != e.file for e in entries):  # a name, never a path out of RUN/best
        raise CheckpointError(f"{path}: not a readable ledger of kept checkpoints (a file entry is a path)")
    return (str(metric) if metric is not None else None), _rank(entries)


class KeptCheckpoints:
    """``RUN/best/``: the ``k`` checkpoints with the best test accuracy so far, ranked in ``ledger.json``.

    Every write is atomic (:mod:`mbn.fileio`) and ordered so that a kill leaves a consistent directory: the new
    checkpoint, then the ledger, then the deletion of the checkpoint that fell out (a file the ledger does not name
    is removed when the run resumes). Rank 0 alone calls it (:meth:`RunCheckpoints.save`).

    Args:
        directory: ``RUN/best``.
        k: how many to keep (``trainer.keep_best_k``, > 0).
    """

    def __init__(self, directory: Path, k: int) -> None:
        if k < 1:
            raise ValueError(f"keep {k} checkpoints? expected 1 or more")
        self.dir, self.k = Path(directory), k
        self.metric: str | None = None  # the tag the ranking is by (acc_test/<main> or acc_test_ema/<main>)
        self.entries: list[KeptEntry] = []  # best first

    def offer(self, step: int, metric: float, tag: str, ckpt: Mapping[str, Any]) -> bool:
        """Keep ``ckpt`` when ``metric`` is among the best ``k`` so far (a step offered again replaces its entry)."""
        new = KeptEntry(step, float(metric), kept_name(step))
        ranked = _rank([e for e in self.entries if e.step != step] + [new])
        kept, dropped = ranked[: self.k], ranked[self.k :]
        if new in kept:
            atomic_torch_save(dict(ckpt), self.dir / new.file)
        if kept != self.entries or tag != self.metric:
            self.entries, self.metric = kept, tag
            self._write_ledger()
        for entry in dropped:
            if entry.file not in {e.file for e in kept}:
                (self.dir / entry.file).unlink(missing_ok=True)
        return new in kept

    def resume(self, step: int) -> None:
        """Continue the ranking of a run resumed at ``step``: read the ledger back, forget what came after ``step``.

        The steps after the resumed checkpoint are trained (and evaluated) again, so their entries are dropped here
        and offered again; entries beyond ``k`` (a lower ``trainer.keep_best_k``) and files no entry names go.
        """
        self.metric, entries = read_ledger(self.dir)
        kept = [e for e in entries if e.step <= step and (self.dir / e.file).is_file()][: self.k]
        if kept != entries:
            self.entries = kept
            self._write_ledger()
        self.entries = kept
        names = {e.file for e in kept}
        for path in self.dir.glob("step-*.pt") if self.dir.is_dir() else []:
            if path.name not in names:
                path.unlink(missing_ok=True)

    def _write_ledger(self) -> None:
        ledger = {
            "metric": self.metric,
            "k": self.k,
            "kept": [{"step": e.step, "metric": e.metric, "file": e.file} for e in self.entries],
        }
        atomic_write_text(self.dir / LEDGER, json.dumps(ledger, indent=2) + "\n")


# ------------------------------------------------------------------------------------------- the run's files
class RunCheckpoints:
    """``checkpoints/last.pt`` and ``best.pt`` of one run: what goes in, how it is written, how it comes back.

    Args:
        directory: ``RUN/checkpoints``.
        dist: the ranks; rank 0 alone writes.
        model, optimizer, scheduler, scaler, ema: the trained objects, saved and restored in place.
        cfg: the recipe (saved as written); data: the training data (statistics, fingerprint); sources, heads: the
            model's BN sources and auxiliary heads; gentler: the overrides a divergence message suggests.
    """

    def __init__(
        self,
        directory: Path,
        dist: DistContext,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        scaler: torch.amp.GradScaler,
        ema: WeightEma | None,
        cfg: DictConfig,
        data: DataBundle,
        sources: tuple[str, ...],
        heads: Mapping[str, int],
        gentler: str = "optim.lr=<lower> optim.grad_clip=1.0",
        keep_best_k: int = 0,
    ) -> None:
        self.dir, self.dist = Path(directory), dist
        self.model, self.optimizer, self.scheduler, self.scaler, self.ema = model, optimizer, scheduler, scaler, ema
        self.cfg, self.data, self.sources, self.heads = cfg, data, sources, dict(heads)
        self.data_fingerprint = data.fingerprint()
        self.saved_step: int | None = None  # the step of the last checkpoint written or resumed from
        self.gentler = gentler  # the overrides a divergence message suggests for the resume
        # trainer.keep_best_k: the k best checkpoints by ranked_metric, under RUN/best/
        self.kept = KeptCheckpoints(self.dir.parent / KEPT_DIR, keep_best_k) if keep_best_k > 0 else None

    @property
    def last(self) -> Path:
        """``checkpoints/last.pt``."""
        return self.dir / "last.pt"

    def kept_note(self) -> str:
        """What a stopped run leaves to resume from, for its one-line error."""
        if not self.last.exists():
            return "no checkpoint written yet"
        at = f" (step {self.saved_step})" if self.saved_step is not None else ""
        return f"last good checkpoint{at} kept at {self.last}"

    def rescue_note(self) -> str:
        """How to go on after a divergence: resume from the last good checkpoint more gently (or start again)."""
        gentler = self.gentler
        if not self.last.exists():
            return f"start again with a lower learning rate or gradient clipping ({gentler})"
        return f"resume it with a lower learning rate or gradient clipping: {resume_command(self.dir.parent)} {gentler}"

    def check_finite_weights(self, step: int) -> None:
        """Refuse to write weights that are not finite: parameters, BN statistics, the weight average, optimiser state.

        A finite but huge loss can give an update that overflows; its loss was finite, so only the weights tell.
        One host sync (checkpoints only); under torchrun every rank calls it and every rank raises.

        Raises:
            TrainingDivergedError: naming the first non-finite tensor and the step; nothing is written.
        """
        named: list[tuple[str, Tensor]] = [(f"model {k}", v) for k, v in self.model.state_dict().items()]
        if self.ema is not None:
            named += [(f"weight average (ema) {k}", v) for k, v in self.ema.module.state_dict().items()]
        for i, state in enumerate(self.optimizer.state.values()):
            named += [(f"optimiser state {k} of parameter {i}", v) for k, v in state.items() if isinstance(v, Tensor)]
        named = [(k, v) for k, v in named if v.is_floating_point() or v.is_complex()]
        if not named:
            return
        device = named[0][1].device
        finite = torch.stack([torch.isfinite(v).all().to(device) for _, v in named]).to(torch.uint8)
        finite = self.dist.min_over_ranks(finite)
        bad = [k for (k, _), ok in zip(named, finite.tolist(), strict=True) if not ok]
        if bad:
            raise TrainingDivergedError(
                f"non-finite weights after step {step} ({bad[0]}"
                + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
                + f"): the update diverged although its loss was finite; not saved; {self.kept_note()}; "
                + self.rescue_note()
            )

    def check_same_run(self, ckpt: Checkpoint, path: Path, root: Any) -> None:
        """A resume continues the run it saved: as many processes, the same BN sources, the same training data."""
        saved_world = ckpt.get("world_size", 1)
        if saved_world != self.dist.world_size:
            raise RecipeError(
                f"resume with the number of processes the run was trained with: {saved_world} "
                f"(torchrun --nproc_per_node x --nnodes), not {self.dist.world_size}; each process's shard of the "
                "epoch depends on it"
            )
        if list(ckpt.get("sources") or self.sources) != list(self.sources):
            raise RecipeError(
                f"resume cannot change the BN sources {list(ckpt['sources'])} -> {list(self.sources)} (the first "
                "is the main BN); restore the domains' order and bn names"
            )
        check_same_data(ckpt.get("data"), self.data, root, path)
        saved = ckpt.get("data_fingerprint")
        if saved is not None and saved not in (self.data_fingerprint, self.data.legacy_fingerprint):
            raise RecipeError(
                f"key 'data.root': {self.data.describe_training_set(root)} is not the one this run was trained on "
                f"(another image count, labels or images than in {path}); resume on the same data"
            )

    def save(self, state: TrainState, session: Mapping[str, Any]) -> None:
        """Write ``last.pt`` atomically (and ``best.pt`` when these weights were evaluated and improved); rank 0 only.

        ``session`` holds the training session's own entries (clock, meter, last window, wall and train time).
        """
        if not self.dist.is_main:
            self.saved_step = state.step  # rank 0 writes it (or stops every rank when it cannot)
            return
        ckpt: dict[str, Any] = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "state": asdict(state),
            "sources": list(self.sources),
            "heads": dict(self.heads),
            "data": self.data.stats.to_dict(),
            "data_fingerprint": self.data_fingerprint,
            "config": recipe_as_written(self.cfg),  # interpolations as written: no secret from the environment
            "interpolated": interpolation_digests(self.cfg, keep=lambda key: not resumable(key)),
            **session,
            "world_size": self.dist.world_size,
        }
        if self.ema is not None:
            ckpt["ema"] = self.ema.module.state_dict()
        ranked = self.ranked_metric(state)
        if self.kept is not None and ranked is not None and state.evaluated_step == state.step:
            # before last.pt: a crash in between leaves a ranked step past last.pt, which a resume drops and re-ranks
            self.kept.offer(state.step, ranked[1], ranked[0], ckpt)
        atomic_torch_save(ckpt, self.last)
        self.saved_step = state.step
        main = state.test_acc.get(self.sources[0])
        if main is not None and state.evaluated_step == state.step and main >= state.best_acc:  # these weights
            atomic_torch_save(ckpt, self.dir / "best.pt")

    def ranked_metric(self, state: TrainState) -> tuple[str, float] | None:
        """``(tag, accuracy)`` the kept checkpoints are ranked by; None before any evaluation.

        The main BN's test accuracy of the EMA weights when the run has a weight average (as timm's
        ``CheckpointSaver`` ranks by the EMA's metric with ``--model-ema``), else of the trained weights.
        """
        main = self.sources[0]
        if self.ema is not None and main in state.test_acc_ema:
            return f"acc_test_ema/{main}", float(state.test_acc_ema[main])
        if main in state.test_acc:
            return f"acc_test/{main}", float(state.test_acc[main])
        return None

    def save_on_every_rank(self, save: Any) -> None:
        """``save()``, then rank 0's outcome on every rank: no rank exits before rank 0 has written.

        A rank leaving first would have the torchrun agent stop the others mid-write; a rank waiting at a barrier
        while rank 0 fails to write would be killed by the agent without a word. So rank 0 sends its error (or
        none) and every rank raises it as one line.
        """
        if not self.dist.enabled:
            save()
            return
        failure: Exception | None = None
        try:
            save()
        except (WriteError, TrainingDivergedError) as err:  # the others reach the broadcast before raising
            failure = err
        reason = self.dist.broadcast_object(one_line(failure) if failure is not None else None)
        if failure is not None:
            raise failure
        if reason is not None:
            raise WriteError(f"rank 0 could not save the checkpoint: {reason}")

    def restore(self, ckpt: Checkpoint, path: Path, batches_per_epoch: int) -> TrainState:
        """Load the trained objects from a resume checkpoint (checked by :meth:`check_same_run`); its position."""
        load_model_state(self.model, ckpt["model"], path)
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
            state = TrainState(**ckpt["state"])
            state.check(batches_per_epoch)
        except STATE_ERRORS as err:
            raise state_does_not_fit(path, err) from None
        self.saved_step = state.step
        if self.kept is not None and self.dist.is_main:  # the ranking goes on from the ledger
            self.kept.resume(state.step)
        return state

    def restore_ema(self, ckpt: Checkpoint, path: Path) -> bool:
        """The weight average a resumed run continues; False for a run saved without one (it starts fresh)."""
        assert self.ema is not None
        state = ckpt.get("ema")
        if state is None:
            return False
        try:
            self.ema.module.load_state_dict(state)
        except (RuntimeError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{path}: its 'ema' entry does not fit this model ({first_line(err)})") from None
        return True
