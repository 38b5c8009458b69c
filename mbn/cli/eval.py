"""``mbn-eval RUN_DIR_OR_CHECKPOINT [--all | --clean --per-bn --corruptions --adversarial --divergence ...]``.

Evaluates a trained model through its main BN in eval mode (per-BN accuracy goes through every BN) and writes
``eval.json`` (merged with an earlier one), ``eval.md`` and plots into the run directory or ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from mbn.checkpoint import CheckpointError
from mbn.config import RecipeError

EPILOG = """examples:
  mbn-eval runs/advprop                      # clean + per-BN accuracy
  mbn-eval runs/advprop --all --limit 1000   # + corruptions, PGD sweeps, BN divergence
  mbn-eval runs/advprop --adversarial --linf-eps 1 2 4 8 16 --pgd-steps 20
  mbn-eval runs/advprop --corruptions --reference runs/vanilla   # CE / mCE relative to another run
  mbn-eval runs/advprop --adversarial --autoattack --autoattack-eps 8
"""

SECTIONS = ("clean", "per_bn", "corruptions", "adversarial", "divergence")
SCHEMA_KEYS = (
    "checkpoint",
    "run_dir",
    "limit",
    "num_images",
    "sources",
    "clean_acc",
    "per_bn_acc",
    "corruptions",
    "adversarial",
    "divergence",
)


class EvalInputError(ValueError):
    """A command-line value or reference file is invalid."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(
        prog="mbn-eval",
        description="Evaluate a trained mbn run: clean and per-BN accuracy, common corruptions, PGD robustness "
        "(optionally AutoAttack) and BN-statistics divergence. Writes eval.json, eval.md and plots.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="run directory (uses checkpoints/last.pt) or a checkpoint file")
    sel = p.add_argument_group("what to evaluate (default: --clean --per-bn)")
    sel.add_argument("--all", action="store_true", help="everything below (AutoAttack only with --autoattack)")
    sel.add_argument("--clean", action="store_true", help="accuracy through the main BN")
    sel.add_argument("--per-bn", action="store_true", help="accuracy through every BN source")
    sel.add_argument("--corruptions", action="store_true", help="CIFAR-10-C style corruptions (generated, cached)")
    sel.add_argument("--adversarial", action="store_true", help="PGD-k robust accuracy over L-inf and L2 radii")
    sel.add_argument("--divergence", action="store_true", help="per-layer divergence of aux BN statistics")
    sel.add_argument(
        "--autoattack", action="store_true", help="also standard L-inf AutoAttack (slow; implies --adversarial)"
    )
    opt = p.add_argument_group("options (defaults from the run's `eval` recipe section)")
    opt.add_argument(
        "--limit", type=int, metavar="N", help="use N test images (a fixed seeded subset, as data.test_limit)"
    )
    opt.add_argument("--out", type=Path, metavar="DIR", help="output directory (default: the run directory)")
    opt.add_argument("--reference", metavar="EVAL", help="eval.json or run directory for corruption CE / mCE")
    opt.add_argument(
        "--data-root", type=Path, metavar="DIR", help="dataset root to evaluate on (default: the recipe's data.root)"
    )
    opt.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    opt.add_argument(
        "--batch-size", type=int, metavar="B", help="evaluation batch size (default: data.eval_batch_size)"
    )
    opt.add_argument("--pgd-steps", type=int, metavar="K", help="PGD steps (step size 2.5 * eps / K)")
    opt.add_argument("--linf-eps", type=float, nargs="+", metavar="E", help="L-inf radii in 0-255 units")
    opt.add_argument("--l2-eps", type=float, nargs="+", metavar="E", help="L2 radii in [0,1]-pixel units")
    opt.add_argument(
        "--autoattack-eps",
        type=float,
        nargs="+",
        metavar="E",
        help="AutoAttack L-inf radii in 0-255 units (default: the largest --linf-eps)",
    )
    opt.add_argument(
        "--corruption-types", nargs="+", metavar="NAME", help="corruptions (default: the 15 of CIFAR-10-C)"
    )
    opt.add_argument("--severities", type=int, nargs="+", metavar="S", help="severities (default: 1 2 3 4 5)")
    opt.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="corruption cache (default: $MBN_CACHE_DIR/corruptions, else ~/.cache/mbn/corruptions)",
    )
    opt.add_argument("--seed", type=int, default=0, help="seed of PGD random starts, AutoAttack and corruptions")
    return p.parse_args(argv)


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise EvalInputError(f"{name}: expected a positive integer, got {value}")


def _radii(name: str, values: Sequence[float]) -> list[float]:
    for v in values:
        if not math.isfinite(v) or v < 0:
            raise EvalInputError(f"{name}: expected radii >= 0, got {v}")
    return [float(v) for v in values]


def selected_sections(args: argparse.Namespace) -> set[str]:
    """The sections this invocation computes (``clean`` always: every other number is read against it)."""
    chosen = {s for s in SECTIONS if getattr(args, s)}
    if args.all:
        chosen = set(SECTIONS)
    if args.autoattack:
        chosen.add("adversarial")
    if not chosen:
        chosen = {"clean", "per_bn"}
    return chosen | {"clean"}


