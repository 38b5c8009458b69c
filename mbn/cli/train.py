"""``mbn-train RECIPE.yaml [key=value ...]`` and ``mbn-train --resume RUN_DIR [key=value ...]``.

Under ``torchrun --nproc_per_node=N -m mbn.cli.train RECIPE`` (or ``torchrun --no-python mbn-train RECIPE``)
the N processes train one run (:mod:`mbn.distributed`); rank 0 picks and writes the run directory.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mbn import distributed
from mbn.config import RecipeError, load_recipe
from mbn.distributed import DistContext
from mbn.errors import DomainError, StopSignal, TrainingDivergedError, TrainingInterruptedError, one_line
from mbn.fileio import WriteError
from mbn.rundir import NewRunDir, RunDirError, RunLock
from mbn.shipped import recipe_purpose, recipes_dir, resolve_recipe, shipped_recipes
from mbn.train.checkpoints import CheckpointError
from mbn.train.preemption import signals_raise

EPILOG = """examples:
  mbn-train quickstart                                    # a shipped recipe, by name, from any directory
  mbn-train recipes/advprop.yaml domains.adv.steps=5 domains.adv.eps=4
  mbn-train recipes/quickstart.yaml trainer.out_dir=runs/demo
  mbn-train --resume runs/demo trainer.epochs=10
  torchrun --nproc_per_node=4 -m mbn.cli.train recipes/advprop.yaml    # one run on 4 GPUs
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="mbn-train",
        description="Train a model with one BatchNorm per data source (AdvProp and N-BN recipes).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "recipe",
        nargs="?",
        help="recipe YAML file or a shipped recipe's name (--list-recipes); omit with --resume",
    )
    parser.add_argument("overrides", nargs="*", help="omegaconf dotlist overrides, e.g. trainer.epochs=5")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from checkpoints/last.pt")
    parser.add_argument("--list-recipes", action="store_true", help="list the shipped recipes and exit")
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first (a module name: my_domains for ./my_domains.py registering a domain; repeatable); "
        "stored in the recipe's imports key, so --resume and mbn-eval import it again",
    )
    args = parser.parse_intermixed_args(argv)  # options may follow the overrides (r.yaml k=v --import m k=v)
    if args.list_recipes:
        return args
    if args.resume and args.recipe:
        # With --resume the first positional is an override, not a recipe.
        args.overrides.insert(0, args.recipe)
        args.recipe = None
    if not args.resume and not args.recipe:
        parser.error("a RECIPE.yaml (or --resume RUN_DIR) is required")
    return args


def prepare_run(args: argparse.Namespace, new: NewRunDir | None = None) -> tuple[Any, Path, bool, DistContext]:
    """Load the recipe (or the run's saved one) and choose the run directory.

    Nothing is written here (an automatic ``trainer.out_dir`` is created empty, and recorded in ``new``); the
    trainer checks the directory (lock, existing run) before writing.
    """
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise RecipeError(f"{run_dir}: not a run directory (no config.yaml) to resume")
        cfg = load_recipe(run_dir / "config.yaml", args.overrides, saved_run=True, imports=args.imports)
        dist = distributed.init_from_env(str(cfg.trainer.device))
        if dist.is_main:
            RunLock(run_dir).acquire().release()  # in use? say so before anything else
        if not (run_dir / "checkpoints" / "last.pt").is_file():
            raise CheckpointError(
                f"{run_dir / 'checkpoints' / 'last.pt'}: checkpoint not found; nothing to resume "
                "(the run stopped before its first checkpoint: delete the directory and start again)"
            )
        if any(item.split("=", 1)[0].strip() == "trainer.out_dir" for item in args.overrides):
            raise RecipeError(f"key 'trainer.out_dir': cannot be set with --resume (the run directory is {run_dir})")
        cfg.trainer.out_dir = str(run_dir)
        return cfg, run_dir, True, dist
    recipe = resolve_recipe(args.recipe)
    if not recipe.exists() and not recipe.suffix and len(recipe.parts) == 1:
        raise RecipeError(f"{args.recipe}: no such recipe file or shipped recipe (mbn-train --list-recipes lists them)")
    cfg = load_recipe(recipe, args.overrides, imports=args.imports)
    dist = distributed.init_from_env(str(cfg.trainer.device))
    if cfg.trainer.out_dir is None:  # rank 0 claims it; the other ranks take rank 0's choice
        stem = f"runs/{Path(args.recipe).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        cfg.trainer.out_dir = dist.broadcast_object(str(claim_run_dir(stem, new)) if dist.is_main else None)
    return cfg, Path(cfg.trainer.out_dir), False, dist


