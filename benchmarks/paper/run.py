"""The paper's experiment in one command: train and evaluate every baseline and AdvProp variant over seeds.

Reproduces the comparison of Xie et al., "Adversarial Examples Improve Image Recognition" (CVPR 2020), on
CIFAR-10: AdvProp (adversarial examples through an auxiliary BN) against vanilla training, AutoAugment and
adversarial training (clean + adversarial examples through one shared BN), on the same model, data and
epochs. Every (config, seed) is trained with ``mbn-train`` and evaluated with ``mbn-eval`` (clean accuracy,
CIFAR-10-C style corruptions, PGD robust accuracy) in subprocesses; mCE is computed relative to vanilla of the
same seed (Hendrycks & Dietterich, ICLR 2019, via :mod:`mbn.eval.metrics`). Writes ``results.json`` and
``results.md`` (one table, mean ± std over seeds, and a verdict line per claim).

Finished runs (``metrics.json`` and a complete ``eval.json``) are skipped and an interrupted training is resumed
from its last checkpoint, so the command can simply be started again after an interruption.

Usage:
    python benchmarks/paper/run.py --scale cpu|gpu|smoke [--seeds 0 1 2] [--configs NAME ...]
        [--out DIR] [--runs-dir DIR] [--data-root DIR] [--eval-limit N] [--override KEY=VALUE ...] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
# This checkout's mbn (as the mbn-train children use), the shared benchmark helpers and the studies.
sys.path[:0] = [str(REPO), str(REPO / "benchmarks"), str(Path(__file__).resolve().parent)]

import ssl_study  # noqa: E402
from common import cpu_model  # noqa: E402

from mbn.fileio import atomic_write_text  # noqa: E402


@dataclass(frozen=True)
class Config:
    """One compared training method: a shipped recipe plus overrides."""

    recipe: str
    overrides: tuple[str, ...] = ()
    about: str = ""
    init_from: str | None = None  # another config whose run of the same seed initialises this one


CONFIGS: dict[str, Config] = {
    "vanilla": Config("recipes/vanilla.yaml", about="1 BN, clean images"),
    "autoaug": Config("recipes/autoaug.yaml", about="1 BN, AutoAugment images"),
    "advtrain": Config("recipes/advtrain.yaml", about="clean + PGD1 eps 1 through one shared BN"),
    "advtrain_pgd5": Config(
        "recipes/advtrain.yaml",
        ("domains.adv.steps=5", "domains.adv.eps=4", "domains.adv.step_size=1"),
        "clean + PGD5 eps 4 through one shared BN (advprop_pgd5's attacker)",
    ),
    "advprop_pgd1": Config(
        "recipes/advprop.yaml",
        ("domains.adv.steps=1", "domains.adv.eps=1", "domains.adv.step_size=1"),
        "AdvProp, PGD1 eps 1 through an auxiliary BN",
    ),
    "advprop_pgd5": Config(
        "recipes/advprop.yaml",
        ("domains.adv.steps=5", "domains.adv.eps=4", "domains.adv.step_size=1"),
        "AdvProp, PGD5 eps 4 through an auxiliary BN",
    ),
    "advprop_autoaug": Config("recipes/advprop_autoaug.yaml", about="3 BNs: clean / AutoAugment / PGD1 eps 1"),
    "fast_advprop": Config(
        "recipes/fast_advprop.yaml",
        about="Fast AdvProp: 4:1 clean/PGD1 split, gradient reuse, aux BN, vanilla's budget (Mei et al. 2022)",
    ),
    "fast_advtrain": Config(
        "recipes/fast_advtrain.yaml", about="fast_advprop with the adversarial images through the clean BN"
    ),
}

REFERENCE = "vanilla"  # mCE and cost ratios are relative to this config, seed by seed


@dataclass(frozen=True)
class Scale:
    """Training overrides and evaluation settings shared by every config at one scale."""

    train: tuple[str, ...]
    seeds: tuple[int, ...]
    eval_limit: int | None
    pgd_steps: int
    l2_eps: tuple[float, ...]
    linf_eps: tuple[float, ...] = (1.0, 4.0, 8.0)  # 0-255 units; the table shows 1 and 4
    imagefolder: bool = True  # train on --data-root (else the overrides choose the data)
    about: str = ""


_QUIET = ("trainer.progress=plain", "trainer.log_every=50", "logging.image_every=0", "logging.divergence_every=0")

SCALES: dict[str, Scale] = {
    # Seconds, for tests: synthetic images, a width-8 ResNet-8, 2 optimisation steps.
    "smoke": Scale(
        train=(
            "data.name=synthetic",
            "data.synthetic_train_size=64",
            "data.synthetic_test_size=32",
            "data.batch_size=16",
            "data.eval_batch_size=32",
            "data.num_workers=0",
            "model.name=cifar_resnet8",
            "model.width=8",
            "schedule.warmup_epochs=0",
            "trainer.epochs=1",
            "trainer.max_steps=2",
            "trainer.progress=none",
            "logging.tensorboard=false",
        ),
        seeds=(0,),
        eval_limit=16,
        pgd_steps=2,
        l2_eps=(0.5,),
        imagefolder=False,
        about="pipeline check only: synthetic data, 2 steps; the numbers mean nothing",
    ),
    # About 80 min for 6 configs x 3 seeds on 2 otherwise idle CPU cores (README.md has the budget).
    "cpu": Scale(
        train=(
            "model.name=cifar_resnet8",
            "model.width=16",
            "data.train_limit=10000",
            "data.num_workers=0",  # a 2-core machine gains nothing from loader processes
            "trainer.epochs=4",
            "trainer.eval_every=0",
            *_QUIET,
        ),
        seeds=(0, 1, 2),
        eval_limit=1000,
        pgd_steps=5,
        l2_eps=(0.5,),
        about=(
            "reduced: small network, a subset of the training images (10k unless a study overrides it), "
            "few epochs; trends only, not the paper's numbers"
        ),
    ),
    # The paper-sized CIFAR run: ResNet-18, 30 epochs (base.yaml), full training and test sets.
    "gpu": Scale(
        train=("data.on_device=true", "trainer.amp=bf16", "trainer.channels_last=true", *_QUIET),
        seeds=(0, 1, 2),
        eval_limit=None,
        pgd_steps=10,
        l2_eps=(0.25, 0.5, 1.0),
        about="full: CIFAR ResNet-18, 30 epochs, full CIFAR-10 train and test sets",
    ),
}

TABLE_LINF = (1.0, 4.0)  # PGD radii (0-255) shown in the table
METRICS = (
    "clean_acc",
    "corruption_acc",
    "mce",
    *(f"pgd_linf_{e:g}" for e in TABLE_LINF),
    "train_time_s",
    "cost_ratio",
)
# Claims of the paper checked by the verdict lines: (method, baseline).
CLAIMS = (
    ("advprop_pgd1", "vanilla"),
    ("advprop_pgd1", "advtrain"),
    ("advprop_pgd5", "vanilla"),
    ("advprop_pgd5", "advtrain_pgd5"),  # the same attacker with and without the auxiliary BN
    ("advprop_autoaug", "vanilla"),
    ("advprop_autoaug", "autoaug"),
    ("fast_advprop", "vanilla"),  # Fast AdvProp keeps AdvProp's gain at about vanilla's cost
    ("fast_advprop", "fast_advtrain"),  # ... and the auxiliary BN is what brings it
)


@dataclass
class Job:
    """One (config, seed) run: where it lives and the commands that produce it."""

    config: str
    seed: int
    run_dir: Path
    log: Path
    train_cmd: list[str]
    eval_options: Any  # mbn.eval.evaluate.EvalOptions
    status: str = "pending"
    metrics: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """``<config>-s<seed>``."""
        return f"{self.config}-s{self.seed}"


# ------------------------------------------------------------------------------------------- commands


def train_overrides(scale: Scale, data_root: Path, eval_limit: int | None, extra: Sequence[str]) -> list[str]:
    """The ``key=value`` list every config gets at this scale (data, model, schedule, logging)."""
    # the published tables were trained with weight decay on every parameter (mbn < 0.3): kept, so they reproduce
    out = [*scale.train, "optim.decay_norm_and_bias=true"]
    if scale.imagefolder:
        out += ["data.name=imagefolder", f"data.root={data_root}"]
    if eval_limit is not None:
        out.append(f"data.test_limit={eval_limit}")  # the end-of-training test pass sees the same images
    return out + list(extra)


def make_job(
    config: str,
    seed: int,
    scale: Scale,
    runs_dir: Path,
    common: Sequence[str],
    eval_limit: int | None,
    cache_dir: Path | None,
    configs: Mapping[str, Config] | None = None,
    linf_eps: Sequence[float] | None = None,
    l2_eps: Sequence[float] | None = None,
    suites: Sequence[str] = (),
) -> Job:
    """Build the train command and the evaluation options of one (config, seed); ``suites`` as ``mbn-eval --suite``."""
    from mbn.eval.evaluate import EvalOptions

    cfg = (configs or CONFIGS)[config]
    run_dir = runs_dir / f"{config}-s{seed}"
    init = [f"model.init_from={runs_dir / f'{cfg.init_from}-s{seed}'}"] if cfg.init_from else []
    train_cmd = [
        sys.executable,
        "-m",
        "mbn.cli.train",
        str(REPO / cfg.recipe),
        *cfg.overrides,
        *common,
        *init,
        f"trainer.seed={seed}",
        f"trainer.out_dir={run_dir}",
    ]
    options = EvalOptions(
        sections={"clean", "corruptions", "adversarial", *(["suites"] if suites else [])},
        suites=list(suites) or None,
        limit=eval_limit,
        pgd_steps=scale.pgd_steps,
        linf_eps=tuple(linf_eps if linf_eps is not None else scale.linf_eps),
        l2_eps=tuple(l2_eps if l2_eps is not None else scale.l2_eps),
        cache_dir=cache_dir,
        progress=False,
    )
    return Job(config, seed, run_dir, runs_dir / "logs" / f"{config}-s{seed}.log", train_cmd, options)


def describe_eval(options: Any) -> str:
    """The evaluation of a job as one line (``mbn.eval.evaluate_run`` with these options, in-process)."""
    radii = f"linf_eps={list(options.linf_eps)} l2_eps={list(options.l2_eps)}"
    return (
        f"evaluate_run(sections={sorted(options.sections)}, pgd_steps={options.pgd_steps}, {radii}, "
        f"limit={options.limit}" + (f", suites={list(options.suites)})" if options.suites else ")")
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def eval_complete(
    evaluation: Mapping[str, Any] | None,
    scale: Scale,
    eval_limit: int | None,
    linf_eps: Sequence[float] | None = None,
    suite_keys: Mapping[str, str] | None = None,
) -> bool:
    """Whether an ``eval.json`` holds every number the table needs, on the requested images."""
    if not evaluation or evaluation.get("limit") != eval_limit or evaluation.get("clean_acc") is None:
        return False
    corruptions, adversarial = evaluation.get("corruptions"), evaluation.get("adversarial")
    if not corruptions or not adversarial or adversarial.get("steps") != scale.pgd_steps:
        return False
    if not all(f"{e:g}" in adversarial.get("linf", {}) for e in (linf_eps or scale.linf_eps)):
        return False
    scored = evaluation.get("suites") or {}
    wanted = (suite_keys or {}).items()  # the same folder on the same images, or it is scored again
    return all(key in scored and (scored[key].get("limit"), scored[key].get("dir")) == (eval_limit, root)
               for key, root in wanted)  # fmt: skip


def _run_logged(cmd: list[str], log: Path, what: str) -> tuple[int, float]:
    """Run ``cmd`` from the repository root with its output appended to ``log``; return (exit status, seconds)."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {what}: {shlex.join(cmd)}\n")
        f.flush()
        tic = time.perf_counter()
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, check=False).returncode
    return code, time.perf_counter() - tic


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def evaluate_logged(job: Job) -> tuple[int, float]:
    """Evaluate ``job``'s run in-process (:func:`mbn.eval.evaluate.evaluate_run`), logging to its log file."""
    from mbn.eval.evaluate import evaluate_run, summary_line
    from mbn.eval.report import write_report

    tic = time.perf_counter()
    with job.log.open("a") as f:
        f.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} eval: {describe_eval(job.eval_options)}\n")
        try:
            result, out_dir = evaluate_run(job.run_dir, job.eval_options)
            written = write_report(result, out_dir)
        except Exception as err:  # reported as the run's status; the other runs go on
            f.write(f"evaluate: error: {type(err).__name__}: {err}\n")
            return 1, time.perf_counter() - tic
        f.write(f"evaluate: {summary_line(result)}\n")
        f.write(f"evaluate: wrote {', '.join(p.name for p in written)} to {out_dir}\n")
    return 0, time.perf_counter() - tic


