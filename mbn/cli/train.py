"""``mbn-train RECIPE.yaml [key=value ...]`` and ``mbn-train --resume RUN_DIR [key=value ...]``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mbn.checkpoint import CheckpointError
from mbn.config import RecipeError, load_recipe

EPILOG = """examples:
  mbn-train recipes/advprop.yaml domains.adv.steps=5 domains.adv.eps=4
  mbn-train recipes/quickstart.yaml trainer.out_dir=runs/demo
  mbn-train --resume runs/demo trainer.epochs=10
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="mbn-train",
        description="Train a model with one BatchNorm per data source (AdvProp and N-BN recipes).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", nargs="?", help="recipe YAML file (omit with --resume)")
    parser.add_argument("overrides", nargs="*", help="omegaconf dotlist overrides, e.g. trainer.epochs=5")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from checkpoints/last.pt")
    args = parser.parse_args(argv)
    if args.resume and args.recipe:
        # With --resume the first positional is an override, not a recipe.
        args.overrides.insert(0, args.recipe)
        args.recipe = None
    if not args.resume and not args.recipe:
        parser.error("a RECIPE.yaml (or --resume RUN_DIR) is required")
    return args


def prepare_run(args: argparse.Namespace) -> tuple[object, Path, bool]:
    """Load the recipe (or the run's saved one) and choose the run directory."""
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise RecipeError(f"{run_dir}: not a run directory (no config.yaml) to resume")
        if not (run_dir / "checkpoints" / "last.pt").is_file():
            raise CheckpointError(f"{run_dir / 'checkpoints' / 'last.pt'}: checkpoint not found; nothing to resume")
        cfg = load_recipe(run_dir / "config.yaml", args.overrides)
        cfg.trainer.out_dir = str(run_dir)
        return cfg, run_dir, True
    cfg = load_recipe(args.recipe, args.overrides)
    if cfg.trainer.out_dir is None:
        cfg.trainer.out_dir = f"runs/{Path(args.recipe).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.trainer.out_dir)
    if (run_dir / "checkpoints" / "last.pt").exists():
        raise RecipeError(
            f"key 'trainer.out_dir': {run_dir} already holds a run; resume it with --resume {run_dir} "
            "or choose another out_dir"
        )
    return cfg, run_dir, False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status (2 for bad input, 130 for Ctrl-C)."""
    args = parse_args(argv)
    try:
        cfg, run_dir, resume = prepare_run(args)
        from mbn.engine import (
            Trainer,
            TrainingDivergedError,
            TrainingInterruptedError,
        )  # heavy imports after validation

        trainer = Trainer(cfg, run_dir, resume=resume)  # type: ignore[arg-type]
        print(f"mbn-train: run directory {run_dir} (BN sources: {', '.join(trainer.sources)})", flush=True)
        metrics = trainer.fit()
    except (RecipeError, CheckpointError) as err:
        print(f"mbn-train: error: {err}", file=sys.stderr)
        return 2
    except TrainingInterruptedError as err:
        print(f"mbn-train: {err}", file=sys.stderr)
        return 130
    except TrainingDivergedError as err:
        print(f"mbn-train: error: {err}", file=sys.stderr)
        return 1
    acc = metrics["test_acc_main"]
    print(
        f"mbn-train: done, {metrics['steps']} steps, test accuracy (main BN) {acc:.4f}; "
        f"metrics in {run_dir}/metrics.json"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
