"""One prepared GPU check: environment, the CUDA tests, throughput ratios and a short paper table, within a budget.

GPU time is scarce: whoever holds a GPU for a few minutes runs this once, unattended, and it returns every figure the
project is missing. Parts run in order, each only if the clock leaves it enough time; results are rewritten after
every part (``DIR/results.json``, ``DIR/results.md``), so a kill loses nothing finished. One summary line per part.

- ``environment``: torch / CUDA / cuDNN / driver versions, GPU name and memory, bf16 support.
- ``tests``: the CUDA tests (``pytest --device cuda -k "cuda or gpu"``): counts and the names of failures.
- ``throughput``: seconds per step and images/s, as ratios measured in the same run: the engine vs a hand-written
  loop (vanilla, AdvProp), fp32 / bf16 / fp16 + scaler, channels_last, torch.compile (its compile time apart), one
  split forward vs one forward per BN, AdvProp and Fast AdvProp vs vanilla, ``data.on_device``, a streamed JPEG
  tree's loader with ``decode=workers`` vs ``decode=device`` against the step's images/s, host syncs per step.
- ``paper``: the paper harness (``benchmarks/paper/run.py --scale gpu``) on the full CIFAR-10, one seed, as many of
  vanilla / AdvProp PGD-1 / adversarial training (shared BN) / Fast AdvProp as the remaining budget allows, with the
  epochs chosen to fit; skipped (and said so) without the shared copy.

``--dry-run`` runs every part on the CPU at toy sizes (synthetic data, a width-8 ResNet-8, the harness's smoke
scale) in a few minutes and writes the same sections; the test suite runs it, so the script cannot rot.

Usage:
    python benchmarks/gpu_check.py --out DIR [--dry-run] [--budget-s 480] [--parts environment tests ...]
        [--data-root ../shared/datasets/cifar10]

Needs mbn installed with its dependencies (``pip install -e .``): the environment part checks them and the domains
first, and skips every other part with one line naming what is missing. The budget counts from the script's start;
give the command's own time limit about 60 s more. Only ``results.json``, ``results.md`` and the harness's
``paper/results.{json,md}`` are written under ``--out``; run directories and logs go to a temporary folder.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

STARTED: float | None = time.monotonic()  # the budget counts from here, before the heavy imports (first run)

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # the sibling benchmarks (bench_overhead's loops, common's helpers)
sys.path.insert(1, str(REPO))  # mbn from this checkout when it is not installed

from common import cpu_model  # noqa: E402

from mbn.fileio import atomic_write_text  # noqa: E402

PARTS = ("environment", "tests", "throughput", "paper")
#: Seconds each part needs at least to be started (GPU run, dry run).
NEEDS = {"environment": (1, 1), "tests": (60, 10), "throughput": (90, 20), "paper": (120, 30)}
#: Harness configs in the order the paper part adds them, with their step cost relative to vanilla when the throughput
#: part did not measure it (AdvProp's and adversarial training's are alike; Fast AdvProp trains vanilla's budget).
PAPER_CONFIGS = {"vanilla": 1.0, "advprop_pgd1": 2.6, "fast_advprop": 1.0, "advtrain": 2.6}
#: Modules a run needs beyond torch: checked first, so a bare machine fails in one line rather than in every part.
NEEDED = ("omegaconf", "albumentations", "kornia", "timm", "torchvision", "pytest")


# ------------------------------------------------------------------------------------------------ the check


class Check:
    """Runs parts against the clock and keeps ``results.json`` / ``results.md`` current after each."""

    def __init__(self, out: Path, budget_s: float, dry_run: bool, data_root: Path, started: float) -> None:
        self.out, self.budget_s, self.dry_run, self.data_root = out, budget_s, dry_run, data_root
        self.started = started
        self.device = torch.device("cpu" if dry_run or not torch.cuda.is_available() else "cuda")
        self.abort: str | None = None  # set by the environment part when the machine cannot run the rest
        self.scratch = Path(tempfile.mkdtemp(prefix="gpu_check-"))  # run directories, logs: only results go to out
        self.results: dict[str, Any] = {
            "script": "benchmarks/gpu_check.py",
            "command": " ".join(["python", "benchmarks/gpu_check.py", *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "dry_run": dry_run,
            "device": str(self.device),
            "budget_s": budget_s,
            "parts": {},
        }
        out.mkdir(parents=True, exist_ok=True)

    def remaining(self) -> float:
        """Seconds left of the budget."""
        return self.budget_s - (time.monotonic() - self.started)

    def run(self, name: str, part: Callable[[Check], dict[str, Any]]) -> None:
        """Run ``part`` if the clock leaves it its minimum; record ok / failed / skipped and save."""
        need = NEEDS[name][1 if self.dry_run else 0]
        record: dict[str, Any]
        if self.abort is not None:
            record = {"status": "skipped", "why": f"the environment cannot run it: {self.abort}"}
        elif self.remaining() < need:
            record = {"status": "skipped", "why": f"{self.remaining():.0f} s left, the part needs at least {need} s"}
        else:
            tic = time.monotonic()
            try:
                record = {"status": "ok", **part(self)}
            except Exception as err:  # one part's failure must not cost the others their minutes
                tail = traceback.format_exc().strip().splitlines()[-6:]
                record = {"status": "failed", "error": f"{type(err).__name__}: {err}".splitlines()[0], "trace": tail}
            record["seconds"] = round(time.monotonic() - tic, 1)
        self.results["parts"][name] = record
        self.results["elapsed_s"] = round(time.monotonic() - self.started, 1)
        self.save()
        print(f"gpu_check: {name}: {summary(name, record)}", flush=True)

    def save(self) -> None:
        """``results.json`` and ``results.md``, each written atomically."""
        atomic_write_text(self.out / "results.json", json.dumps(self.results, indent=2, default=str) + "\n")
        atomic_write_text(self.out / "results.md", render_markdown(self.results))


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a timing includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ environment


def environment(check: Check) -> dict[str, Any]:
    """Versions and the device."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            bf16=torch.cuda.is_bf16_supported(),
            gpus=torch.cuda.device_count(),
        )
        if shutil.which("nvidia-smi"):
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            try:
                done = subprocess.run(query, capture_output=True, text=True, timeout=20, check=False)
                info["driver"] = done.stdout.strip().splitlines()[0] if done.stdout.strip() else None
            except (OSError, subprocess.SubprocessError) as err:
                info["driver"] = f"nvidia-smi failed: {err}"
    import importlib.util

    info["missing_modules"] = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    import mbn

    info["mbn"] = mbn.__version__
    info["domains"] = len(mbn.available_domains())
    if info["missing_modules"] or not info["domains"]:
        check.abort = (
            f"missing {', '.join(info['missing_modules']) or 'nothing'}; {info['domains']} domains registered "
            "(install the checkout first: pip install -e .)"
        )
    info["summary"] = f"torch {info['torch']}, CUDA {info['cuda_build']}, " + (
        f"{info['gpu']} ({info['gpu_memory_gib']} GiB), driver {info.get('driver')}" if "gpu" in info else "no GPU"
    )
    return info