def suite_keys(options: Any) -> dict[str, str]:
    """``{eval.json key: absolute folder}`` of the suites a job's evaluation names (``--suite KIND[:LABEL]=DIR``)."""
    from mbn.eval.suite_spec import parse_specs

    return {spec.key: str(spec.root.resolve()) for spec in parse_specs(getattr(options, "suites", None) or [])}


def execute(job: Job, scale: Scale, eval_limit: int | None) -> None:
    """Train (or resume) and evaluate one run unless its results are already there; sets ``job.status``."""
    linf = job.eval_options.linf_eps if job.eval_options is not None else None
    keys = suite_keys(job.eval_options)
    metrics = _read_json(job.run_dir / "metrics.json")
    evaluation = _read_json(job.run_dir / "eval.json")
    if metrics is not None and job.eval_options is None:  # trained only (e.g. a pre-training run)
        job.metrics, job.status = metrics, "skipped (done)"
        return
    if metrics is not None and eval_complete(evaluation, scale, eval_limit, linf, keys):
        job.metrics, job.evaluation, job.status = metrics, evaluation, "skipped (done)"
        return
    if metrics is None:
        cmd = job.train_cmd
        if (job.run_dir / "checkpoints" / "last.pt").is_file():  # interrupted: continue where it stopped
            cmd = [sys.executable, "-m", "mbn.cli.train", "--resume", str(job.run_dir)]
        code, job.seconds["train"] = _run_logged(cmd, job.log, "train")
        metrics = _read_json(job.run_dir / "metrics.json")
        if code != 0 or metrics is None:
            job.status = f"FAILED training (exit {code}): {_last_line(job.log)}"
            return
    if job.eval_options is None:
        job.metrics, job.status = metrics, "done (trained; not evaluated)"
        return
    code, job.seconds["eval"] = evaluate_logged(job)
    evaluation = _read_json(job.run_dir / "eval.json")
    if code != 0 or not eval_complete(evaluation, scale, eval_limit, linf, keys):
        job.status = f"FAILED evaluation (exit {code}): {_last_line(job.log)}"
        return
    job.metrics, job.evaluation, job.status = metrics, evaluation, "done"