def check_args(args: argparse.Namespace, sections: set[str]) -> None:
    """Validate values argparse cannot."""
    _positive("--limit", args.limit)
    _positive("--batch-size", args.batch_size)
    _positive("--pgd-steps", args.pgd_steps)
    if args.seed < 0:
        raise EvalInputError(f"--seed: expected an integer >= 0, got {args.seed}")
    for name in ("linf_eps", "l2_eps", "autoattack_eps"):
        if getattr(args, name) is not None:
            _radii("--" + name.replace("_", "-"), getattr(args, name))
    if args.reference is not None and "corruptions" not in sections:
        raise EvalInputError("--reference: only used with --corruptions (or --all)")
    if args.corruption_types is not None or args.severities is not None:
        from mbn.eval.corruptions import ALL_CORRUPTIONS, SEVERITIES

        for name in args.corruption_types or []:
            if name not in ALL_CORRUPTIONS:
                raise EvalInputError(f"--corruption-types: unknown {name!r}; expected some of {list(ALL_CORRUPTIONS)}")
        for sev in args.severities or []:
            if sev not in SEVERITIES:
                raise EvalInputError(f"--severities: expected values in {list(SEVERITIES)}, got {sev}")


def load_previous(path: Path, current: dict[str, Any], checkpoint: Path) -> dict[str, Any]:
    """Sections of an earlier ``eval.json`` that may be merged: same checkpoint, limit and size, not older than it.

    Anything else (another checkpoint, another image subset, a checkpoint rewritten since) is dropped with a note
    on stderr, so one file never mixes numbers of different models or test sets.
    """
    if not path.is_file():
        return {}
    try:
        previous = json.loads(path.read_text())
        if not isinstance(previous, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        print(f"mbn-eval: note: ignoring unreadable {path} ({err})", file=sys.stderr)
        return {}
    same = all(previous.get(k) == current[k] for k in ("checkpoint", "limit", "num_images"))
    if not same:
        print(f"mbn-eval: note: {path} was for another checkpoint or image subset; replacing it", file=sys.stderr)
        return {}
    if checkpoint.stat().st_mtime > path.stat().st_mtime:
        print(f"mbn-eval: note: {checkpoint} is newer than {path}; replacing it", file=sys.stderr)
        return {}
    return previous


def merge_adversarial(new: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
    """Keep radii (and AutoAttack results) of an earlier PGD sweep with the same steps and BN; new values win."""
    if not old or old.get("steps") != new["steps"] or old.get("bn") != new["bn"]:
        return new
    merged = dict(new)
    for norm in ("linf", "l2"):
        merged[norm] = {**old.get(norm, {}), **new[norm]}
        merged[norm] = dict(sorted(merged[norm].items(), key=lambda kv: float(kv[0])))
    if new.get("autoattack") is None:
        merged["autoattack"] = old.get("autoattack")
    elif old.get("autoattack"):
        merged["autoattack"] = {**old["autoattack"], **new["autoattack"]}
    return merged


def evaluate(args: argparse.Namespace, sections: set[str]) -> tuple[dict[str, Any], Path]:
    """Run the selected evaluations; return the merged ``eval.json`` content and the output directory."""
    import numpy as np

    from mbn.data import ArraySplit, EvalLoader, subset_indices, to_device
    from mbn.divergence import bn_divergence
    from mbn.eval.corruptions import CORRUPTIONS
    from mbn.eval.loading import load_run
    from mbn.eval.robustness import (
        autoattack_accuracy,
        corruption_accuracy,
        corruption_dataset_id,
        corruption_summary,
        default_corruption_cache,
        eps_key,
        load_reference_corruptions,
        robustness_sweep,
    )
    from mbn.evaluate import accuracy

    run = load_run(Path(args.path), args.device, data_root=args.data_root)
    ecfg = run.cfg.eval
    main = run.sources[0]
    autoattack = "adversarial" in sections and (args.autoattack or bool(ecfg.autoattack))
    if autoattack and run.stats.num_classes < 4:
        raise EvalInputError(f"--autoattack: needs at least 4 classes (DLR loss), the run has {run.stats.num_classes}")
    limit = args.limit if args.limit is not None else ecfg.limit
    _positive("eval.limit", limit)
    images, labels = run.test.images, run.test.labels
    if limit is not None:  # a seeded subset, as data.test_limit: the first N of a class-sorted folder are one class
        keep = subset_indices(len(labels), limit, "--limit")
        images, labels = images[keep], labels[keep]
    batch_size = args.batch_size or int(run.cfg.data.eval_batch_size)
    loader = EvalLoader(ArraySplit(images, labels), batch_size, pin_memory=run.device.type == "cuda")
    move = partial(to_device, device=run.device, channels_last=bool(run.cfg.trainer.channels_last))
    steps = args.pgd_steps or int(ecfg.pgd_steps)
    linf = args.linf_eps if args.linf_eps is not None else _radii("eval.linf_eps", ecfg.linf_eps)
    l2 = args.l2_eps if args.l2_eps is not None else _radii("eval.l2_eps", ecfg.l2_eps)
    corruptions = args.corruption_types or list(ecfg.corruptions or CORRUPTIONS)
    severities = args.severities or [int(s) for s in ecfg.severities]

    reference = None
    if "corruptions" in sections and args.reference is not None:
        try:
            ref_path, ref_table, ref_json = load_reference_corruptions(args.reference)
        except ValueError as err:
            raise EvalInputError(f"--reference: {err}") from None
        if ref_json.get("num_images") != len(labels):
            raise EvalInputError(
                f"--reference: {ref_path} was evaluated on {ref_json.get('num_images')} images, this run on "
                f"{len(labels)}; use the same --limit"
            )
        reference = (str(ref_path.resolve()), ref_table)

    out_dir = args.out if args.out is not None else run.run_dir
    result: dict[str, Any] = {
        "checkpoint": str(run.checkpoint.resolve()),
        "run_dir": str(run.run_dir.resolve()),
        "limit": limit,
        "num_images": len(labels),
        "sources": list(run.sources),
    }
    previous = load_previous(out_dir / "eval.json", result, run.checkpoint)
    result.update({key: previous.get(key) for key in SCHEMA_KEYS[5:]})

    result["clean_acc"] = accuracy(run.model, loader, main, move)
    if "per_bn" in sections:
        result["per_bn_acc"] = {bn: accuracy(run.model, loader, bn, move) for bn in run.sources}
    if "divergence" in sections:
        result["divergence"] = bn_divergence(run.model)
    if "corruptions" in sections:
        cache_dir = args.cache_dir if args.cache_dir is not None else default_corruption_cache()
        dataset_id = corruption_dataset_id(str(run.cfg.data.name), np.asarray(images), limit, args.seed)
        acc = corruption_accuracy(
            run.model,
            images,
            labels,
            main,
            move,
            cache_dir=cache_dir,
            dataset_id=dataset_id,
            corruptions=corruptions,
            severities=severities,
            batch_size=batch_size,
            seed=args.seed,
            progress=True,
        )
        if reference is None:
            result["corruptions"] = corruption_summary(acc, corruptions, severities)
        else:
            try:
                result["corruptions"] = corruption_summary(
                    acc, corruptions, severities, reference=reference[1], reference_path=reference[0]
                )
            except ValueError as err:  # the reference lacks pairs or has zero error somewhere
                raise EvalInputError(f"--reference: {reference[0]}: {err}") from None
    if "adversarial" in sections:
        sweep = robustness_sweep(
            run.model, loader, main, move, linf_eps=linf, l2_eps=l2, steps=steps, seed=args.seed, progress=True
        )
        adversarial: dict[str, Any] = {"steps": steps, "bn": main, **sweep, "autoattack": None}
        if autoattack:
            aa_eps = args.autoattack_eps or ([max(linf)] if linf else [8.0])
            adversarial["autoattack"] = {
                eps_key(e): autoattack_accuracy(
                    run.model,
                    loader,
                    main,
                    move,
                    eps=e / 255,
                    num_classes=run.stats.num_classes,
                    seed=args.seed,
                    progress=True,
                )
                for e in aa_eps
            }
        result["adversarial"] = merge_adversarial(adversarial, previous.get("adversarial"))
    return result, Path(out_dir)


def summary_line(result: dict[str, Any]) -> str:
    """One line with the headline numbers."""
    parts = [f"clean {result['clean_acc']:.4f}"]
    if result.get("corruptions"):
        parts.append(f"corruption mean {result['corruptions']['mean_acc']:.4f}")
        if result["corruptions"].get("mce") is not None:
            parts.append(f"mCE {result['corruptions']['mce']:.4f}")
    adv = result.get("adversarial")
    if adv and adv.get("linf"):
        eps, acc = max(adv["linf"].items(), key=lambda kv: float(kv[0]))
        parts.append(f"PGD-{adv['steps']} linf {eps}/255 {acc:.4f}")
    return ", ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status (2 for bad input, 130 for Ctrl-C)."""
    args = parse_args(argv)
    sections = selected_sections(args)
    start = time.perf_counter()
    try:
        check_args(args, sections)
        from mbn.eval.corruptions import CacheMismatchError

        try:
            result, out_dir = evaluate(args, sections)
        except CacheMismatchError as err:
            raise EvalInputError(f"--cache-dir: {err}") from None
        from mbn.eval.report import write_report

        written = write_report(result, out_dir)
    except (RecipeError, CheckpointError, EvalInputError) as err:
        print(f"mbn-eval: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mbn-eval: interrupted", file=sys.stderr)
        return 130
    names = ", ".join(p.name for p in written)
    elapsed = time.perf_counter() - start
    print(f"mbn-eval: {summary_line(result)} ({result['num_images']} images, {elapsed:.1f} s)")
    print(f"mbn-eval: wrote {names} to {out_dir}{os.sep}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
