"""Evaluate a trained run: clean and per-BN accuracy, corruptions, PGD sweeps, AutoAttack, BN divergence.

The library behind ``mbn-eval`` and the paper harness: :func:`evaluate_run` loads a run's model (only
its test split), computes the selected sections and merges them with an earlier ``eval.json`` of the
same checkpoint and image subset; :func:`mbn.eval.report.write_report` writes it out.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from mbn.validators import ValueCheckError, check_int, check_number

SECTIONS = ("clean", "per_bn", "corruptions", "adversarial", "divergence")
SCHEMA_KEYS = (
    "checkpoint",
    "weights",
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
    """An evaluation option or reference file is invalid; the message names it."""


@dataclass
class EvalOptions:
    """What to evaluate and how; ``None`` takes the run's ``eval`` recipe section (or the data section).

    Attributes:
        sections: some of :data:`SECTIONS` (``clean`` is always computed).
        autoattack: also standard L-inf AutoAttack (needs ``adversarial``).
        limit: a fixed seeded subset of N test images (as ``data.test_limit``).
        out_dir: where an earlier ``eval.json`` is merged from (default: the run directory).
        reference: ``eval.json`` or run directory for corruption CE / mCE.
        data_root: evaluate on the dataset there instead of the recipe's ``data.root``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size, pgd_steps, linf_eps (0-255), l2_eps ([0, 1] pixels), autoattack_eps (0-255),
        corruption_types, severities, cache_dir: as the ``mbn-eval`` options of the same names.
        seed: seed of PGD random starts, AutoAttack and corruptions.
        progress: show progress bars on a terminal.
        weights: ``model`` (trained weights) or ``ema`` (their moving average); ``ema`` writes to ``RUN/ema/``
            by default so the two reports never merge.
    """

    sections: set[str] = field(default_factory=lambda: {"clean", "per_bn"})
    autoattack: bool = False
    limit: int | None = None
    out_dir: Path | None = None
    reference: str | Path | None = None
    data_root: Path | None = None
    device: str = "auto"
    batch_size: int | None = None
    pgd_steps: int | None = None
    linf_eps: Sequence[float] | None = None
    l2_eps: Sequence[float] | None = None
    autoattack_eps: Sequence[float] | None = None
    corruption_types: Sequence[str] | None = None
    severities: Sequence[int] | None = None
    cache_dir: Path | None = None
    seed: int = 0
    progress: bool = True
    weights: str = "model"


def _option(name: str, check: Any, value: Any, **bounds: Any) -> Any:
    try:
        return check(name, value, **bounds)
    except ValueCheckError as err:
        raise EvalInputError(f"{name}: expected {err.what}, got {err.value!r}") from None


def radii(name: str, values: Sequence[float]) -> list[float]:
    """Attack radii, each a finite number >= 0."""
    return [_option(name, check_number, v, low=0) for v in values]


def check_options(options: EvalOptions) -> None:
    """Validate options before anything is loaded."""
    for name in ("limit", "batch_size", "pgd_steps"):
        if getattr(options, name) is not None:
            _option("--" + name.replace("_", "-"), check_int, getattr(options, name), low=1)
    _option("--seed", check_int, options.seed, low=0)
    for name in ("linf_eps", "l2_eps", "autoattack_eps"):
        if getattr(options, name) is not None:
            radii("--" + name.replace("_", "-"), getattr(options, name))
    if options.reference is not None and "corruptions" not in options.sections:
        raise EvalInputError("--reference: only used with --corruptions (or --all)")
    if options.corruption_types is not None or options.severities is not None:
        from mbn.eval.corruptions import ALL_CORRUPTIONS, SEVERITIES

        for name in options.corruption_types or []:
            if name not in ALL_CORRUPTIONS:
                raise EvalInputError(f"--corruption-types: unknown {name!r}; expected some of {list(ALL_CORRUPTIONS)}")
        for sev in options.severities or []:
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
    same = same and previous.get("weights", "model") == current.get("weights", "model")
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


def evaluate_run(path: str | Path, options: EvalOptions) -> tuple[dict[str, Any], Path]:
    """Evaluate the run (or checkpoint) at ``path``; return the merged ``eval.json`` content and its directory.

    Raises:
        EvalInputError: a bad option or reference.
        CheckpointError: bad path or checkpoint.
        RecipeError: the run's test data cannot be loaded.
    """
    import numpy as np

    from mbn.data import ArraySplit, EvalLoader, subset_indices, to_device
    from mbn.eval.accuracy import accuracy
    from mbn.eval.corruptions import CORRUPTIONS
    from mbn.eval.divergence import bn_divergence
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

    check_options(options)
    args, sections = options, options.sections | {"clean"}
    run = load_run(Path(path), args.device, data_root=args.data_root, weights=args.weights)
    ecfg = run.cfg.eval
    main = run.sources[0]
    autoattack = "adversarial" in sections and (args.autoattack or bool(ecfg.autoattack))
    if autoattack and run.stats.num_classes < 4:
        raise EvalInputError(f"--autoattack: needs at least 4 classes (DLR loss), the run has {run.stats.num_classes}")
    limit = args.limit if args.limit is not None else ecfg.limit
    if limit is not None:
        _option("eval.limit", check_int, limit, low=1)
    images, labels = run.test.images, run.test.labels
    if limit is not None:  # a seeded subset, as data.test_limit: the first N of a class-sorted folder are one class
        keep = subset_indices(len(labels), limit, "--limit")
        images, labels = images[keep], labels[keep]
    batch_size = args.batch_size or int(run.cfg.data.eval_batch_size)
    loader = EvalLoader(ArraySplit(images, labels), batch_size, pin_memory=run.device.type == "cuda")
    move = partial(to_device, device=run.device, channels_last=bool(run.cfg.trainer.channels_last))
    steps = args.pgd_steps or int(ecfg.pgd_steps)
    linf = args.linf_eps if args.linf_eps is not None else radii("eval.linf_eps", ecfg.linf_eps)
    l2 = args.l2_eps if args.l2_eps is not None else radii("eval.l2_eps", ecfg.l2_eps)
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

    out_dir = args.out_dir if args.out_dir is not None else run.run_dir / ("ema" if args.weights == "ema" else "")
    result: dict[str, Any] = {
        "checkpoint": str(run.checkpoint.resolve()),
        "weights": args.weights,
        "run_dir": str(run.run_dir.resolve()),
        "limit": limit,
        "num_images": len(labels),
        "sources": list(run.sources),
    }
    previous = load_previous(out_dir / "eval.json", result, run.checkpoint)
    result.update({key: previous.get(key) for key in SCHEMA_KEYS[SCHEMA_KEYS.index("clean_acc") :]})

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
            progress=args.progress,
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
            run.model, loader, main, move, linf_eps=linf, l2_eps=l2, steps=steps, seed=args.seed, progress=args.progress
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
                    progress=args.progress,
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