# ----------------------------------------------------------------------------------------- aggregation


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std is None below 2 values, both None for none."""
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def corruption_table(evaluation: Mapping[str, Any]) -> dict[tuple[str, int], float]:
    """``eval.json``'s ``corruptions.accuracy`` as ``{(corruption, severity): accuracy}``."""
    return {(c, int(s)): float(v) for c, row in evaluation["corruptions"]["accuracy"].items() for s, v in row.items()}


def mce_vs(evaluation: Mapping[str, Any], reference: Mapping[str, Any]) -> float:
    """mCE of ``evaluation`` relative to ``reference`` (a ratio, 1.0 = as good as the reference).

    ``CE_c = sum_s error[c, s] / sum_s reference_error[c, s]`` and mCE is the mean over the evaluated
    corruptions (Hendrycks & Dietterich 2019), computed by :func:`mbn.eval.metrics.mce`.
    """
    from mbn.eval.metrics import corruption_errors, mce

    table, ref_table = corruption_table(evaluation), corruption_table(reference)
    corruptions = list(evaluation["corruptions"]["accuracy"])
    severities = sorted({s for _, s in table})
    return mce(corruption_errors(table), corruption_errors(ref_table), corruptions, severities)


def run_values(
    metrics: Mapping[str, Any],
    evaluation: Mapping[str, Any],
    ref_metrics: Mapping[str, Any] | None,
    ref_evaluation: Mapping[str, Any] | None,
) -> dict[str, float | None]:
    """The table's numbers for one run; ``mce``/``cost_ratio`` need the reference run of the same seed."""
    linf = evaluation["adversarial"]["linf"]
    values: dict[str, float | None] = {
        "clean_acc": float(evaluation["clean_acc"]),
        "corruption_acc": float(evaluation["corruptions"]["mean_acc"]),
        "mce": mce_vs(evaluation, ref_evaluation) if ref_evaluation is not None else None,
        **{f"pgd_linf_{e:g}": (float(linf[f"{e:g}"]) if f"{e:g}" in linf else None) for e in TABLE_LINF},
        "train_time_s": float(metrics["train_time_s"]),
        "cost_ratio": None,
    }
    if ref_metrics is not None and ref_metrics.get("train_time_s"):
        values["cost_ratio"] = float(metrics["train_time_s"]) / float(ref_metrics["train_time_s"])
    return values