# ------------------------------------------------------------------------------------------------ tests


def tests(check: Check) -> dict[str, Any]:
    """The CUDA tests in a subprocess (a dry run: one quick CPU test file, to exercise the plumbing)."""
    report = check.scratch / "tests.xml"
    if check.dry_run:
        selection = ["tests/test_metrics.py", "--device", "cpu"]
    else:
        selection = ["tests", "--device", "cuda", "-k", "(cuda or gpu) and not gpu_check", "--timeout=60",
                     "--continue-on-collection-errors"]  # fmt: skip
    limit = max(30.0, min(check.remaining() * 0.25, 120.0))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection, f"--junitxml={report}"]
    try:
        exit_code: int | str
        exit_code, stdout = _run_group(cmd, limit)
        tail = stdout.strip().splitlines()[-1:] or [""]
    except subprocess.TimeoutExpired:
        exit_code, tail = f"timed out after {limit:.0f} s", [""]
    counts: dict[str, Any] = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    if report.is_file():
        for case in ET.parse(report).getroot().iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None:
                counts["failed"] += 1
                counts["failures"].append(name)
            elif case.find("error") is not None:
                counts["errors"] += 1
                counts["failures"].append(name)
            elif case.find("skipped") is not None:
                counts["skipped"] += 1
            else:
                counts["passed"] += 1
    counts.update(command=" ".join(cmd[1:]), exit_code=exit_code, last_line=tail[0])
    counts["summary"] = (
        f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
        f"{counts['skipped']} skipped (exit {exit_code})"
    )
    return counts


