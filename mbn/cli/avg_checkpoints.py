"""``mbn-avg-checkpoints RUN [--k K] [-o OUT]``: average the weights of a run's kept best checkpoints.

A run trained with ``trainer.keep_best_k=K`` keeps its K best checkpoints under ``RUN/best/``; this averages the
best ``--k`` of them (default: all) into one checkpoint (``RUN/averaged/averaged.pt`` unless ``-o``) that
``mbn-eval`` and ``mbn-export`` read. See :mod:`mbn.averaging` for what is averaged.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

EPILOG = """examples:
  mbn-train recipes/advprop.yaml trainer.keep_best_k=5 trainer.out_dir=runs/advprop
  mbn-avg-checkpoints runs/advprop                    # all kept -> runs/advprop/averaged/averaged.pt
  mbn-avg-checkpoints runs/advprop --k 3 -o runs/advprop/averaged/best3.pt
  mbn-eval runs/advprop/averaged/averaged.pt          # report in runs/advprop/averaged/
"""

#: Where the averaged checkpoint goes without ``-o``, under the run directory.
DEFAULT_OUT = Path("averaged") / "averaged.pt"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(
        prog="mbn-avg-checkpoints",
        description="Average the weights of the best checkpoints a run kept (trainer.keep_best_k) into one "
        "checkpoint that mbn-eval and mbn-export read.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", type=Path, help="run directory trained with trainer.keep_best_k > 0")
    p.add_argument("--k", type=int, default=None, help="average the K best kept checkpoints (default: all kept)")
    p.add_argument("-o", "--out", type=Path, default=None, help=f"checkpoint to write (default: RUN/{DEFAULT_OUT})")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status (2 for bad input, 1 for a failed write)."""
    args = parse_args(argv)
    from mbn.averaging import AverageError, average_kept
    from mbn.fileio import WriteError, atomic_torch_save
    from mbn.train.checkpoints import CheckpointError

    out = args.out if args.out is not None else args.run / DEFAULT_OUT
    if out.is_dir():
        out = out / DEFAULT_OUT.name
    try:
        averaged = average_kept(args.run, args.k)
    except (AverageError, CheckpointError) as err:
        print(f"mbn-avg-checkpoints: error: {err}", file=sys.stderr)
        return 2
    try:
        atomic_torch_save(averaged.checkpoint, out)
    except WriteError as err:
        print(f"mbn-avg-checkpoints: error: {err}", file=sys.stderr)
        return 1
    steps = ", ".join(str(e.step) for e in averaged.entries)
    ema = "model and EMA weights" if averaged.ema else "model weights"
    print(f"mbn-avg-checkpoints: wrote {out}: {ema} averaged over {len(averaged.entries)} checkpoints "
          f"(steps {steps}; ranked by {averaged.metric})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