def summarize(
    per_run: Mapping[str, Mapping[int, Mapping[str, float | None]]], metrics: Sequence[str] = METRICS
) -> dict[str, dict[str, Any]]:
    """``{config: {seed: values}}`` -> ``{config: {metric: {mean, std, n, values}}}`` over seeds (None skipped)."""
    out: dict[str, dict[str, Any]] = {}
    for config, seeds in per_run.items():
        out[config] = {}
        for metric in metrics:
            values = [v[metric] for _, v in sorted(seeds.items()) if v.get(metric) is not None]
            mean, std = mean_std(values)  # type: ignore[arg-type]
            out[config][metric] = {"mean": mean, "std": std, "n": len(values), "values": values}
    return out


_PERCENT = {"clean_acc", "corruption_acc", "mce", *(f"pgd_linf_{e:g}" for e in TABLE_LINF)}


def format_cell(stat: Mapping[str, Any], metric: str, n_seeds: int) -> str:
    """``mean ± std`` in the metric's unit (percent for accuracies and mCE); ``-`` when missing."""
    if stat["mean"] is None:
        return "-"
    scale, digits, suffix = (100.0, 2, "") if metric in _PERCENT else (1.0, 2, "x" if metric == "cost_ratio" else "")
    if metric == "train_time_s":
        digits = 1
    text = f"{stat['mean'] * scale:.{digits}f}{suffix}"
    if stat["std"] is not None:
        text += f" ± {stat['std'] * scale:.{digits}f}"
    if stat["n"] < n_seeds:
        text += f" (n={stat['n']})"
    return text


def paired_differences(
    per_run: Mapping[str, Mapping[int, Mapping[str, float | None]]], method: str, baseline: str, metric: str
) -> list[float]:
    """``method - baseline`` in points for every seed both ran (same seed: same init, data order, subset)."""
    a, b = per_run.get(method, {}), per_run.get(baseline, {})
    return [
        (a[seed][metric] - b[seed][metric]) * 100  # type: ignore[operator]
        for seed in sorted(set(a) & set(b))
        if a[seed].get(metric) is not None and b[seed].get(metric) is not None
    ]


