"""Kill training runs at random points (SIGKILL and SIGTERM) and check every resumed run is bit-identical.

    python benchmarks/fault_injection.py --trials 20

One reference run trains uninterrupted. Each trial starts the same run in a fresh directory, kills it after
a random delay (see :func:`run_trial`) with SIGKILL or SIGTERM (chosen at random), resumes it with
``mbn-train --resume`` and kills it again, up to ``--kills`` times, then lets it finish. A kill that lands
before the first checkpoint leaves nothing to resume: as docs/reliability.md says, that directory is deleted
and the run started again. Every finished trial's ``last.pt`` must equal the reference's bit for bit
(weights, BN statistics of every source, optimiser, scheduler and scaler state, position). Results go to
``benchmarks/results/<--name>.json``.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, write_json
from mbn.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
# AdvProp (two BN sources, a PGD attack drawing from the step generator), 6 epochs of 4 steps, a checkpoint
# every 2 steps so kills land both between and inside epochs, two DataLoader workers.
RECIPE = [str(REPO / "recipes" / "advprop.yaml"), "data.name=synthetic", "data.synthetic_train_size=64",
          "data.synthetic_test_size=32", "data.batch_size=16", "data.num_workers=2", "model.name=cifar_resnet8",
          "model.width=8", "trainer.epochs=6", "trainer.checkpoint_every_steps=2", "trainer.progress=none",
          "domains.adv.steps=1", "logging.image_every=4", "logging.divergence_every=4"]  # fmt: skip


def launch(run: Path, resume: bool) -> subprocess.Popen[bytes]:
    """Start ``mbn-train`` (fresh or ``--resume``) in a subprocess."""
    args = ["--resume", str(run)] if resume else [*RECIPE, f"trainer.out_dir={run}"]
    cmd = [sys.executable, "-m", "mbn.cli.train", *args]
    # a session of its own: signals go to the whole process group (trainer and DataLoader workers), as from SLURM
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def final_state(run: Path) -> dict[str, Any]:
    """What must match bit for bit: model, optimiser, scheduler, scaler and position."""
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    return {k: ckpt[k] for k in ("model", "optimizer", "scheduler", "scaler", "state")}


def identical(a: Any, b: Any) -> bool:
    """Exact equality of nested checkpoint structures (tensors compared with ``torch.equal``)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def wait_started(run: Path, proc: subprocess.Popen[bytes], timeout: float = 300) -> float:
    """Seconds until ``proc`` holds the run directory's lock (imports done, about to build data and model)."""
    tic = time.perf_counter()
    while time.perf_counter() - tic < timeout and proc.poll() is None:
        try:
            if f"pid {proc.pid} " in (run / ".lock").read_text():
                break
        except OSError:
            pass
        time.sleep(0.01)
    return time.perf_counter() - tic


def run_trial(run: Path, rng: random.Random, span: float, kills: int, log: dict[str, int]) -> None:
    """Start, kill ``kills`` times at random points (resuming in between), then run to the end.

    A quarter of the kills land anywhere from process start (imports, recipe loading); the rest land within
    ``span`` seconds after the process took the run directory's lock (data, model, training, checkpoints).
    """
    resume = False
    for _ in range(kills):
        proc = launch(run, resume)
        if rng.random() < 0.25:
            time.sleep(rng.uniform(0.0, 5.0))
        else:
            wait_started(run, proc)
            time.sleep(rng.uniform(0.0, span))
        sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            log[f"kills_{sig.name}"] += 1
        code = proc.wait()
        log[f"exit_{code}"] = log.get(f"exit_{code}", 0) + 1  # 143/129: saved on SIGTERM; -9: killed
        if (run / "checkpoints" / "last.pt").is_file():
            resume = True
        else:  # killed before the first checkpoint: nothing to resume, start again (docs/reliability.md)
            log["restarts_before_first_checkpoint"] += 1
            shutil.rmtree(run, ignore_errors=True)
            resume = False
    proc = launch(run, resume)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"final run failed ({proc.returncode}): {err.decode()[-2000:]}")
    log["resumes"] += int(resume)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--kills", type=int, default=3, help="kills per trial before it may finish")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="fault_injection", help="results file name under benchmarks/results")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    log = {"kills_SIGKILL": 0, "kills_SIGTERM": 0, "restarts_before_first_checkpoint": 0, "resumes": 0}
    with tempfile.TemporaryDirectory() as tmp:
        tic = time.perf_counter()
        ref = Path(tmp) / "ref"
        proc = launch(ref, resume=False)
        startup = wait_started(ref, proc)
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"reference run failed: {err.decode()[-2000:]}")
        ref_wall = time.perf_counter() - tic
        span = ref_wall - startup
        reference = final_state(ref)
        mismatches = []
        for trial in range(args.trials):
            run = Path(tmp) / f"trial{trial}"
            run_trial(run, rng, span, args.kills, log)
            same = identical(final_state(run), reference)
            print(f"trial {trial + 1}/{args.trials}: {'bit-identical' if same else 'MISMATCH'}", flush=True)
            if not same:
                mismatches.append(trial)
            shutil.rmtree(run, ignore_errors=True)
    result = {
        "machine": machine_info(torch.device("cpu")),
        "setup": {
            "recipe": RECIPE,
            "trials": args.trials,
            "kills_per_trial": args.kills,
            "seed": args.seed,
            "reference_wall_s": round(ref_wall, 2),
            "delay": f"1/4: uniform(0, 5 s) from launch; 3/4: uniform(0, {span:.1f} s) after the lock is taken",
        },
        "outcome": {**log, "mismatched_trials": mismatches, "bit_identical": args.trials - len(mismatches)},
    }
    path = write_json(args.name, result)
    same = args.trials - len(mismatches)
    print(f"{same}/{args.trials} trials bit-identical ({log}); {path}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
