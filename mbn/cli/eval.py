"""``mbn-eval RUN_DIR_OR_CHECKPOINT [--all | --clean --per-bn --corruptions --adversarial --divergence ...]``.

Evaluates a trained model through its main BN in eval mode (per-BN accuracy goes through every BN) and writes
``eval.json`` (merged with an earlier one), ``eval.md`` and plots into the run directory or ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mbn.checkpoint import CheckpointError
from mbn.config import RecipeError
from mbn.eval.evaluate import SECTIONS, EvalInputError, EvalOptions, check_options, evaluate_run, summary_line
from mbn.fileio import WriteError

EPILOG = """examples:
  mbn-eval runs/advprop                      # clean + per-BN accuracy
  mbn-eval runs/advprop --all --limit 1000   # + corruptions, PGD sweeps, BN divergence
  mbn-eval runs/advprop --adversarial --linf-eps 1 2 4 8 16 --pgd-steps 20
  mbn-eval runs/advprop --corruptions --reference runs/vanilla   # CE / mCE relative to another run
  mbn-eval runs/advprop --adversarial --autoattack --autoattack-eps 8
  mbn-eval runs/advprop --suite cifar10-c=/data/CIFAR-10-C --bn-adapt   # a published suite, + BN adaptation
  mbn-eval runs/in1k --suite imagenet-c=/data/imagenet-c --suite imagenet-a=/data/imagenet-a --limit 5000
  mbn-eval runs/advprop --write-suite /data/my-cifar10-c     # write a CIFAR-10-C-layout suite from the test split
  mbn-eval output/train/exp/model_best.pth.tar --timm-recipe data.yaml --split-names clean,augmix1,augmix2