def verdict(
    summary: Mapping[str, Mapping[str, Any]],
    method: str,
    baseline: str,
    metric: str,
    per_run: Mapping[str, Mapping[int, Mapping[str, float | None]]] | None = None,
) -> str | None:
    """``"<method> vs <baseline> <metric>: +x.xx (seed std y.yy; ...)"``: difference of means against seed noise.

    The noise is the larger of the two configs' seed standard deviations; None when either config is missing.
    With ``per_run``, the same-seed differences follow, and in how many seeds the method was better.
    """
    if method not in summary or baseline not in summary:
        return None
    a, b = summary[method][metric], summary[baseline][metric]
    if a["mean"] is None or b["mean"] is None:
        return None
    label = {"clean_acc": "clean acc", "corruption_acc": "CIFAR-10-C acc", "mce": "mCE"}[metric]
    lower_better = metric == "mce"
    diff = (a["mean"] - b["mean"]) * 100
    stds = [s["std"] for s in (a, b) if s["std"] is not None]
    better = "same" if diff == 0 else ("better" if (diff < 0) == lower_better else "worse")
    line = f"{method} vs {baseline} {label}: {diff:+.2f}"
    if len(stds) == 2:
        noise = max(stds) * 100
        judged = "beyond" if abs(diff) > noise else "within"
        line += f" (seed std {noise:.2f}; {better}, {judged} seed noise)"
    else:
        line += f" (seed std n/a with {min(a['n'], b['n'])} seed; {better})"
    paired = paired_differences(per_run, method, baseline, metric) if per_run is not None else []
    if len(paired) > 1:
        wins = sum((d < 0) == lower_better and d != 0 for d in paired)
        line += f"; same seed: {', '.join(f'{d:+.2f}' for d in paired)}, better in {wins}/{len(paired)}"
    return line + (" [lower is better]" if lower_better else "")


def verdicts(
    summary: Mapping[str, Mapping[str, Any]],
    per_run: Mapping[str, Mapping[int, Mapping[str, float | None]]] | None = None,
) -> list[str]:
    """One line per (claim, metric) whose configs were run: clean accuracy and mCE."""
    lines = [verdict(summary, m, b, metric, per_run) for m, b in CLAIMS for metric in ("clean_acc", "mce")]
    return [line for line in lines if line is not None]


# -------------------------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    """CPU, cores, torch and GPU of this machine (the children run on the same one)."""
    import torch

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def scale_settings(scale_name: str, scale: Scale, jobs: Sequence[Job], eval_limit: int | None) -> dict[str, Any]:
    """Model, schedule and data sizes as resolved by ``mbn-train`` (read from a run's ``config.yaml``)."""
    settings: dict[str, Any] = {"scale": scale_name, "about": scale.about}
    cfg_file = next((j.run_dir / "config.yaml" for j in jobs if (j.run_dir / "config.yaml").is_file()), None)
    if cfg_file is not None:
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(cfg_file)
        data = cfg.data
        train_size = data.synthetic_train_size if data.name == "synthetic" else (data.train_limit or "all")
        settings.update(
            model=f"{cfg.model.name} (width {cfg.model.width})",
            epochs=cfg.trainer.epochs,
            max_steps=cfg.trainer.max_steps,
            data=f"{data.name}" + (f" ({data.root})" if data.name == "imagefolder" else ""),
            train_images=train_size,
            batch_size_per_domain=data.batch_size,
            amp=cfg.trainer.amp,
        )
    settings.update(
        eval_images=eval_limit if eval_limit is not None else "all",
        seeds=sorted({j.seed for j in jobs}),
        pgd=f"PGD-{scale.pgd_steps}, L-inf eps {', '.join(f'{e:g}' for e in scale.linf_eps)} /255, main BN",
    )
    return settings


def _settings_line(s: Mapping[str, Any]) -> str:
    parts = [f"**{s['scale']}** ({s['about']})"]
    if "model" in s:
        steps = f", max {s['max_steps']} steps" if s.get("max_steps") else ""
        parts += [
            f"model {s['model']}",
            f"{s['epochs']} epochs{steps}",
            f"data {s['data']}, {s['train_images']} training images, batch {s['batch_size_per_domain']} per domain",
            f"amp {s['amp']}",
        ]
    parts += [f"{s['eval_images']} eval images", f"seeds {', '.join(map(str, s['seeds']))}", s["pgd"]]
    return "; ".join(parts)


HEADERS = {
    "clean_acc": "clean acc (%)",
    "corruption_acc": "CIFAR-10-C mean acc (%)",
    "mce": "mCE vs vanilla (%)",
    **{f"pgd_linf_{e:g}": f"PGD L∞ {e:g}/255 acc (%)" for e in TABLE_LINF},
    "train_time_s": "train time (s)",
    "cost_ratio": "cost vs vanilla",
}