def _run_group(cmd: list[str], limit: float) -> tuple[int, str]:
    """Run ``cmd`` in its own process group; on timeout kill the whole group (no orphan keeps the GPU busy)."""
    import signal

    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, out or ""


# ------------------------------------------------------------------------------------------------ throughput


def _base_overrides(check: Check) -> list[str]:
    if check.dry_run:
        model = ["model.name=cifar_resnet8", "model.width=8", "data.batch_size=16", "data.synthetic_train_size=256"]
    else:
        model = ["model.name=cifar_resnet18", "model.width=64", "data.batch_size=128", "data.synthetic_train_size=8192"]
    return [
        *model, "data.name=synthetic", "data.synthetic_test_size=64", "data.num_workers=0", "trainer.epochs=1000",
        "trainer.progress=none", "trainer.log_every=1000000000", "logging.tensorboard=false",
        f"trainer.device={check.device.type}",
    ]  # fmt: skip


class Stepper:
    """A trainer built from a recipe and overrides, stepped in blocks through the engine (or a hand loop)."""

    def __init__(self, recipe: str, overrides: list[str], run_dir: Path, hand: bool = False) -> None:
        from bench_overhead import engine_loop, hand_loop

        from mbn.config import load_recipe
        from mbn.train import build_trainer

        cfg = load_recipe(REPO / "recipes" / f"{recipe}.yaml", overrides)
        self.trainer = build_trainer(cfg, run_dir)
        self.batch = int(cfg.data.batch_size)
        self.loop = hand_loop(self.trainer, recipe) if hand else engine_loop(self.trainer)
        self.device = self.trainer.runtime.device

    def seconds_per_step(self, steps: int, warmup: int = 2) -> tuple[float, float]:
        """``(seconds of the warm-up steps, median seconds per step over three blocks of steps)``."""
        sync(self.device)
        tic = time.perf_counter()
        self.loop(warmup)
        sync(self.device)
        warm = time.perf_counter() - tic
        blocks = []
        for _ in range(3):
            tic = time.perf_counter()
            self.loop(steps)
            sync(self.device)
            blocks.append((time.perf_counter() - tic) / steps)
        return warm, sorted(blocks)[1]


def _split_vs_per_bn(check: Check) -> dict[str, float]:
    """One forward+backward of a clean+adv batch split across two BNs vs one forward per BN (converted ResNet)."""
    import torch.nn.functional as F

    import mbn
    from mbn.models import cifar_resnet8, cifar_resnet18

    batch = 16 if check.dry_run else 128
    net = cifar_resnet8(10, width=8) if check.dry_run else cifar_resnet18(10, width=64)
    model = mbn.convert_model(net, sources=("clean", "adv")).to(check.device)
    x = torch.randn(2 * batch, 3, 32, 32, device=check.device)
    y = torch.randint(0, 10, (2 * batch,), device=check.device)

    def split() -> None:
        with mbn.split_sources(model, {"clean": batch, "adv": batch}):
            F.cross_entropy(model(x), y).backward()

    def per_bn() -> None:
        loss = 0
        for i, source in enumerate(("clean", "adv")):
            with mbn.use_source(model, source):
                loss = loss + F.cross_entropy(model(x[i * batch : (i + 1) * batch]), y[i * batch : (i + 1) * batch])
        loss.backward()  # type: ignore[union-attr]

    out = {}
    for name, fn in (("split", split), ("per_bn", per_bn), ("split_again", split)):
        fn()
        sync(check.device)
        tic = time.perf_counter()
        for _ in range(3 if check.dry_run else 10):
            fn()
        sync(check.device)
        out[name] = (time.perf_counter() - tic) / (3 if check.dry_run else 10)
    return {"split_s": min(out["split"], out["split_again"]), "per_bn_s": out["per_bn"]}