def claim_run_dir(stem: str, new: NewRunDir | None = None) -> Path:
    """Create a new directory ``stem`` (or ``stem-2``, ``stem-3``, ... when taken, e.g. by array jobs).

    What it creates (the directory and any missing parent) is recorded in ``new``.
    """
    if new is not None:
        new.before_creating(Path(stem).parent)
    for n in range(1, 1000):
        path = Path(stem if n == 1 else f"{stem}-{n}")
        try:
            path.mkdir(parents=True)
            if new is not None:
                new.created(path)
            return path
        except FileExistsError:
            continue
        except OSError as err:
            raise RecipeError(f"key 'trainer.out_dir': cannot create {path} ({err.strerror})") from None
    raise RecipeError(f"key 'trainer.out_dir': {stem}-2 ... {stem}-999 are all taken; set trainer.out_dir")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status: 2 bad input, 1 failure, 128 + signal number when stopped by one."""
    args = parse_args(argv)
    if args.list_recipes:
        return list_recipes()
    started: list[Any] = []  # the trainer, once built
    # under torchrun, a stop already taken is not aborted by a repeat of the same preemption (SLURM signals every
    # process and the agent forwards it; the agent also signals the other ranks once one has exited)
    with signals_raise(absorb=lambda: bool(started) and started[0].dist.enabled and started[0].stopping):
        try:
            return _train(args, started)
        except (StopSignal, KeyboardInterrupt) as stop:
            signum = stop.signum if isinstance(stop, StopSignal) else int(signal.SIGINT)
            name = signal.Signals(signum).name
            if not started:
                _say(f"{_prog()}: {name} before training started; nothing was written")
            elif not (started[0].ckpt_dir / "last.pt").is_file():
                _say(
                    f"{_prog()}: aborted by {name} at step {started[0].state.step}, before the first checkpoint; "
                    f"nothing to resume (delete {started[0].run_dir} to start again)"
                )
            else:
                trainer = started[0]
                _say(
                    f"{_prog()}: aborted by {name} at step {trainer.state.step}; the last checkpoint in "
                    f"{trainer.ckpt_dir} is kept (resume with: {distributed.resume_command(trainer.run_dir)})"
                )
            return 128 + signum


def _train(args: argparse.Namespace, started: list[Any]) -> int:
    new = NewRunDir()  # what this process creates for a new run: removed again if training never starts
    try:
        cfg, run_dir, resume, dist = prepare_run(args, new)
        from mbn.train.build import build_trainer  # heavy imports after the recipe loaded

        if dist.is_main and not resume:  # rank 0 creates trainer.out_dir and its lock file
            new.before_creating(run_dir)
            new.lock_in(run_dir)
        trainer = build_trainer(cfg, run_dir, resume=resume, dist=dist)
        started.append(trainer)
        main, world = dist.is_main, dist.world_size
        if main:
            procs = f", {world} processes" if world > 1 else ""
            print(f"mbn-train: run directory {run_dir} (BN sources: {', '.join(trainer.sources)}{procs})", flush=True)
        metrics = trainer.fit()
    except (RecipeError, CheckpointError, RunDirError) as err:
        return _fail(err, 2)
    except TrainingInterruptedError as err:
        _say(f"{_prog()}: {err}")
        return err.exit_code
    except (TrainingDivergedError, DomainError, WriteError) as err:
        return _fail(err, 1)
    except RuntimeError as err:  # a peer rank or a DataLoader worker died under this one
        why = lost_process(err, distributed=bool(started) and started[0].dist.enabled)
        if why is None:
            raise
        _say(f"{_prog()}: error: {why}; {_kept(started)}")
        return 1
    finally:
        if not started:  # a recipe, data or model error (or a signal) before training: leave nothing behind
            new.undo()
        distributed.shutdown()
    if not main:
        return 0
    acc = metrics["test_acc_main"]
    print(
        f"mbn-train: done, {metrics['steps']} steps, test accuracy (main BN) {acc:.4f}; "
        f"metrics in {run_dir}/metrics.json"
    )
    return 0


def lost_process(err: BaseException, distributed: bool = True) -> str | None:
    """What died when training fails on another process's death: a DataLoader worker or a peer rank (else None).

    Only a death: a worker killed by a signal or gone, a peer's connection closed (under torchrun). An error a
    worker raised, or a collective failing here, is not translated.
    """
    text = str(err)
    if "DataLoader worker" in text and ("killed by signal" in text or "exited unexpectedly" in text):
        detail = text.split("DataLoader worker", 1)[1].split("\n")[0].strip(" .")
        return f"a DataLoader worker died (worker {detail}); out of memory? lower data.num_workers or data.batch_size"
    peer_words = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    if distributed and (type(err).__name__ == "DistNetworkError" or any(word in text for word in peer_words)):
        return "another rank stopped (its message is above, or it was killed)"
    return None


def _kept(started: list[Any]) -> str:
    """What a failed run leaves: its last checkpoint and how to resume from it, or that there is none."""
    if not started or not (started[0].ckpt_dir / "last.pt").is_file():
        return "no checkpoint was written"
    trainer = started[0]
    resume = distributed.resume_command(trainer.run_dir)
    return f"the last checkpoint in {trainer.ckpt_dir} is kept (resume with: {resume})"


def list_recipes() -> int:
    """Print every shipped recipe's name and purpose (``mbn-train --list-recipes``)."""
    recipes = shipped_recipes()
    width = max(map(len, recipes), default=0)
    for name, path in recipes.items():
        print(f"{name:<{width}}  {recipe_purpose(path)}")
    print(f"\n(in {recipes_dir()}; run one from anywhere with: mbn-train NAME [key=value ...])")
    return 0


def _say(line: str) -> None:
    """One line on stderr in a single write.

    The ranks share one stream, and an unbuffered ``print`` writes the text and its newline separately, so two ranks'
    lines could run together.
    """
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _prog() -> str:
    """``mbn-train``, with the rank under torchrun (the ranks' messages share one terminal)."""
    rank = os.environ.get("RANK")
    return f"mbn-train[rank {rank}]" if rank is not None and distributed.env_world_size() > 1 else "mbn-train"


def _fail(err: BaseException, code: int) -> int:
    """One line on stderr (the traceback too when ``MBN_TRACEBACK=1``); returns ``code``."""
    if os.environ.get("MBN_TRACEBACK"):
        traceback.print_exception(err)
    _say(f"{_prog()}: error: {one_line(err)}")
    return code


if __name__ == "__main__":
    sys.exit(main())