def render_markdown(report: Mapping[str, Any]) -> str:
    """``results.md``: header (command, scale, machine, date), the table, verdicts and run directories."""
    n_seeds = len(report["settings"]["seeds"])
    m = report["machine"]
    lines = [
        f"# AdvProp paper experiment: {report['settings']['scale']} scale",
        "",
        f"- Command: `{report['command']}`",
        f"- Scale: {_settings_line(report['settings'])}",
        f"- Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"GPU: {m['gpu'] or 'none'}",
        f"- Date: {report['date']}",
        "",
        "| config | " + " | ".join(HEADERS[k] for k in METRICS) + " |",
        "|---|" + "---:|" * len(METRICS),
    ]
    for config, stats in report["summary"].items():
        lines.append(f"| {config} | " + " | ".join(format_cell(stats[k], k, n_seeds) for k in METRICS) + " |")
    lines += [
        "",
        f"Mean ± sample std (n - 1) over seeds{' (one seed: mean only)' if n_seeds == 1 else ''}. "
        "Accuracies through the main BN in eval mode. CIFAR-10-C: mean over 15 corruptions x 5 severities. "
        "mCE: CE_c = sum over severities of error / vanilla's error (same seed), averaged over the corruptions; "
        "lower is better, vanilla = 100. Train time: seconds in training steps (`train_time_s`); "
        "cost: train time / vanilla's, same seed.",
        "",
        *_suites_section(report),
        "## Verdicts",
        "",
        *(f"- {line}" for line in report["verdicts"]),
        "",
        "## Runs",
        "",
        "| run | status | run directory |",
        "|---|---|---|",
        *(f"| {r['name']} | {r['status']} | `{r['run_dir']}` |" for r in report["runs"]),
        "",
    ]
    return "\n".join(lines)


def _suites_section(report: Mapping[str, Any]) -> list[str]:
    """The published suites' table, one row per run (``mbn.eval.report.paper_table``), when any were evaluated."""
    from mbn.eval.report import paper_table

    rows = report.get("suite_rows") or {}
    if not rows:
        return []
    return [
        "## Robustness suites",
        "",
        *paper_table(rows),
        "",
        "One row per run (config-seed), through the main BN. IN-C: mCE against AlexNet (lower is better); other "
        "columns: top-1 accuracy (%), the -C suites' mean over corruptions and severities.",
        "",
    ]


def _config_record(name: str) -> dict[str, Any]:
    """What a config trains: its recipe, overrides and description."""
    cfg = CONFIGS[name]
    return {"recipe": cfg.recipe, "overrides": list(cfg.overrides), "about": cfg.about}


def build_report(
    jobs: Sequence[Job], scale_name: str, scale: Scale, eval_limit: int | None, command: str
) -> dict[str, Any]:
    """Per-run values, the summary over seeds and the verdicts, as written to ``results.json``."""
    done = {(j.config, j.seed): j for j in jobs if j.metrics is not None and j.evaluation is not None}
    per_run: dict[str, dict[int, dict[str, float | None]]] = {}
    for job in jobs:
        if (job.config, job.seed) not in done:
            continue
        ref = done.get((REFERENCE, job.seed))
        per_run.setdefault(job.config, {})[job.seed] = run_values(
            job.metrics,  # type: ignore[arg-type]
            job.evaluation,  # type: ignore[arg-type]
            ref.metrics if ref else None,
            ref.evaluation if ref else None,
        )
    summary = summarize(per_run)
    runs = [
        {
            "name": j.name,
            "config": j.config,
            "seed": j.seed,
            "status": j.status,
            "run_dir": str(j.run_dir),
            "config_yaml": str(j.run_dir / "config.yaml"),
            "log": str(j.log),
            "values": per_run.get(j.config, {}).get(j.seed),
            "wall_time_s": (j.metrics or {}).get("wall_time_s"),
            "images_per_s": (j.metrics or {}).get("images_per_s"),
            "steps": (j.metrics or {}).get("steps"),
        }
        for j in jobs
    ]
    return {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": scale_settings(scale_name, scale, jobs, eval_limit),
        "machine": machine(),
        "configs": {name: _config_record(name) for name in dict.fromkeys(j.config for j in jobs)},
        "metrics": {k: HEADERS[k] for k in METRICS},
        "summary": summary,
        "verdicts": verdicts(summary, per_run),
        "runs": runs,
        "suite_rows": {
            j.name: {"clean_acc": j.evaluation.get("clean_acc"), "suites": j.evaluation["suites"]}
            for j in jobs
            if j.evaluation is not None and j.evaluation.get("suites")
        },
    }


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse and check the command line."""
    p = argparse.ArgumentParser(
        description="Train and evaluate vanilla, AutoAugment, adversarial training and AdvProp over seeds; "
        "write results.json and results.md.",
    )
    p.add_argument("--scale", required=True, choices=sorted(SCALES), help="smoke (tests) | cpu (reduced) | gpu (full)")
    p.add_argument(
        "--study",
        choices=("advprop", "ssl"),
        default="advprop",
        help="advprop: Xie et al. 2020 (default); ssl: self-supervision and robustness (Kucer et al. 2021)",
    )
    p.add_argument("--seeds", type=int, nargs="+", help="trainer.seed values (default: the scale's)")
    p.add_argument(
        "--configs",
        nargs="+",
        choices=list(CONFIGS) + list(ssl_study.CONFIGS),
        metavar="NAME",
        help=f"configs to run (default: all of the study): {', '.join(CONFIGS)}; ssl: {', '.join(ssl_study.CONFIGS)}",
    )
    p.add_argument("--out", type=Path, help="where results.json/.md go (default: benchmarks/paper/results/<scale>)")
    p.add_argument("--runs-dir", type=Path, help="run directories and logs (default: runs/paper/<scale>)")
    p.add_argument(
        "--data-root",
        default="../shared/datasets/cifar10",
        help="CIFAR-10 ImageFolder tree (train/, test/); relative to the repository root",
    )
    p.add_argument("--eval-limit", type=int, metavar="N", help="test images for every evaluation (default: scale's)")
    p.add_argument("--cache-dir", type=Path, help="corruption cache for mbn-eval (default: mbn-eval's)")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra mbn-train override for every run, e.g. trainer.max_steps=20 (repeatable)",
    )
    p.add_argument(
        "--suite",
        action="append",
        default=[],
        metavar="KIND=DIR",
        help="also evaluate every run on this published suite, as mbn-eval --suite (repeatable); adds a table",
    )
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    if args.eval_limit is not None and args.eval_limit < 1:
        p.error(f"--eval-limit: expected a positive integer, got {args.eval_limit}")
    for item in args.override:
        if "=" not in item:
            p.error(f"--override: expected KEY=VALUE, got {item!r}")
    if args.seeds is not None and any(s < 0 for s in args.seeds):
        p.error(f"--seeds: expected integers >= 0, got {args.seeds}")
    from mbn.eval.suite_spec import SuiteError, parse_specs

    try:
        parse_specs(args.suite)
    except SuiteError as err:
        p.error(str(err))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the experiment; returns 0 when every run finished, 1 otherwise (2 for bad input)."""
    args = parse_args(argv)
    if args.study == "ssl":
        return main_ssl(args, argv)
    scale = SCALES[args.scale]
    seeds = list(dict.fromkeys(args.seeds if args.seeds is not None else scale.seeds))
    configs = list(dict.fromkeys(args.configs or CONFIGS))
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        print(f"run.py: error: --configs: {unknown} are not configs of the advprop study", file=sys.stderr)
        return 2
    eval_limit = args.eval_limit if args.eval_limit is not None else scale.eval_limit
    out = (args.out or REPO / "benchmarks" / "paper" / "results" / args.scale).resolve()
    runs_dir = (args.runs_dir or REPO / "runs" / "paper" / args.scale).resolve()
    data_root = _data_root(args)
    if scale.imagefolder and not args.dry_run and not (data_root / "train").is_dir():
        print(
            f"run.py: error: --data-root: {data_root}/train not found (expected a CIFAR-10 ImageFolder tree)",
            file=sys.stderr,
        )
        return 2
    common = train_overrides(scale, data_root, eval_limit, args.override)
    jobs = [
        make_job(c, s, scale, runs_dir, common, eval_limit, args.cache_dir, suites=args.suite)
        for s in seeds
        for c in configs
    ]
    if args.dry_run:
        print_dry_run(jobs)
        return 0
    header = f"run.py: {len(jobs)} runs at scale {args.scale} into {runs_dir}; logs in {runs_dir / 'logs'}"
    command, start = run_jobs(jobs, argv, header, scale, eval_limit, with_headline=True)

    report = build_report(jobs, args.scale, scale, eval_limit, command)
    return write_results(out, report, render_markdown(report), jobs, start)