def _jpeg_tree(check: Check, tmp: Path) -> Path:
    """The shared CIFAR-10 tree when present (not in a dry run), else a small generated JPEG tree."""
    if not check.dry_run and (check.data_root / "train").is_dir():
        return check.data_root
    n_train = 128 if check.dry_run else 4096  # enough batches that the loader's steady state is measured
    from PIL import Image

    from mbn.synthetic import generate_synthetic

    root = tmp / "jpeg-tree"
    for split, n in (("train", n_train), ("test", 16)):
        images, labels = generate_synthetic(n, 64, seed=1 if split == "test" else 0)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i}.jpg", quality=90)
    return root


def _loader_images_per_s(stepper: Stepper, batches: int) -> float:
    """Images/s of the training loader alone (decoded, on the device), no step."""
    data = stepper.trainer.data.train
    sync(stepper.device)
    tic = time.perf_counter()
    count = 0
    for i, (images, _) in enumerate(data.epoch_batches(1)):
        count += int(images.shape[0])
        if i + 1 >= batches:
            break
    sync(stepper.device)
    return count / (time.perf_counter() - tic)


def _host_syncs(stepper: Stepper, steps: int) -> float | None:
    """Synchronising CUDA calls per training step (``torch.cuda.set_sync_debug_mode``); None on the CPU."""
    if stepper.device.type != "cuda":
        return None
    stepper.loop(1)

    def count(n: int) -> tuple[int, list[str]]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                stepper.loop(n)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        hits = [w for w in caught if "synchroniz" in str(w.message)]
        return len(hits), [f"{Path(w.filename).name}:{w.lineno}" for w in hits]

    # each call ends with the engine's end-of-run logging: the difference of two lengths is the per-step count
    one, _ = count(1)
    many, sites = count(steps + 1)
    stepper.sync_sites = sorted(set(sites))[:10]  # type: ignore[attr-defined]
    return (many - one) / steps


