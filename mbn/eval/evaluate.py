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

from mbn.errors import one_line
from mbn.validators import ValueCheckError, check_int, check_number

SECTIONS = ("clean", "per_bn", "corruptions", "adversarial", "divergence", "suites")
SCHEMA_KEYS = (
    "checkpoint",
    "weights",
    "bn",
    "run_dir",
    "limit",
    "num_images",
    "sources",
    "clean_acc",
    "clean_acc5",
    "per_bn_acc",
    "per_bn_acc5",
    "corruptions",
    "adversarial",
    "divergence",
    "suites",
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
        skip_unavailable: with the default corruption list (neither ``corruption_types`` nor the recipe's
            ``eval.corruptions``), leave out a corruption this installation cannot generate (frost without the
            ``robustness`` extra) with a note on stderr, recorded in ``corruptions.skipped``; otherwise it is a
            one-line error. ``mbn-eval`` sets it; a corruption asked for by name is always an error.
        seed: seed of PGD random starts, AutoAttack and corruptions.
        progress: show progress bars on a terminal.
        weights: ``model`` (trained weights) or ``ema`` (their moving average); ``ema`` writes to ``RUN/ema/``
            by default so the two reports never merge.
        bn: the BN source every number except ``per_bn_acc`` goes through (default: the main one); another
            source writes to ``RUN/bn-<name>/`` by default.
        suites: ``KIND[:LABEL]=DIR`` published suites to evaluate (adds to the recipe's ``eval.suites``).
        recipe_suites: also evaluate the recipe's ``eval.suites`` (``--suites``, ``--all``).
        bn_adapt: also score each suite set with the BN statistics re-estimated on its images.
        bn_adapt_prior: Schneider et al.'s prior strength ``N`` (0: full re-estimation).
        bn_route: ``main`` (the chosen BN) or ``auto`` (also the lowest-entropy BN per batch, reported beside).
        workers: DataLoader workers decoding suite images (default: ``data.num_workers``).
        timm_recipe: ``path`` is a checkpoint of timm's ``train.py`` (``--split-bn``: a BN per split), evaluated
            on this recipe's data (:func:`mbn.eval.loading.load_timm_run`).
        split_names: the BN source name of each split of such a checkpoint (default ``clean``, ``aug1``, ...).
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
    skip_unavailable: bool = False
    seed: int = 0
    progress: bool = True
    weights: str = "model"
    bn: str | None = None
    suites: Sequence[str] | None = None
    recipe_suites: bool = False
    bn_adapt: bool = False
    bn_adapt_prior: float = 0.0
    bn_route: str = "main"
    workers: int | None = None
    timm_recipe: Path | None = None
    split_names: Sequence[str] | None = None


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
    if options.workers is not None:
        _option("--workers", check_int, options.workers, low=0)
    _option("--bn-adapt-prior", check_number, options.bn_adapt_prior, low=0)
    if options.bn_adapt_prior and not options.bn_adapt:
        raise EvalInputError("--bn-adapt-prior: only used with --bn-adapt")
    if options.bn_route not in ("main", "auto"):
        raise EvalInputError(f"--bn-route: expected main or auto, got {options.bn_route!r}")
    if options.suites:
        from mbn.eval.suites import SuiteError, parse_specs

        try:
            parse_specs(options.suites)
        except SuiteError as err:
            raise EvalInputError(str(err)) from None
    if options.reference is not None and not {"corruptions", "suites"} & options.sections:
        raise EvalInputError("--reference: only used with --corruptions, a -C --suite (or --all)")
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
    same = same and previous.get("bn", current.get("bn")) == current.get("bn")
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
        EvalInputError: a bad option, reference or suite.
        CheckpointError: bad path or checkpoint.
        RecipeError: the run's test data cannot be loaded.
    """
    import numpy as np

    from mbn.data import ArraySplit, EvalLoader, subset_indices, to_device
    from mbn.eval.accuracy import topk_accuracy
    from mbn.eval.corruptions import CORRUPTIONS, require_corruptions, unavailable_corruptions
    from mbn.eval.divergence import bn_divergence
    from mbn.eval.loading import load_run, load_timm_run
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
    if args.timm_recipe is not None:
        run = load_timm_run(Path(path), args.timm_recipe, args.device, args.split_names, args.weights, args.data_root)
    else:
        run = load_run(Path(path), args.device, data_root=args.data_root, weights=args.weights)
    ecfg = run.cfg.eval
    bn = chosen_bn(args.bn, run.sources)
    suites = suite_specs(options, ecfg) if "suites" in sections else []
    if not suites and (args.bn_adapt or args.bn_route == "auto"):
        flag = "--bn-adapt" if args.bn_adapt else "--bn-route auto"
        raise EvalInputError(f"{flag}: applies to the published suites; give --suite KIND=DIR (or --suites)")
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
    skipped: dict[str, str] = {}
    if "corruptions" in sections:
        if args.skip_unavailable and not (args.corruption_types or ecfg.corruptions):  # the default suite
            skipped = unavailable_corruptions(corruptions)
            corruptions = [name for name in corruptions if name not in skipped]
            over = f"{len(corruptions)} of {len(corruptions) + len(skipped)} corruptions"
            for name, why in skipped.items():
                print(f"mbn-eval: note: skipping the {name} corruption ({why}); corruption results are over {over}",
                      file=sys.stderr)  # fmt: skip
        require_corruptions(corruptions)  # one named, and missing here: one line now, not after the other sections

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
    cifar_suites = any(spec.kind in ("cifar10-c", "cifar100-c") for spec in suites)
    if args.reference is not None and "corruptions" not in sections and not cifar_suites:
        raise EvalInputError("--reference: used by --corruptions and the CIFAR -C suites; neither is evaluated here")
    if args.bn_adapt and batch_size < 2:
        raise EvalInputError(
            f"--batch-size: --bn-adapt estimates statistics per batch; expected 2 or more, got {batch_size}"
        )
    reference_json = load_reference(args.reference) if cifar_suites and args.reference is not None else None
    read = read_suites(suites, run.stats.class_names, limit, args.corruption_types, args.severities)

    out_dir = args.out_dir if args.out_dir is not None else default_out_dir(run.run_dir, args.weights, bn, run.sources)
    result: dict[str, Any] = {
        "checkpoint": str(run.checkpoint.resolve()),
        "weights": args.weights,
        "bn": bn,
        "run_dir": str(run.run_dir.resolve()),
        "limit": limit,
        "num_images": len(labels),
        "sources": list(run.sources),
    }
    previous = load_previous(out_dir / "eval.json", result, run.checkpoint)
    result.update({key: previous.get(key) for key in SCHEMA_KEYS[SCHEMA_KEYS.index("clean_acc") :]})

    # one pass per BN gives top-1 and top-5 (top-5 is None with five classes or fewer); the chosen BN's pass is
    # shared by clean_acc and per_bn_acc
    per_bn = {bn: topk_accuracy(run.model, loader, bn, move)}
    if "per_bn" in sections:
        per_bn |= {source: topk_accuracy(run.model, loader, source, move) for source in run.sources if source != bn}
        result["per_bn_acc"] = {source: per_bn[source].top1 for source in run.sources}
        result["per_bn_acc5"] = {source: per_bn[source].top5 for source in run.sources}
    result["clean_acc"], result["clean_acc5"] = per_bn[bn].top1, per_bn[bn].top5
    if "divergence" in sections:
        result["divergence"] = bn_divergence(run.model)
    if "corruptions" in sections:
        cache_dir = args.cache_dir if args.cache_dir is not None else default_corruption_cache()
        dataset_id = corruption_dataset_id(str(run.cfg.data.name), np.asarray(images), limit, args.seed)
        acc = corruption_accuracy(
            run.model,
            images,
            labels,
            bn,
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
            result["corruptions"] = corruption_summary(acc, corruptions, severities, skipped=skipped)
        else:
            try:
                result["corruptions"] = corruption_summary(
                    acc, corruptions, severities, reference=reference[1], reference_path=reference[0], skipped=skipped
                )
            except ValueError as err:  # the reference lacks pairs or has zero error somewhere
                raise EvalInputError(f"--reference: {reference[0]}: {err}") from None
    if "adversarial" in sections:
        sweep = robustness_sweep(
            run.model, loader, bn, move, linf_eps=linf, l2_eps=l2, steps=steps, seed=args.seed, progress=args.progress
        )
        adversarial: dict[str, Any] = {"steps": steps, "bn": bn, **sweep, "autoattack": None}
        if autoattack:
            aa_eps = args.autoattack_eps or ([max(linf)] if linf else [8.0])
            adversarial["autoattack"] = {
                eps_key(e): autoattack_accuracy(
                    run.model,
                    loader,
                    bn,
                    move,
                    eps=e / 255,
                    num_classes=run.stats.num_classes,
                    seed=args.seed,
                    progress=args.progress,
                )
                for e in aa_eps
            }
        result["adversarial"] = merge_adversarial(adversarial, previous.get("adversarial"))
    if read:
        from mbn.data.transforms import eval_crop_fraction
        from mbn.eval.suite_eval import Preparation, evaluate_suite
        from mbn.eval.suites import SuiteError

        data = run.cfg.data
        prepare = Preparation(run.stats.image_size, eval_crop_fraction(data))
        workers = args.workers if args.workers is not None else int(data.num_workers)
        scored = dict(result.get("suites") or {})
        for suite in read:
            try:
                entry = evaluate_suite(
                    run.model,
                    suite,
                    source=bn,
                    to_device=move,
                    prepare=prepare,
                    batch_size=batch_size,
                    workers=workers,
                    pin_memory=run.device.type == "cuda",
                    bn_adapt=args.bn_adapt,
                    bn_adapt_prior=float(args.bn_adapt_prior),
                    route_sources=run.sources if args.bn_route == "auto" else (),
                    reference=suite_reference(reference_json, suite.spec.key, suite.spec.kind, suite.sets),
                    progress=args.progress,
                )
            except SuiteError as err:
                raise EvalInputError(one_line(err)) from None
            except RuntimeError as err:  # a worker's SuiteError arrives re-raised by the DataLoader
                if "SuiteError" not in str(err):
                    raise
                raise EvalInputError(one_line(err)) from None
            scored[suite.spec.key] = {**entry, "limit": limit}
        result["suites"] = scored
    return result, Path(out_dir)


def write_suite(path: str | Path, out_dir: Path, options: EvalOptions) -> list[Path]:
    """Write the run's test split (``--limit`` applied), corrupted by mbn's generator, in CIFAR-10-C's layout.

    Raises:
        EvalInputError: ``out_dir`` exists and is not empty, or a bad option.
    """
    import numpy as np

    from mbn.data import subset_indices
    from mbn.eval.corruptions import CORRUPTIONS, SEVERITIES
    from mbn.eval.loading import load_run
    from mbn.eval.robustness import corruption_dataset_id, default_corruption_cache
    from mbn.eval.write_suite import write_corruption_suite

    check_options(options)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise EvalInputError(f"--write-suite: {out_dir} exists and is not an empty folder; name a new one")
    if options.severities is not None and sorted(options.severities) != list(SEVERITIES):
        raise EvalInputError("--severities: --write-suite writes all five severities (the published layout)")
    run = load_run(Path(path), "cpu", data_root=options.data_root, weights=options.weights)
    limit = options.limit if options.limit is not None else run.cfg.eval.limit
    images, labels = run.test.images, run.test.labels
    if limit is not None:
        keep = subset_indices(len(labels), limit, "--limit")
        images, labels = images[keep], labels[keep]
    corruptions = list(options.corruption_types or run.cfg.eval.corruptions or CORRUPTIONS)
    cache_dir = options.cache_dir if options.cache_dir is not None else default_corruption_cache()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EvalInputError(f"--write-suite: cannot create {out_dir} ({err.strerror or err})") from None
    return write_corruption_suite(
        out_dir,
        images,
        labels,
        run.stats.class_names,
        cache_dir=cache_dir,
        dataset_id=corruption_dataset_id(str(run.cfg.data.name), np.asarray(images), limit, options.seed),
        corruptions=corruptions,
        seed=options.seed,
        progress=options.progress,
    )


def chosen_bn(name: str | None, sources: Sequence[str]) -> str:
    """The BN source ``--bn`` names (default: the main one), or a one-line error listing the run's sources."""
    if name is None:
        return sources[0]
    if name not in sources:
        raise EvalInputError(f"--bn: the run has no BN {name!r}; its BNs: {', '.join(sources)}")
    return name


def default_out_dir(run_dir: Path, weights: str, bn: str, sources: Sequence[str]) -> Path:
    """``RUN``, ``RUN/ema`` for the weight average, and ``.../bn-<name>`` through a BN other than the main one."""
    out = run_dir / "ema" if weights == "ema" else run_dir
    return out if bn == sources[0] else out / f"bn-{bn}"


def suite_specs(options: EvalOptions, ecfg: Any) -> list[Any]:
    """The suites to evaluate: the recipe's ``eval.suites`` (with ``--suites``/``--all``), then ``--suite``'s.

    A ``--suite`` with the key of a recipe suite replaces it.
    """
    from mbn.eval.suite_spec import SuiteError, parse_specs

    specs: dict[str, Any] = {}
    try:
        if options.recipe_suites:
            configured = dict(ecfg.suites or {})
            if not configured and not options.suites and options.sections != set(SECTIONS):
                raise EvalInputError("--suites: the run's recipe names no eval.suites; give --suite KIND=DIR")
            for key, root in configured.items():
                spec = parse_specs([f"{key}={root}"], f"key 'eval.suites.{key}'", "eval.suites")[0]
                specs[spec.key] = spec
        specs.update({spec.key: spec for spec in parse_specs(list(options.suites or []))})
    except SuiteError as err:
        raise EvalInputError(str(err)) from None
    return list(specs.values())


def read_suites(
    specs: Sequence[Any],
    class_names: Sequence[str],
    limit: int | None,
    corruptions: Sequence[str] | None,
    severities: Sequence[int] | None,
) -> list[Any]:
    """Read every suite's listing before anything is scored, so a bad one fails in seconds."""
    from mbn.eval.corruptions import ALL_CORRUPTIONS, SEVERITIES
    from mbn.eval.suites import SuiteError, read_suite

    try:
        return [
            read_suite(
                spec,
                class_names,
                limit=limit,
                corruptions=corruptions or ALL_CORRUPTIONS,
                severities=severities or SEVERITIES,
            )
            for spec in specs
        ]
    except SuiteError as err:
        raise EvalInputError(str(err)) from None


def load_reference(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """An ``eval.json`` (or a run directory holding one) to compute CE / mCE against."""
    from mbn.eval.robustness import read_eval_json

    try:
        return read_eval_json(path)
    except ValueError as err:
        raise EvalInputError(f"--reference: {one_line(err)}") from None


def suite_reference(
    reference: tuple[Path, dict[str, Any]] | None, key: str, kind: str, sets: Sequence[Any]
) -> dict[str, Any] | None:
    """The corruption table of suite ``key`` in the reference ``eval.json``, for a CIFAR ``-C`` suite's CE / mCE."""
    if reference is None or kind not in ("cifar10-c", "cifar100-c"):
        return None
    path, data = reference
    entry = (data.get("suites") or {}).get(key)
    if not isinstance(entry, dict) or not isinstance(entry.get("corruptions"), dict):
        raise EvalInputError(f"--reference: {path} holds no suites.{key} results (evaluate it with --suite first)")
    images_per_set = len(sets[0]) if sets else 0
    if entry.get("num_images") != sum(len(s) for s in sets):
        raise EvalInputError(
            f"--reference: {path} scored suites.{key} on {entry.get('num_images')} images, this run on "
            f"{images_per_set} per set x {len(sets)} sets; use the same --limit, --corruption-types and --severities"
        )
    return {"path": str(path.resolve()), "table": entry["corruptions"]}


def summary_line(result: dict[str, Any]) -> str:
    """One line with the headline numbers."""
    bn = result.get("bn")
    parts = [
        f"clean {result['clean_acc']:.4f}" + (f" (BN {bn})" if bn and bn != (result.get("sources") or [bn])[0] else "")
    ]
    corr = result.get("corruptions")
    if corr:
        from mbn.eval.report import corruptions_evaluated

        part = corruptions_evaluated(corr)
        of = f" ({part}, {', '.join(corr['skipped'])} skipped)" if corr.get("skipped") else ""
        parts.append(f"corruption mean {corr['mean_acc']:.4f}{of}")
        if corr.get("mce") is not None:
            parts.append(f"mCE {corr['mce']:.4f}{of}")
    adv = result.get("adversarial")
    if adv and adv.get("linf"):
        eps, acc = max(adv["linf"].items(), key=lambda kv: float(kv[0]))
        parts.append(f"PGD-{adv['steps']} linf {eps}/255 {acc:.4f}")
    for key, entry in (result.get("suites") or {}).items():
        if entry.get("kind") == "imagenet-c" and entry.get("mce") is not None:
            parts.append(f"{key} mCE {entry['mce']:.4f}")
        else:
            parts.append(f"{key} {entry['top1']:.4f}")
        if entry.get("bn_adapt"):
            parts[-1] += f" (BN adapted {entry['bn_adapt']['top1']:.4f})"
    return ", ".join(parts)