def write_results(out: Path, report: Mapping[str, Any], markdown: str, jobs: Sequence[Job], start: float) -> int:
    """Write ``results.json`` and ``results.md``; report failed runs; the exit status (1 if any failed)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(report, indent=2, allow_nan=False))
    atomic_write_text(out / "results.md", markdown)
    failed = [j.name for j in jobs if j.metrics is None or (j.eval_options is not None and j.evaluation is None)]
    print(f"run.py: wrote {out / 'results.md'} ({(time.perf_counter() - start) / 60:.1f} min)", flush=True)
    if failed:
        print(f"run.py: {len(failed)} run(s) failed: {', '.join(failed)}; see their logs", flush=True)
    return 1 if failed else 0


def run_jobs(
    jobs: Sequence[Job],
    argv: Sequence[str] | None,
    header: str,
    scale: Scale,
    eval_limit: int | None,
    with_headline: bool = False,
) -> tuple[str, float]:
    """Run (or skip, when done) every job, one progress line each; returns the command line and the start time."""
    command = shlex.join(["python", "benchmarks/paper/run.py", *(sys.argv[1:] if argv is None else argv)])
    print(header, flush=True)
    start = time.perf_counter()
    for i, job in enumerate(jobs, 1):
        line = run_job(job, i, len(jobs), scale, eval_limit)
        if with_headline and job.evaluation is not None:
            e = job.evaluation
            line += f"; clean {e['clean_acc']:.4f}, C-10-C {e['corruptions']['mean_acc']:.4f}"
        print(line, flush=True)
    return command, start


def print_dry_run(jobs: Sequence[Job]) -> None:
    """Each job's training command and, for evaluated jobs, its evaluation."""
    for job in jobs:
        then = f"\n# then {describe_eval(job.eval_options)}" if job.eval_options is not None else ""
        print(f"# {job.name}\n{shlex.join(job.train_cmd)}{then}")