def throughput(check: Check) -> dict[str, Any]:
    """Per-step seconds of every case, and the ratios the docs quote; cases stop when the part's time is up."""
    steps = 2 if check.dry_run else 10
    allotment = check.remaining() * (0.9 if check.dry_run else 0.4)
    deadline = time.monotonic() + allotment
    base = _base_overrides(check)
    on_gpu = ["trainer.amp=bf16", "trainer.channels_last=true"] if check.device.type == "cuda" else []
    cases: dict[str, tuple[str, list[str], bool]] = {
        "vanilla_engine": ("vanilla", [], False),
        "vanilla_hand": ("vanilla", [], True),
        "advprop_engine": ("advprop", [], False),
        "advprop_hand": ("advprop", [], True),
        "vanilla_bf16": ("vanilla", ["trainer.amp=bf16"], False),
        "vanilla_fp16_scaler": ("vanilla", ["trainer.amp=fp16"], False),
        "vanilla_bf16_channels_last": ("vanilla", ["trainer.amp=bf16", "trainer.channels_last=true"], False),
        "vanilla_compile": ("vanilla", [*on_gpu, "trainer.compile=true"], False),
        "vanilla_fast": ("vanilla", on_gpu, False),
        "advprop_fast": ("advprop", on_gpu, False),
        "fast_advprop_fast": ("fast_advprop", on_gpu, False),
        "vanilla_on_device": ("vanilla", [*on_gpu, "data.on_device=true"], False),
    }
    if check.dry_run:  # inductor's CPU compile of even a toy model takes minutes: measured on the GPU only
        cases.pop("vanilla_compile")
    per_step: dict[str, float] = {}
    warmup: dict[str, float] = {}
    skipped: list[str] = []
    errors: dict[str, str] = {}
    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (recipe, overrides, hand) in cases.items():
            if time.monotonic() > deadline:
                skipped.append(name)
                continue
            if name == "vanilla_compile" and deadline - time.monotonic() < 120:
                skipped.append(name)  # a cold inductor compile alone can take a minute or two
                continue
            try:
                stepper = Stepper(recipe, [*base, *overrides], Path(tmp) / name, hand=hand)
                warmup[name], per_step[name] = stepper.seconds_per_step(steps)
                if name in ("advprop_fast", "vanilla_on_device"):
                    extra[f"host_syncs_per_step_{name}"] = _host_syncs(stepper, steps)
                    extra[f"host_sync_sites_{name}"] = getattr(stepper, "sync_sites", None)
                del stepper
            except Exception as err:  # one case's failure (say, fp16 on some GPU) is a finding, not the end
                errors[name] = f"{type(err).__name__}: {err}".splitlines()[0]
            gc.collect()
            if check.device.type == "cuda":
                torch.cuda.empty_cache()
            check.results["parts"]["throughput"] = {"status": "running", "per_step_s": dict(per_step)}
            check.save()  # a kill mid-part keeps the cases measured so far
        for name, measure in (("split_forward", _split_vs_per_bn), ("streamed", _streamed)):
            if time.monotonic() > deadline:
                skipped.append(name)
                continue
            try:
                extra[name] = measure(check) if name == "split_forward" else _streamed(check, Path(tmp), base, steps)
            except Exception as err:
                errors[name] = f"{type(err).__name__}: {err}".splitlines()[0]
    batch = 16 if check.dry_run else 128
    images_per_s = {name: batch / s for name, s in per_step.items()}

    def ratio(a: str, b: str) -> float | None:
        return per_step[a] / per_step[b] if a in per_step and b in per_step else None

    ratios = {
        "engine_over_hand_vanilla": ratio("vanilla_engine", "vanilla_hand"),
        "engine_over_hand_advprop": ratio("advprop_engine", "advprop_hand"),
        "bf16_over_fp32": ratio("vanilla_bf16", "vanilla_engine"),
        "fp16_scaler_over_fp32": ratio("vanilla_fp16_scaler", "vanilla_engine"),
        "channels_last_over_bf16": ratio("vanilla_bf16_channels_last", "vanilla_bf16"),
        "compile_over_eager": ratio("vanilla_compile", "vanilla_fast"),
        "advprop_over_vanilla": ratio("advprop_fast", "vanilla_fast"),
        "fast_advprop_over_vanilla": ratio("fast_advprop_fast", "vanilla_fast"),
        "on_device_over_loader": ratio("vanilla_on_device", "vanilla_fast"),
    }
    split = extra.get("split_forward")
    if split:
        ratios["split_over_per_bn"] = split["split_s"] / split["per_bn_s"]
    shown = [f"{k} {v:.2f}" for k, v in ratios.items() if v is not None][:4]
    return {
        "per_step_s": per_step,
        "images_per_s_clean": images_per_s,
        "warmup_s": warmup,
        "compile_warmup_s": warmup.get("vanilla_compile"),
        "ratios": ratios,
        **extra,
        "skipped_cases": skipped,
        "case_errors": errors,
        "summary": ", ".join(shown)
        + (f"; {len(skipped)} cases skipped for time" if skipped else "")
        + (f"; {len(errors)} cases FAILED: {', '.join(errors)}" if errors else ""),
    }


def _streamed(check: Check, tmp: Path, base: list[str], steps: int) -> dict[str, Any]:
    """A streamed JPEG tree: loader images/s with workers vs device decoding, against the step's images/s."""
    root = _jpeg_tree(check, tmp)
    streamed = [o for o in base if not o.startswith(("data.name", "data.synthetic", "data.num_workers"))]
    streamed += ["data.name=imagefolder", f"data.root={root}", "data.preload=false", "data.augment=imagenet",
                 "data.image_size=32", f"data.num_workers={0 if check.dry_run else min(8, os.cpu_count() or 1)}",
                 "data.test_limit=16"]  # fmt: skip
    if not check.dry_run:
        streamed.append("data.train_limit=20000")
    out: dict[str, Any] = {"tree": str(root)}
    for decode in ("workers", "device"):
        stepper = Stepper("vanilla", [*streamed, f"data.decode={decode}"], tmp / f"streamed-{decode}")
        out[f"loader_images_per_s_{decode}"] = _loader_images_per_s(stepper, 3 if check.dry_run else 24)
        _, step_s = stepper.seconds_per_step(steps)
        out[f"step_images_per_s_{decode}"] = stepper.batch / step_s
    out["real_tree"] = root == check.data_root
    out["note"] = (
        "loader images/s include worker start-up; compare step_images_per_s_* with the synthetic vanilla_engine "
        "case (the same model fed from memory): below it, the GPU waits for data"
    )
    return out


# ------------------------------------------------------------------------------------------------ paper