"""


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
    sel.add_argument("--corruptions", action="store_true", help="CIFAR-10-C / ImageNet-C corruptions (cached)")
    sel.add_argument("--adversarial", action="store_true", help="PGD-k robust accuracy over L-inf and L2 radii")
    sel.add_argument("--divergence", action="store_true", help="per-layer divergence of aux BN statistics")
    sel.add_argument(
        "--autoattack", action="store_true", help="also standard L-inf AutoAttack (slow; implies --adversarial)"
    )
    sel.add_argument(
        "--suite",
        action="append",
        metavar="KIND=DIR",
        help="a published suite on disk (repeatable): KIND[:LABEL]=DIR, KIND one of cifar10-c, cifar100-c, "
        "imagenet-c, imagenet-a, imagenet-r, imagenet-sketch, imagenet-v2, stylized-imagenet, folder",
    )
    sel.add_argument("--suites", action="store_true", help="the suites named in the run's eval.suites recipe section")
    opt = p.add_argument_group("options (defaults from the run's `eval` recipe section)")
    opt.add_argument(
        "--limit", type=int, metavar="N", help="use N test images (a fixed seeded subset, as data.test_limit)"
    )
    opt.add_argument(
        "--out", type=Path, metavar="DIR", help="output directory (default: the run, or RUN/ema with --weights ema)"
    )
    opt.add_argument("--reference", metavar="EVAL", help="eval.json or run directory for corruption CE / mCE")
    opt.add_argument(
        "--data-root",
        type=Path,
        metavar="DIR",
        help="dataset root to evaluate on (default: the recipe's data.root; webdataset: the test shards' pattern)",
    )
    opt.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    opt.add_argument(
        "--weights",
        choices=("model", "ema"),
        default="model",
        help="the trained weights, or their moving average (ema.decay > 0; report in RUN/ema/ by default)",
    )
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
        "--corruption-types",
        nargs="+",
        metavar="NAME",
        help="corruptions (default: the 15 of CIFAR-10-C; frost needs the robustness extra, else it is skipped)",
    )
    opt.add_argument("--severities", type=int, nargs="+", metavar="S", help="severities (default: 1 2 3 4 5)")
    opt.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="corruption cache (default: $MBN_CACHE_DIR/corruptions, else ~/.cache/mbn/corruptions)",
    )
    opt.add_argument("--seed", type=int, default=0, help="seed of PGD random starts, AutoAttack and corruptions")
    opt.add_argument(
        "--bn", metavar="NAME", help="the BN source to evaluate through (default: the main one; report in RUN/bn-NAME)"
    )
    opt.add_argument("--workers", type=int, metavar="W", help="suite image decoders (default: data.num_workers)")
    timm_group = p.add_argument_group("a checkpoint of timm's train.py (--split-bn: one BN source per split)")
    timm_group.add_argument(
        "--timm-recipe",
        type=Path,
        metavar="RECIPE",
        help="PATH is a timm checkpoint; evaluate it on this recipe's data (report in eval-NAME/ beside it)",
    )
    timm_group.add_argument(
        "--split-names", metavar="A,B,...", help="source name of each split, main first (default: clean,aug1,...)"
    )
    bn = p.add_argument_group("test-time BN adaptation and routing (suites)")
    bn.add_argument(
        "--bn-adapt",
        action="store_true",
        help="also score each suite set with the BN statistics re-estimated on its images (Schneider et al. 2020)",
    )
    bn.add_argument(
        "--bn-adapt-prior",
        type=float,
        default=0.0,
        metavar="N",
        help="prior strength N: statistics = N/(N+n) training + n/(N+n) test (default 0: full re-estimation)",
    )
    bn.add_argument(
        "--bn-route",
        choices=("main", "auto"),
        default="main",
        help="auto: also score through the lowest-entropy BN per batch, reported beside (default: main)",
    )
    bn.add_argument(
        "--write-suite",
        type=Path,
        metavar="DIR",
        help="write the test split corrupted by mbn's generator in CIFAR-10-C's layout to DIR, then stop",
    )
    return p.parse_args(argv)


def selected_sections(args: argparse.Namespace) -> set[str]:
    """The sections this invocation computes (``clean`` always: every other number is read against it)."""
    chosen = {s for s in SECTIONS if getattr(args, s)}
    if args.suite:
        chosen.add("suites")
    if args.all:
        chosen = set(SECTIONS)
    if args.autoattack:
        chosen.add("adversarial")
    if not chosen:
        chosen = {"clean", "per_bn"}
    return chosen | {"clean"}


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    """The library options of a parsed command line."""
    return EvalOptions(
        sections=selected_sections(args),
        autoattack=args.autoattack,
        limit=args.limit,
        out_dir=args.out,
        reference=args.reference,
        data_root=args.data_root,
        device=args.device,
        batch_size=args.batch_size,
        pgd_steps=args.pgd_steps,
        linf_eps=args.linf_eps,
        l2_eps=args.l2_eps,
        autoattack_eps=args.autoattack_eps,
        corruption_types=args.corruption_types,
        severities=args.severities,
        cache_dir=args.cache_dir,
        skip_unavailable=True,  # the default list without the robustness extra: frost skipped, said and recorded
        seed=args.seed,
        weights=args.weights,
        bn=args.bn,
        suites=args.suite,
        recipe_suites=args.suites or args.all,
        bn_adapt=args.bn_adapt,
        bn_adapt_prior=args.bn_adapt_prior,
        bn_route=args.bn_route,
        workers=args.workers,
        timm_recipe=args.timm_recipe,
        split_names=args.split_names.split(",") if args.split_names else None,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status (2 for bad input, 130 for Ctrl-C)."""
    args = parse_args(argv)
    options = options_from_args(args)
    start = time.perf_counter()
    try:
        check_options(options)
        from mbn.eval.corruptions import CacheMismatchError

        if args.write_suite is not None:
            from mbn.eval.evaluate import write_suite

            others = [flag for flag, used in (("--suite", args.suite), ("--suites", args.suites), ("--all", args.all),
                      ("--bn-adapt", args.bn_adapt), ("--bn-route auto", args.bn_route == "auto"),
                      ("--adversarial", args.adversarial), ("--corruptions", args.corruptions)) if used]  # fmt: skip
            if others:
                raise EvalInputError(f"--write-suite: writes a suite and stops; evaluate ({', '.join(others)}) in a "
                                     "second call")  # fmt: skip

            files = write_suite(args.path, args.write_suite, options)
            elapsed = time.perf_counter() - start
            print(f"mbn-eval: wrote {len(files)} files to {args.write_suite}{os.sep} ({elapsed:.1f} s); "
                  f"evaluate with --suite cifar10-c={args.write_suite}")  # fmt: skip
            return 0
        try:
            result, out_dir = evaluate_run(args.path, options)
        except CacheMismatchError as err:
            raise EvalInputError(f"--cache-dir: {err}") from None
        from mbn.eval.report import write_report

        written = write_report(result, out_dir)
    except (RecipeError, CheckpointError, EvalInputError) as err:
        print(f"mbn-eval: error: {err}", file=sys.stderr)
        return 2
    except WriteError as err:  # a full disk: eval.json and the caches keep their previous versions
        print(f"mbn-eval: error: {err}", file=sys.stderr)
        return 1
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