def run_job(job: Job, i: int, n: int, scale: Scale, eval_limit: int | None) -> str:
    """Execute one job; its progress line ``[i/n] name: status (times)``."""
    execute(job, scale, eval_limit)
    took = ", ".join(f"{k} {v:.0f} s" for k, v in job.seconds.items())
    return f"[{i}/{n}] {job.name}: {job.status}" + (f" ({took})" if took else "")


def _data_root(args: argparse.Namespace) -> Path:
    data_root = Path(args.data_root)
    return data_root if data_root.is_absolute() else (REPO / data_root).resolve()


def main_ssl(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """The self-supervision study (:mod:`ssl_study`): train, evaluate, tabulate, judge each claim."""
    scale = SCALES[args.scale]
    seeds = list(dict.fromkeys(args.seeds if args.seeds is not None else scale.seeds))
    configs = list(dict.fromkeys(args.configs or ssl_study.CONFIGS))
    for config in list(configs):  # a run that starts from another needs that one first
        dep = ssl_study.CONFIGS[config].init_from if config in ssl_study.CONFIGS else None
        if dep and dep not in configs:
            configs.insert(configs.index(config), dep)
    unknown = [c for c in configs if c not in ssl_study.CONFIGS]
    if unknown:
        print(f"run.py: error: --configs: {unknown} are not configs of the ssl study", file=sys.stderr)
        return 2
    eval_limit = args.eval_limit if args.eval_limit is not None else ssl_study.EVAL_LIMIT[args.scale]
    out = (args.out or REPO / "benchmarks" / "paper" / "results" / f"ssl-{args.scale}").resolve()
    runs_dir = (args.runs_dir or REPO / "runs" / "paper" / f"ssl-{args.scale}").resolve()
    data_root = _data_root(args)
    if scale.imagefolder and not args.dry_run and not (data_root / "train").is_dir():
        print(f"run.py: error: --data-root: {data_root}/train not found", file=sys.stderr)
        return 2
    common = [*train_overrides(scale, data_root, eval_limit, args.override), *ssl_study.SCALE_OVERRIDES[args.scale]]
    attack = ssl_study.ATTACK_OVERRIDES[args.scale]
    study = {
        name: c._replace(overrides=c.overrides + attack) if c.attacks else c for name, c in ssl_study.CONFIGS.items()
    }
    jobs = []
    for seed in seeds:
        for config in configs:
            job = make_job(
                config, seed, scale, runs_dir, common, eval_limit, args.cache_dir, study,  # type: ignore[arg-type]
                ssl_study.LINF_EPS, ssl_study.L2_EPS,
            )  # fmt: skip
            if not ssl_study.CONFIGS[config].evaluate:
                job.eval_options = None
            jobs.append(job)
    if args.dry_run:
        print_dry_run(jobs)
        return 0
    header = f"run.py: ssl study, {len(jobs)} runs at scale {args.scale} into {runs_dir}"
    command, start = run_jobs(jobs, argv, header, scale, eval_limit)
    per_run: dict[str, dict[int, dict[str, float | None]]] = {}
    for job in jobs:
        if job.metrics is not None and job.evaluation is not None:
            per_run.setdefault(job.config, {})[job.seed] = ssl_study.run_values(job.metrics, job.evaluation)
    summary = summarize(per_run, ssl_study.METRICS)
    settings = scale_settings(args.scale, scale, jobs, eval_limit)
    settings["pgd"] = f"PGD-{scale.pgd_steps} through the main BN, eval mode"
    report = {
        "study": "ssl",
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": settings,
        "machine": machine(),
        "configs": {c: ssl_study.CONFIGS[c]._asdict() for c in configs},
        "summary": summary,
        "verdicts": ssl_study.verdicts(summary),
        "runs": [{"name": j.name, "status": j.status, "run_dir": str(j.run_dir)} for j in jobs],
    }
    m = report["machine"]
    md = [
        "# Self-supervision and robustness (Kucer et al. 2021): " + f"{args.scale} scale",
        "",
        f"- Command: `{command}`",
        f"- Scale: {_settings_line(settings)}; study overrides: "
        f"`{' '.join(ssl_study.SCALE_OVERRIDES[args.scale] + attack) or 'none'}` (attack ones for configs with one)",
        f"- Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, GPU: {m['gpu'] or 'none'}",
        f"- Date: {report['date']}",
        "",
        *ssl_study.render_table(summary, len(seeds)),
        "",
        "Accuracies in %, mean ± sample std over seeds, through the main BN in eval mode; L∞ radii in /255, "
        "L2 radii in [0, 1]-pixel units; C-10-C: mean over 15 corruptions x 5 severities.",
        "",
        *_suites_section(report),
        "## Verdicts",
        "",
        *(f"- {line}" for line in report["verdicts"]),
        "",
        "## Runs",
        "",
        *(f"- {r['name']}: {r['status']} (`{r['run_dir']}`)" for r in report["runs"]),
        "",
    ]
    return write_results(out, report, "\n".join(md), jobs, start)


if __name__ == "__main__":
    sys.exit(main())