def paper(check: Check) -> dict[str, Any]:
    """The harness on the full CIFAR-10, epochs and configs chosen to fit the remaining budget."""
    reserve = 10.0 if check.dry_run else 25.0
    budget = check.remaining() - reserve
    if check.dry_run:
        configs, epochs, scale = ["vanilla", "advprop_pgd1"], 1, "smoke"
        data: list[str] = []
    else:
        if not (check.data_root / "train").is_dir():
            return {"summary": f"skipped: no CIFAR-10 tree at {check.data_root}", "skipped": True}
        measured = (check.results["parts"].get("throughput") or {}).get("per_step_s") or {}
        step_s = measured.get("vanilla_on_device") or measured.get("vanilla_fast") or 0.05
        train_images = sum(1 for _ in (check.data_root / "train").glob("*/*"))
        epoch_s = train_images / 128 * step_s
        ratios = (check.results["parts"].get("throughput") or {}).get("ratios") or {}
        costs = dict(PAPER_CONFIGS)
        if ratios.get("advprop_over_vanilla"):
            costs["advprop_pgd1"] = costs["advtrain"] = float(ratios["advprop_over_vanilla"])
        overhead = 40.0  # process start, corruptions and PGD on 1000 images; the first run also decodes CIFAR-10 once
        configs, epochs = [], 0
        for n in range(len(PAPER_CONFIGS), 0, -1):
            chosen = list(PAPER_CONFIGS)[:n]
            cost = sum(costs[c] for c in chosen) * epoch_s
            fit = int((budget - overhead * n - 60.0) // cost) if cost > 0 else 0
            if fit >= 1:
                configs, epochs = chosen, min(fit, 30)
                break
        if not configs:
            return {"summary": f"skipped: {budget:.0f} s left is less than one vanilla epoch", "skipped": True}
        scale, data = "gpu", [f"--data-root={check.data_root}"]
    out_dir, runs_dir = check.out / "paper", check.scratch / "paper-runs"
    cmd = [
        sys.executable, str(REPO / "benchmarks" / "paper" / "run.py"), "--scale", scale, "--seeds", "0",
        "--configs", *configs, "--out", str(out_dir), "--runs-dir", str(runs_dir), *data,
        "--eval-limit", "16" if check.dry_run else "1000",
    ]  # fmt: skip
    if not check.dry_run:
        cmd += ["--override", f"trainer.epochs={epochs}"]
    stdout = ""
    try:
        code, stdout = _run_group(cmd, max(budget, 10))
        harness = f"exit {code}"
    except subprocess.TimeoutExpired:
        harness = f"killed after {budget:.0f} s (the budget)"
    report = out_dir / "results.json"
    summary_rows: dict[str, Any] = {}
    if report.is_file():
        summary_rows = {
            config: {k: v.get("mean") for k, v in stats.items()}
            for config, stats in json.loads(report.read_text()).get("summary", {}).items()
        }
    shown = ", ".join(f"{c} {100 * (v.get('clean_acc') or 0):.1f}%" for c, v in summary_rows.items())
    return {
        "command": " ".join(cmd[1:]),
        "configs": configs,
        "epochs": epochs,
        "scale_note": f"{epochs} epoch(s) of the gpu scale's 30, one seed, 1000 evaluation images: a trend, "
        "not the paper's numbers"
        if not check.dry_run
        else "dry run: the harness's smoke scale (synthetic data)",
        "harness": harness,
        "harness_output": stdout.strip().splitlines()[-12:],
        "table": summary_rows,
        "results_md": str(out_dir / "results.md"),
        "summary": f"harness {harness}; clean {shown}" if shown else f"harness {harness}",
    }


# ------------------------------------------------------------------------------------------------ output


def summary(name: str, record: dict[str, Any]) -> str:
    """One line for a part."""
    if record["status"] == "running":  # saved mid-part: the cases measured so far
        return f"interrupted while running; {len(record.get('per_step_s') or {})} cases measured"
    if record["status"] == "skipped":
        return f"skipped ({record['why']})"
    if record["status"] == "failed":
        return f"FAILED after {record['seconds']} s: {record['error']}"
    return f"{record.get('summary', 'ok')} ({record['seconds']} s)"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "-" if value is None else str(value)


def render_markdown(results: dict[str, Any]) -> str:
    """``results.md``: what ran, on what, and every figure, one section per part."""
    lines = [
        "# GPU check" + (" (dry run on the CPU, toy sizes: not measurements)" if results["dry_run"] else ""),
        "",
        f"- Command: `{results['command']}`",
        f"- Date: {results['date']}; device: {results['device']}; budget {results['budget_s']} s, "
        f"elapsed {results.get('elapsed_s', 0)} s",
        "",
    ]
    for name in PARTS:
        record = results["parts"].get(name)
        if record is None:
            continue
        lines += [f"## {name}: {record['status']}", "", f"{summary(name, record)}", ""]
        if record["status"] != "ok":
            continue
        if name == "environment":
            lines += [f"- {k}: {_fmt(v)}" for k, v in record.items() if k not in ("status", "summary")] + [""]
        elif name == "tests":
            lines += [f"- command: `{record['command']}`"] + [f"- failed: `{f}`" for f in record["failures"]] + [""]
        elif name == "throughput":
            lines += ["| case | s / step | clean images / s | warm-up s |", "|---|---:|---:|---:|"]
            speed, warm = record["images_per_s_clean"], record["warmup_s"]
            lines += [
                f"| {case} | {_fmt(s)} | {_fmt(speed[case])} | {_fmt(warm[case])} |"
                for case, s in record["per_step_s"].items()
            ]
            lines += ["", "Ratios of seconds per step, first case over second (below 1: the first is faster).", ""]
            lines += ["| ratio | value |", "|---|---:|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in record["ratios"].items()]
            lines += ["", f"- host syncs per step, AdvProp: {_fmt(record.get('host_syncs_per_step_advprop_fast'))}, "
                      f"vanilla on device: {_fmt(record.get('host_syncs_per_step_vanilla_on_device'))}"]  # fmt: skip
            streamed = record.get("streamed") or {}
            lines += [f"- streamed {k}: {_fmt(v)}" for k, v in streamed.items()]
            if record.get("skipped_cases"):
                lines.append(f"- not measured (time): {', '.join(record['skipped_cases'])}")
            lines += [f"- FAILED {case}: {error}" for case, error in (record.get("case_errors") or {}).items()]
            lines.append("")
        elif name == "paper":
            if record.get("skipped"):
                continue
            lines += [f"- {record['scale_note']}", f"- command: `{record['command']}`", ""]
            table = record.get("table") or {}
            if table:
                metrics = list(next(iter(table.values())))
                lines += ["| config | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
                lines += [
                    f"| {c} | " + " | ".join(_fmt(row.get(m)) for m in metrics) + " |" for c, row in table.items()
                ]
                lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the selected parts; 0 when every part that ran finished (failures are recorded, exit 1)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="results.json / results.md go here")
    parser.add_argument("--dry-run", action="store_true", help="every part on the CPU at toy sizes (minutes)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="never run past this many seconds")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--data-root", type=Path, help="CIFAR-10 ImageFolder tree (default: ../shared or ./shared)")
    args = parser.parse_args(argv)
    if args.data_root is None:  # a device machine gets the checkout (with shared/ inside it), not its parent
        found = [p / "datasets" / "cifar10" for p in (REPO.parent / "shared", REPO / "shared")]
        args.data_root = next((p for p in found if (p / "train").is_dir()), found[0])
    if args.budget_s <= 0:
        parser.error(f"--budget-s: expected a positive number of seconds, got {args.budget_s}")
    global STARTED
    started, STARTED = (STARTED if STARTED is not None else time.monotonic()), None  # a later call counts anew
    check = Check(args.out, args.budget_s, args.dry_run, args.data_root.resolve(), started)
    if not args.dry_run and check.device.type != "cuda":
        print("gpu_check: no CUDA device: running on the CPU (use --dry-run for toy sizes)", flush=True)
    parts: dict[str, Callable[[Check], dict[str, Any]]] = {
        "environment": environment, "tests": tests, "throughput": throughput, "paper": paper,
    }  # fmt: skip
    for name in PARTS:
        if name in args.parts:
            check.run(name, parts[name])
    print(f"gpu_check: wrote {args.out / 'results.md'} ({check.results['elapsed_s']} s)", flush=True)
    return 1 if any(r["status"] == "failed" for r in check.results["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
