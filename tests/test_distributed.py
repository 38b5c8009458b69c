"""torchrun with 2 gloo processes on CPU: one run, sharded epochs, per-rank randomness, exact resume, joint stops."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mbn.checkpoint import load_checkpoint
from mbn.cli.train import main as train_main
from mbn.config import RecipeError, load_recipe
from mbn.convert import convert_sync_batchnorm
from mbn.csvlog import read_scalars
from mbn.norm import MultiSourceBatchNorm
from mbn.plan import plan_run
from tests.nets import bn_free_classifier
from tests.runs import TINY

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("dist_worker.py")
# 64 images, 8 per rank and step: 4 steps per epoch, 2 epochs; AdvProp so that every step attacks
SETTINGS = [*TINY, "data.batch_size=8", "trainer.epochs=2", "logging.image_every=0", "logging.divergence_every=0"]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def torchrun_command(*args: str, record: Path | None = None, env: dict[str, str] | None = None):
    """The command line and environment of ``torchrun --standalone --nproc_per_node=2 tests/dist_worker.py ARGS``."""
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    if record is not None:
        record.mkdir(parents=True, exist_ok=True)
        environ["MBN_TEST_RECORD"] = str(record)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), *args]
    return cmd, environ


def default_stop_signals() -> None:
    """``preexec_fn`` of a torchrun a test signals: SIGINT/SIGTERM/SIGHUP at their defaults, not the caller's
    (``nohup``, a background runner: SIG_IGN is inherited through exec, and mbn keeps an ignored signal ignored)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def torchrun(*args: str, record: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run :func:`torchrun_command` to the end; its completed process."""
    cmd, environ = torchrun_command(*args, record=record, env=env)
    return subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=240, cwd=REPO)


def records(path: Path) -> list[dict]:
    return [torch.load(path / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One uninterrupted 2-process AdvProp run: (run dir, per-rank records, completed process)."""
    tmp = tmp_path_factory.mktemp("ddp")
    run = tmp / "run"
    proc = torchrun(str(REPO / "recipes" / "advprop.yaml"), *SETTINGS, f"trainer.out_dir={run}", record=tmp / "rec")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, records(tmp / "rec"), proc


@pytest.mark.slow
def test_one_run_directory_written_once(two_ranks):
    run, _, proc = two_ranks
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["steps"] == 8  # 2 epochs x 64 / (8 x 2)
    assert metrics["images_seen"] == {"clean": 128, "adv": 128}  # both ranks' images
    assert proc.stdout.count("mbn-train: done") == 1  # rank 0 reports; the other rank is silent
    names = sorted(p.name for p in run.iterdir())
    assert names == [".lock", "checkpoints", "config.yaml", "metrics.json", "scalars.csv", "tb"]
    csv_steps = [step for step, tag, _ in read_scalars(run / "scalars.csv") if tag == "loss/clean"]
    assert csv_steps == list(range(1, 9))  # written by rank 0 alone
    from tests.runs import tensorboard_scalars

    assert len(list((run / "tb").glob("events.out.tfevents*"))) == 1  # one writer: rank 0's
    assert len(list((run / "tb" / "domain=clean").glob("events.out.tfevents*"))) == 1
    steps = [step for step, _ in tensorboard_scalars(run / "tb")["loss/clean"]]
    assert steps == list(range(1, 9))  # each logging step once
    assert load_checkpoint(run / "checkpoints" / "last.pt")["world_size"] == 2


@pytest.mark.slow
def test_ranks_hold_identical_weights(two_ranks):
    run, (r0, r1), _ = two_ranks
    params = [k for k in r0["model"] if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert params
    for key in params:
        torch.testing.assert_close(r0["model"][key], r1["model"][key], rtol=0, atol=0)
    saved = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    for key, value in r0["model"].items():
        torch.testing.assert_close(saved[key], value, rtol=0, atol=0)


@pytest.mark.slow
def test_every_sample_once_per_epoch_across_ranks(two_ranks):
    _, (r0, r1), _ = two_ranks
    for epoch in (0, 1):
        a, b = r0["indices"][epoch], r1["indices"][epoch]
        assert len(a) == len(b) == 32
        assert not set(a) & set(b)
        assert sorted(a + b) == list(range(64))
    assert r0["indices"][0] != r0["indices"][1]  # a new order every epoch


@pytest.mark.slow
def test_ranks_draw_their_own_randomness(two_ranks):
    _, (r0, r1), _ = two_ranks
    assert set(r0["seeds"]) == set(r1["seeds"]) == set(range(8))
    assert all(r0["seeds"][s] != r1["seeds"][s] for s in r0["seeds"])
    assert len(set(r0["seeds"].values()) | set(r1["seeds"].values())) == 16
    assert all(r0["adv"][s] != r1["adv"][s] for s in r0["adv"])


def test_rank0_draws_what_a_single_process_draws(two_ranks):
    from mbn.train.runtime import step_seed

    _, (r0, _), _ = two_ranks
    assert all(r0["seeds"][s] == step_seed(0, s) for s in r0["seeds"])


@pytest.mark.slow
def test_resume_under_torchrun_is_bit_identical(two_ranks, tmp_path):
    full, _, _ = two_ranks
    run = tmp_path / "run"
    first = torchrun(str(REPO / "recipes" / "advprop.yaml"), *SETTINGS, f"trainer.out_dir={run}", "trainer.max_steps=6")
    assert first.returncode == 0, first.stderr[-3000:]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"] == 6  # mid-epoch 1
    second = torchrun("--resume", str(run), "trainer.max_steps=null")
    assert second.returncode == 0, second.stderr[-3000:]
    resumed, expected = (load_checkpoint(r / "checkpoints" / "last.pt") for r in (run, full))
    assert resumed["state"]["step"] == expected["state"]["step"] == 8
    for key, value in expected["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    for a, b in zip(resumed["optimizer"]["state"].values(), expected["optimizer"]["state"].values(), strict=True):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


@pytest.mark.slow
def test_resume_with_another_world_size_is_refused(two_ranks, tmp_path, capsys):
    run, _, _ = two_ranks
    before = (run / "checkpoints" / "last.pt").read_bytes()
    assert train_main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "number of processes the run was trained with: 2" in err and "not 1" in err
    assert (run / "checkpoints" / "last.pt").read_bytes() == before


@pytest.mark.slow
def test_nan_on_one_rank_stops_both_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = torchrun(
        str(REPO / "recipes" / "advprop.yaml"),
        *SETTINGS,
        f"trainer.out_dir={run}",
        "trainer.log_every=3",  # the NaN of step 6 (0-based 5, rank 1 only) is found at the logging step 6
        env={"MBN_TEST_NAN_RANK": "1", "MBN_TEST_NAN_STEP": "5"},
    )
    assert proc.returncode != 0
    # both ranks stop on the same finding, naming the domain
    assert proc.stderr.count("non-finite loss in domain 'clean' at step 6; last good checkpoint (step 4)") == 2, (
        proc.stderr[-3000:]
    )
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["state"]["step"] == 4  # the end of epoch 0, before the NaN
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_with_a_checkpoint(tmp_path):
    run, rec = tmp_path / "run", tmp_path / "rec"
    cmd, environ = torchrun_command(
        str(REPO / "recipes" / "advprop.yaml"), *SETTINGS, f"trainer.out_dir={run}", "trainer.epochs=1000", record=rec
    )
    proc = subprocess.Popen(cmd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            preexec_fn=default_stop_signals)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "last.pt").exists() or not (rec / "rank1.pid").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "training did not reach its first checkpoint"
            time.sleep(0.2)
        rank1 = int((rec / "rank1.pid").read_text())
        os.kill(rank1, signal.SIGTERM)  # rank 1 alone ...
        # ... and again while it stops, as a SLURM preemption reaching it directly and through torchrun: no repeat,
        # whenever it lands (during the step, the checkpoint or the exit), turns the stop into an abort
        repeats = time.monotonic() + 3
        while proc.poll() is None and time.monotonic() < repeats:
            time.sleep(0.02)
            with contextlib.suppress(ProcessLookupError):
                os.kill(rank1, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert err.count("SIGTERM at step") == 2, err[-3000:]  # both ranks stopped on rank 1's signal, after one step
    assert "aborted" not in err, err[-3000:]
    step = load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"]
    assert f"SIGTERM at step {step}; checkpoint saved, resume with: torchrun --standalone --nproc_per_node=2 " in err
    resumed = torchrun("--resume", str(run), f"trainer.max_steps={step + 2}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"] == step + 2


@pytest.mark.slow
def test_a_failed_save_after_a_signal_stops_every_rank_with_one_line(tmp_path):
    """Rank 0 cannot write the stop checkpoint: every rank says so in one line and exits."""
    run, rec = tmp_path / "run", tmp_path / "rec"
    cmd, environ = torchrun_command(
        str(REPO / "recipes" / "advprop.yaml"), *SETTINGS, f"trainer.out_dir={run}", "trainer.epochs=1000",
        record=rec, env={"MBN_TEST_FAIL_STOP_SAVE": "1"},
    )  # fmt: skip
    proc = subprocess.Popen(cmd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            preexec_fn=default_stop_signals)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "last.pt").exists() or not (rec / "rank1.pid").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "training did not reach its first checkpoint"
            time.sleep(0.2)
        saved = (run / "checkpoints" / "last.pt").read_bytes()
        os.kill(int((rec / "rank1.pid").read_text()), signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    lines = [line for line in err.splitlines() if line.startswith("mbn-train[rank")]
    own = "mbn-train[rank 0]: error: checkpoints/last.pt: cannot write (no space left on device)"
    assert own in lines, err[-3000:]
    other = "mbn-train[rank 1]: error: rank 0 could not save the checkpoint: checkpoints/last.pt: cannot write"
    assert any(line.startswith(other) for line in lines), err[-3000:]
    assert (run / "checkpoints" / "last.pt").read_bytes() == saved  # the last good checkpoint is kept


# An attacked domain that, after half of training, only feeds another domain: its BN's parameters get reused attack
# gradients but no gradient from the training forward (DDP leaves such parameters alone).
ATTACK_ONLY_BN = ["domains.adv.type=pgd", "domains.adv.bn=aux", "domains.adv.reuse_grad=0.5", "domains.adv.eps=1",
                  "domains.adv.steps=1", "domains.adv.step_size=1", "domains.adv.targeted=false", "domains.adv.end=0.5",
                  "domains.rot.type=rotation", "domains.rot.input=adv", "domains.rot.bn=clean"]  # fmt: skip


@pytest.mark.parametrize(
    ("recipe", "extra"),
    [
        ("fast_advprop", []),
        ("vanilla", ATTACK_ONLY_BN),
        ("fast_advprop", ["optim.grad_accum_steps=2", "ema.decay=0.9"]),
    ],
    ids=["fast_advprop", "attack-only-bn", "accumulation-ema"],
)
@pytest.mark.slow
def test_gradient_reuse_is_averaged_over_ranks(tmp_path, recipe, extra):
    """Fast AdvProp's reused attack gradients are averaged over the ranks, also where no training forward reaches."""
    run = tmp_path / "run"
    proc = torchrun(
        str(REPO / "recipes" / f"{recipe}.yaml"),
        *SETTINGS,
        f"trainer.out_dir={run}",
        "trainer.max_steps=6",
        *extra,
        record=tmp_path / "rec",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = records(tmp_path / "rec")
    for key, value in r0["model"].items():
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            torch.testing.assert_close(r1["model"][key], value, rtol=0, atol=0)


@pytest.mark.slow
def test_two_ranks_equal_one_process_on_their_combined_batch(tmp_path):
    """DDP averages the ranks' gradients: on a BN-free model 2 x 8 images per step train as one process's 16."""
    settings = [*SETTINGS, "trainer.max_steps=3", "optim.weight_decay=0.01"]
    proc = torchrun(str(REPO / "recipes" / "vanilla.yaml"), *settings, f"trainer.out_dir={tmp_path / 'ddp'}",
                    env={"MBN_TEST_BN_FREE": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("mbn.builders.create_model", bn_free_classifier)
        single = [*settings, "data.batch_size=16", f"trainer.out_dir={tmp_path / 'one'}"]
        assert train_main([str(REPO / "recipes" / "vanilla.yaml"), *single]) == 0
    ddp, one = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt")["model"] for r in ("ddp", "one"))
    assert not torch.equal(ddp["net.fc.weight"], bn_free_classifier(None, 10, [0.5] * 3, [0.5] * 3).net.fc.weight)
    torch.testing.assert_close(ddp, one, rtol=1e-5, atol=1e-6)


def test_sync_bn_gives_every_source_its_own_syncbn():
    import torchvision

    from mbn.convert import convert_model

    model = convert_model(torchvision.models.resnet18(num_classes=10), sources=("clean", "adv"))
    plain = [m for m in model.modules() if isinstance(m, MultiSourceBatchNorm)]
    x = torch.rand(4, 3, 32, 32)
    expected = model(x)
    synced = convert_sync_batchnorm(model)
    norms = [m for m in synced.modules() if isinstance(m, MultiSourceBatchNorm)]
    assert len(norms) == len(plain) > 0
    assert all(isinstance(bn, torch.nn.SyncBatchNorm) for m in norms for bn in m.bns.values())
    assert all(m.bns["clean"] is not m.bns["adv"] for m in norms)
    torch.testing.assert_close(synced(x), expected)  # one process: plain BN statistics


def test_sync_bn_on_cpu_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_recipe(REPO / "recipes" / "advprop.yaml", [*TINY, "trainer.device=cpu", "trainer.sync_bn=true"])
    with pytest.raises(RecipeError, match=r"key .trainer\.sync_bn.: SyncBatchNorm needs CUDA"):
        plan_run(cfg)


@pytest.mark.parametrize(
    ("world", "local", "expected"),
    [
        ("1", None, "mbn-train --resume RUN"),
        ("2", "2", "torchrun --standalone --nproc_per_node=2 -m mbn.cli.train --resume RUN"),
        ("16", "8", "torchrun --nnodes=2 ... --nproc_per_node=8 -m mbn.cli.train --resume RUN"),
    ],
)
def test_the_resume_hint_names_the_run_s_launch(monkeypatch, world, local, expected):
    from mbn.distributed import resume_command

    monkeypatch.setenv("WORLD_SIZE", world)
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    assert resume_command("RUN") == expected


@pytest.mark.parametrize(
    ("recipe", "extra", "unused"),
    [
        ("vanilla", [], False),
        ("advprop", [], False),  # both BNs trained every step: DDP skips its search for unused parameters
        ("advprop_ssl", [], False),  # the rotation head scored every step
        ("vanilla", ATTACK_ONLY_BN, True),  # a BN only an attack reaches after half of training
        ("adv_finetune", [], True),  # domain windows
        ("ssl_pretrain", [], True),  # no domain scored by the classifier
        ("advprop", ["trainer.find_unused_parameters=true"], True),
        ("vanilla", ["trainer.find_unused_parameters=false", *ATTACK_ONLY_BN], False),  # the user's call
    ],
)
def test_ddp_searches_for_unused_parameters_only_where_some_can_be(tmp_path, recipe, extra, unused):
    from mbn.plan import plan_run
    from mbn.train.build import may_leave_parameters_unused

    cfg = load_recipe(REPO / "recipes" / f"{recipe}.yaml", [*SETTINGS, *extra])
    plan = plan_run(cfg)
    assert may_leave_parameters_unused(cfg, plan.specs, plan.heads, plan.objectives) is unused


@pytest.mark.slow
def test_parameters_without_gradient_under_a_forced_false_are_named_in_one_line(tmp_path):
    proc = torchrun(
        str(REPO / "recipes" / "vanilla.yaml"), *SETTINGS, *ATTACK_ONLY_BN, f"trainer.out_dir={tmp_path / 'run'}",
        "trainer.find_unused_parameters=false",
    )  # fmt: skip
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mbn-train[rank")]
    assert errors, proc.stderr[-3000:]
    for line in errors:  # one line per rank (torchrun's agent adds its own report after them)
        assert "some model parameters got no gradient in the last step" in line, line
        assert line.endswith("set trainer.find_unused_parameters=true"), line


@pytest.mark.slow
def test_a_trainer_built_from_a_script_under_torchrun_trains_with_ddp(tmp_path):
    """``build_trainer`` joins the process group torchrun describes: no module global the CLI alone sets."""
    cmd, environ = torchrun_command()
    cmd[-1] = str(Path(__file__).with_name("script_worker.py"))
    run = tmp_path / "run"
    cmd += [str(REPO / "recipes" / "advprop.yaml"), str(run), *SETTINGS, "trainer.epochs=1"]
    proc = subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 of 2: ddp=True" in proc.stdout and "rank 1 of 2: ddp=True" in proc.stdout, proc.stdout
    assert "rank 0: steps=4 world_size=2" in proc.stdout  # 64 images, 8 per rank and step
    assert json.loads((run / "metrics.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_ranks_resolving_the_recipe_otherwise_are_refused_on_every_rank(tmp_path):
    run = tmp_path / "run"
    proc = torchrun(str(REPO / "recipes" / "vanilla.yaml"), *SETTINGS, f"trainer.out_dir={run}",
                    "trainer.seed=${oc.env:RANK}")  # fmt: skip
    assert proc.returncode != 0
    # every rank gives the same line, so whichever the agent lets print names the key
    line = "]: error: key 'trainer.seed': 0 on rank 0, 1 on rank 1; every rank must resolve the recipe alike"
    assert line in proc.stderr, proc.stderr[-3000:]
    assert not (run / "checkpoints").exists()


@pytest.mark.slow
def test_a_second_job_on_a_running_run_is_refused_and_ranks_stop_when_their_agent_is_killed(tmp_path):
    run = tmp_path / "run"
    cmd, environ = torchrun_command(str(REPO / "recipes" / "vanilla.yaml"), *SETTINGS, f"trainer.out_dir={run}",
                                    "trainer.epochs=500", "trainer.checkpoint_every_steps=2")  # fmt: skip
    first = subprocess.Popen(cmd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                             start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not (run / "checkpoints" / "last.pt").exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first job did not start training"
            time.sleep(0.5)
        second = torchrun("--resume", str(run))
        assert second.returncode != 0
        assert "]: error: " in second.stderr and "is in use by another training process" in second.stderr, (
            second.stderr[-3000:]
        )
        os.kill(first.pid, signal.SIGKILL)  # the agent alone: its ranks get no signal
        _, err = first.communicate(timeout=180)  # the pipes close when both ranks have exited
        assert err.count("the torchrun agent (pid") == 2 and "is gone at step" in err, err[-3000:]
        step = load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"]
        third = torchrun("--resume", str(run), f"trainer.max_steps={step + 2}")  # the lock is free again
        assert third.returncode == 0, third.stderr[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
