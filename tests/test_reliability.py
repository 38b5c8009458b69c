"""No run is lost or silently wrong: resume rules, signals, the run-directory lock, full disks, bad data and plugins.

Each test reproduces a defect class as a user hits it (the CLI, or a subprocess where signals and locks are
involved) and checks the one-line error and that nothing already written was damaged.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import mbn
from mbn.checkpoint import load_checkpoint
from mbn.cli.eval import main as eval_main
from mbn.cli.train import main as train_main
from mbn.fileio import WriteError, atomic_torch_save, atomic_write_text
from mbn.rundir import RunLock
from mbn.tblog import TensorBoardLogger
from tests.runs import REPO, TINY, VANILLA, one_line_error, train, weights


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------- resume rules
@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["trainer.epochs=30", "trainer.max_steps=90", "data.batch_size=8"], "data.batch_size (16 -> 8)"),
        (["trainer.seed=1"], "trainer.seed (0 -> 1)"),
        (["optim.momentum=0.5"], "optim.momentum"),
        (["domains.clean.weight=2"], "domains.clean.weight"),
        (["model.width=16"], "model.width"),
    ],
)
def test_resume_override_that_changes_training_is_refused_and_run_stays_resumable(overrides, named, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(VANILLA, run, "trainer.max_steps=6", "trainer.checkpoint_every_steps=1") == 0  # stopped mid-epoch
    config, ckpt = (run / "config.yaml").read_bytes(), (run / "checkpoints" / "last.pt").read_bytes()
    capsys.readouterr()
    assert train_main(["--resume", str(run), *overrides]) == 2
    err = one_line_error(capsys)
    assert named in err and "changes what was trained" in err, err
    assert (run / "config.yaml").read_bytes() == config
    assert (run / "checkpoints" / "last.pt").read_bytes() == ckpt
    assert train_main(["--resume", str(run), "trainer.max_steps=8", "logging.image_every=0"]) == 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"] == 8
    assert "max_steps: 8" in (run / "config.yaml").read_text()


def test_resume_of_finished_run_keeps_metrics(tmp_path):
    run = tmp_path / "run"
    assert train(VANILLA, run, "trainer.epochs=1") == 0
    before = json.loads((run / "metrics.json").read_text())
    assert train_main(["--resume", str(run)]) == 0
    after = json.loads((run / "metrics.json").read_text())
    assert after["train"] == before["train"] and after["train"]["clean"]["loss"] is not None
    assert after["train_time_s"] == pytest.approx(before["train_time_s"])
    assert after["wall_time_s"] == pytest.approx(before["wall_time_s"], abs=0.2) and after["wall_time_s"] > 0
    assert after["test_acc"] == before["test_acc"]


def test_resuming_a_finished_run_with_a_shorter_recipe_changes_nothing(tmp_path, capsys):
    """A resume that trains nothing leaves config.yaml alone: a later resume with more epochs trains them."""
    run = tmp_path / "run"
    assert train(VANILLA, run, "trainer.epochs=1") == 0
    files = {name: (run / name).read_bytes() for name in ("config.yaml", "metrics.json", "checkpoints/last.pt")}
    capsys.readouterr()
    assert train_main(["--resume", str(run), "trainer.max_steps=2"]) == 0
    out = capsys.readouterr().out
    assert "nothing to train: the run is at step 4 (epoch 1) and this recipe stops at 2 steps" in out, out
    assert {name: (run / name).read_bytes() for name in files} == files
    assert train_main(["--resume", str(run), "trainer.epochs=2"]) == 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"] == 8
    assert "max_steps: null" in (run / "config.yaml").read_text()


def test_train_time_accumulates_over_resume(tmp_path):
    run = tmp_path / "run"
    assert train(VANILLA, run, "trainer.max_steps=4") == 0
    first = json.loads((run / "metrics.json").read_text())["train_time_s"]
    assert train_main(["--resume", str(run), "trainer.max_steps=8"]) == 0
    assert json.loads((run / "metrics.json").read_text())["train_time_s"] > first


# ---------------------------------------------------------------------------------------- signals
_PYTHON_DEFAULTS = {
    signal.SIGINT: signal.default_int_handler,
    signal.SIGTERM: signal.SIG_DFL,
    signal.SIGHUP: signal.SIG_DFL,
}


@pytest.fixture
def default_stop_signals() -> Iterator[None]:
    """The stop signals as a terminal's Python has them, whatever the caller's: under ``nohup`` or a background
    runner SIGHUP/SIGINT arrive ignored (SIG_IGN is inherited through exec), mbn rightly keeps an ignored signal
    ignored, and the signal a test sends itself would be dropped."""
    previous = {sig: signal.signal(sig, handler) for sig, handler in _PYTHON_DEFAULTS.items()}
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def default_stop_signals_in_child() -> None:
    """``preexec_fn`` of a child a test signals: the stop signals' default dispositions (``restore_signals`` covers
    only SIGPIPE/SIGXFZ/SIGXFSZ), so an ignored SIGINT/SIGTERM/SIGHUP of the caller does not reach the child."""
    for sig in _PYTHON_DEFAULTS:
        signal.signal(sig, signal.SIG_DFL)  # a Python child installs its own SIGINT handler over SIG_DFL


@pytest.fixture
def signal_domains(scratch_registry, default_stop_signals):
    @mbn.register_domain("signal_at_test")
    class SignalAt(mbn.Domain):
        def __init__(self, at: int = 2, signum: int = int(signal.SIGHUP)) -> None:
            self.at, self.signum = at, signum

        def generate(self, images, labels, ctx):
            if ctx.step == self.at:
                os.kill(os.getpid(), self.signum)
            return images, labels


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
@pytest.mark.slow
def test_stop_signal_saves_checkpoint_and_resume_is_bit_identical(signum, tmp_path, capsys, signal_domains):
    stop = ["domains.stop.type=signal_at_test", "domains.stop.at=2", f"domains.stop.signum={int(signum)}"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert train(VANILLA, ref, *stop, "domains.stop.at=-1", "trainer.max_steps=6") == 0
    capsys.readouterr()
    assert train(VANILLA, run, *stop, "trainer.max_steps=6") == 128 + int(signum)
    err = capsys.readouterr().err
    assert f"{signum.name} at step 3; checkpoint saved, resume with: mbn-train --resume {run}" in err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"] == 3
    assert train_main(["--resume", str(run)]) == 0
    assert_same_weights(weights(run), {k: v for k, v in weights(ref).items()})


def _start_training(run: Path, *extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "mbn.cli.train", str(VANILLA), *TINY, f"trainer.out_dir={run}",
           "trainer.progress=plain", "logging.image_every=0", "logging.divergence_every=0", *extra]  # fmt: skip
    # its own session: a scheduler signals the whole process group (the DataLoader workers too)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=default_stop_signals_in_child)  # fmt: skip


def _wait_for_step(proc: subprocess.Popen[str], step: int, timeout: float = 120) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        if f"step {step}:" in line:
            return
        assert time.monotonic() < deadline, "training did not reach the step in time"
    raise AssertionError(f"training ended before step {step}: {proc.stderr.read() if proc.stderr else ''}")


@pytest.mark.slow
def test_sigterm_subprocess_locked_directory_and_bit_identical_resume(tmp_path, capsys):
    """SLURM's preemption: SIGTERM to the job's process group (trainer and DataLoader workers) mid-run saves and
    the run resumes at once (no stale lock) bit-identically; a second run on the locked directory is refused."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    long = ["trainer.epochs=400", "trainer.eval_every=0"]
    proc = _start_training(run, *long, "data.num_workers=2")
    try:
        _wait_for_step(proc, 3)
        for args in ([str(VANILLA), *TINY, f"trainer.out_dir={run}"], ["--resume", str(run)]):
            assert train_main(args) == 2
            err = one_line_error(capsys)
            assert f"{run} is in use by another training process (pid {proc.pid}" in err, err
        os.killpg(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "SIGTERM at step" in stderr and "checkpoint saved" in stderr
    stopped = load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"]
    assert 3 <= stopped < 1600
    end = f"trainer.max_steps={stopped + 2}"
    assert train_main(["--resume", str(run), end]) == 0
    assert train(VANILLA, ref, *long, "trainer.progress=plain", "logging.image_every=0",
                 "logging.divergence_every=0", end) == 0  # fmt: skip
    assert_same_weights(weights(run), weights(ref))


# ---------------------------------------------------------------------------------- run directory
def test_lock_in_process_refuses_second_trainer(tmp_path, capsys):
    run = tmp_path / "run"
    with RunLock(run):
        assert train(VANILLA, run, "trainer.max_steps=1") == 2
        assert "is in use by another training process" in one_line_error(capsys)
    assert train(VANILLA, run, "trainer.max_steps=1") == 0  # released


@pytest.mark.parametrize("leftover", ["config.yaml", "tb", "metrics.json", "scalars.csv"])
def test_half_written_run_directory_is_not_overwritten(leftover, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / leftover).mkdir() if leftover == "tb" else (run / leftover).write_text("x: 1\n")
    assert train(VANILLA, run, "trainer.max_steps=1") == 2
    assert "holds an unfinished run with no checkpoint" in one_line_error(capsys)
    assert [p.name for p in run.iterdir()] == [leftover]  # untouched; the refused run's lock file removed again


def test_stale_temporary_files_are_removed_on_resume(tmp_path):
    run = tmp_path / "run"
    assert train(VANILLA, run, "trainer.max_steps=2") == 0
    stale = [run / "checkpoints" / ".last.pt.k9x.tmp", run / ".config.yaml.abc.tmp", run / ".scalars.csv.q1w.tmp"]
    for path in stale:
        path.write_bytes(b"partial")
    assert train_main(["--resume", str(run), "trainer.max_steps=3"]) == 0
    assert not any(p.exists() for p in stale)


# -------------------------------------------------------------------------------------- full disk
def test_disk_full_on_checkpoint_keeps_previous_checkpoint_and_config(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    real_fsync, writes = os.fsync, []

    def fsync(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if ".last.pt." in target:
            writes.append(target)
            if len(writes) > 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert train(VANILLA, run, "trainer.max_steps=4", "trainer.checkpoint_every_steps=1") == 1
    err = one_line_error(capsys)
    assert f"cannot write {run / 'checkpoints' / 'last.pt'}: No space left on device" in err, err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"] == 1
    assert "max_steps: 4" in (run / "config.yaml").read_text()
    assert not list((run / "checkpoints").glob("*.tmp"))
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert train_main(["--resume", str(run)]) == 0  # once there is space again


def _mount_tmpfs(path: Path, size_kb: int) -> bool:
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)]
    return subprocess.run(cmd, capture_output=True).returncode == 0


@pytest.mark.slow
def test_disk_full_on_real_tmpfs(tmp_path, capsys):
    """A real full filesystem: a resumed run whose next checkpoint does not fit."""
    src = tmp_path / "src"
    assert train(VANILLA, src, "trainer.max_steps=2", "logging.tensorboard=false") == 0
    used_kb = sum(p.stat().st_size for p in src.rglob("*") if p.is_file()) // 1024
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, used_kb + 64):
        pytest.skip("cannot mount a tmpfs here (needs root on Linux)")
    try:
        shutil.copytree(src, disk / "run")
        config = (disk / "run" / "config.yaml").read_bytes()
        capsys.readouterr()
        code = train_main(["--resume", str(disk / "run"), "trainer.max_steps=4", "trainer.checkpoint_every_steps=1"])
        assert code == 1
        assert "No space left on device; the previous file is intact" in one_line_error(capsys)
        assert load_checkpoint(disk / "run" / "checkpoints" / "last.pt")["state"]["step"] == 2
        saved = OmegaConf.load(disk / "run" / "config.yaml")  # intact: the old or the new recipe, never a torn one
        assert saved.trainer.max_steps in (2, 4) and saved.model.name == "cifar_resnet8"
        del config
        assert not list((disk / "run" / "checkpoints").glob("*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_atomic_write_failure_leaves_previous_file(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "old")

    class Full:
        def __reduce__(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError, match=r"cannot write .*metrics.json: No space left on device") as info:
        from mbn.fileio import atomic_write

        atomic_write(path, lambda f: (f.write(b"new, half"), Full().__reduce__()))
    assert info.value.errno == errno.ENOSPC
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_torch_save_failure_names_the_cause(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_torch_save({"a": torch.zeros(2)}, path)
    real_fsync = os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteError, match="No space left on device; the previous file is intact"):
        atomic_torch_save({"a": torch.ones(2)}, path)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(2))


def test_tensorboard_write_failure_is_one_line_and_training_goes_on(tmp_path, capsys):
    logger = TensorBoardLogger(tmp_path / "tb")
    assert logger.writer("domain=clean") is not None

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    logger.writer("domain=clean").add_scalar = full  # type: ignore[method-assign]
    logger.scalars({"loss/clean": 1.0}, 1)
    logger.scalars({"loss/clean": 0.5}, 2)  # disabled: nothing raised, nothing printed again
    logger.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mbn: TensorBoard logging stopped: cannot write {tmp_path / 'tb'} (No space left on device)"]


# ---------------------------------------------------------------------------------- bad checkpoints
def _damage(ckpt_path: Path, how: str) -> None:
    if how == "empty":
        ckpt_path.write_bytes(b"")
    elif how == "garbage":
        ckpt_path.write_bytes(b"\x00garbage" * 100)
    elif how == "code":  # a pickle that would call a function when loaded without weights_only
        torch.save({"model": print}, ckpt_path)
    elif how == "damaged-pickle":  # torch.save's zip whose pickle holds an opcode no pickle has
        _replace_pickle(ckpt_path, b"\x80\x02}q\x00\xfe.")
    elif how == "yaml":
        ckpt_path.write_text("model:\n  name: cifar_resnet8\n")
    elif how == "no-optimizer":
        ckpt = load_checkpoint(ckpt_path)
        del ckpt["optimizer"]
        torch.save(ckpt, ckpt_path)
    elif how == "other-width":
        ckpt = load_checkpoint(ckpt_path)
        key = next(k for k, v in ckpt["model"].items() if v.ndim == 4)
        ckpt["model"][key] = torch.zeros(4, 3, 3, 3)
        torch.save(ckpt, ckpt_path)


def _replace_pickle(path: Path, pickle_bytes: bytes) -> None:
    """Rewrite torch.save's zip at ``path`` with ``pickle_bytes`` as its ``data.pkl``."""
    with zipfile.ZipFile(path) as src:
        entries = {name: src.read(name) for name in src.namelist()}
    with zipfile.ZipFile(path, "w") as dst:
        for name, data in entries.items():
            dst.writestr(name, pickle_bytes if name.endswith("/data.pkl") else data)


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("empty", "empty file, not a checkpoint"),
        ("garbage", "not a readable checkpoint"),
        ("yaml", "not a readable checkpoint (not a file torch.save wrote)"),
        ("damaged-pickle", "not a readable checkpoint (damaged: Unsupported operand 254)"),
        ("code", "holds objects other than tensors and plain containers; mbn loads checkpoints with weights_only"),
        ("no-optimizer", "missing 'optimizer'"),
        ("other-width", ": (4, 3, 3, 3) in the checkpoint, (8, 3, 3, 3) in the model"),
    ],
)
def test_damaged_checkpoint_on_resume_and_eval_is_one_line(how, message, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(VANILLA, run, "trainer.max_steps=1") == 0
    config = (run / "config.yaml").read_bytes()
    _damage(run / "checkpoints" / "last.pt", how)
    capsys.readouterr()
    assert train_main(["--resume", str(run)]) == 2
    assert message in one_line_error(capsys)
    assert (run / "config.yaml").read_bytes() == config
    if how in ("empty", "garbage", "yaml", "damaged-pickle", "code"):
        assert eval_main([str(run)]) == 2
        assert message in capsys.readouterr().err


# --------------------------------------------------------------------------------- bad recipe input
@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("trainer.log_every=0", "key 'trainer.log_every'"),
        ("optim.momentum=-1", "key 'optim.momentum'"),
        ("optim.betas=[0.9,1.5]", "key 'optim.betas.1'"),
        ("optim.betas=[0.9,0.99,0.1]", "key 'optim.betas'"),
        ("domains=[a,b]", "key 'domains'"),
        ("domains.clean.weight=-1", "key 'domains.clean.weight'"),
        ("trainer.seed=-1", "key 'trainer.seed'"),
        ("trainer.seed=99999999999999999999", "key 'trainer.seed'"),
        ("model.width=0", "key 'model.width'"),
    ],
)
def test_bad_value_is_one_line_exit_2(override, named, tmp_path, capsys):
    assert train(VANILLA, tmp_path / "run", "trainer.max_steps=1", override) == 2
    assert named in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_signal_while_loading_recipe_is_one_line(signum, tmp_path, capsys, monkeypatch, default_stop_signals):
    import mbn.cli.train as cli

    real = cli.load_recipe

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "load_recipe", interrupted)
    assert cli.main([str(VANILLA), f"trainer.out_dir={tmp_path / 'run'}"]) == 128 + signum
    assert f"mbn-train: {signum.name} before training started; nothing was written" == one_line_error(capsys)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------ bad data trees
def _image_tree(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def _train_folder(root: Path, out: Path) -> int:
    return train_main([str(VANILLA), *TINY, "data.name=imagefolder", f"data.root={root}", f"trainer.out_dir={out}",
                       "data.batch_size=2", "trainer.max_steps=1"])  # fmt: skip


@pytest.mark.parametrize("loops", [1, 2])
def test_symlink_loops_are_refused_by_name(loops, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MBN_CACHE_DIR", str(tmp_path / "cache"))
    root = _image_tree(tmp_path / "tree")
    (root / "train" / "cat" / "loop").symlink_to(root / "train")
    if loops == 2:
        (root / "train" / "dog" / "loop").symlink_to(root / "train" / "dog")
    assert _train_folder(root, tmp_path / "run") == 2
    err = one_line_error(capsys)
    assert "(a symlink loop or a second link to one folder)" in err, err
    assert err.split("key 'data.root': ")[1].split(" leads to ")[0].endswith("/loop"), err  # names the link


def _bad_file(folder: Path, kind: str) -> Path:
    if kind == "truncated":
        good = (folder / "0.png").read_bytes()
        Image.open(folder / "0.png").convert("RGB").save(folder / "t.jpg")
        (folder / "t.jpg").write_bytes((folder / "t.jpg").read_bytes()[:300])
        del good
        return folder / "t.jpg"
    if kind == "garbage":
        (folder / "g.jpg").write_bytes(b"not an image at all" * 20)
        return folder / "g.jpg"
    if kind == "empty":
        (folder / "e.png").write_bytes(b"")
        return folder / "e.png"
    if kind == "fifo":
        os.mkfifo(folder / "f.png")
        return folder / "f.png"
    (folder / "d.jpg").symlink_to(folder / "missing.jpg")
    return folder / "d.jpg"


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "fifo", "dangling"])
def test_unreadable_image_is_named(kind, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MBN_CACHE_DIR", str(tmp_path / "cache"))
    root = _image_tree(tmp_path / "tree")
    bad = _bad_file(root / "train" / "dog", kind)
    assert _train_folder(root, tmp_path / "run") == 2
    err = one_line_error(capsys)
    assert str(bad) in err, err


# ---------------------------------------------------------------------------------- plugin outputs
def _bad_domains() -> dict[str, object]:
    def make(fn):
        class Bad(mbn.Domain):
            def generate(self, images, labels, ctx):
                return fn(images, labels)

        return Bad

    def boom(images, labels):
        raise ValueError("boom in the plugin")

    return {
        "not_a_pair": (make(lambda x, y: x), "returned Tensor; expected a pair (images, targets)"),
        "uint8": (make(lambda x, y: ((x * 255).to(torch.uint8), y)), "images of dtype torch.uint8"),
        "scale_255": (make(lambda x, y: (x * 255, y)), "(0-255 pixel values?)"),
        "nan": (make(lambda x, y: (x * float("nan"), y)), "images in [nan, nan]"),
        "shape": (make(lambda x, y: (x[:, :, :16], y)), "images of shape (16, 3, 16, 32)"),
        "labels_range": (make(lambda x, y: (x, y + 100)), "expected class indices in [0, 10)"),
        "labels_dtype": (make(lambda x, y: (x, y.to(torch.int32))), "targets of dtype torch.int32"),
        "count": (make(lambda x, y: (x, y[:3])), "3 targets for 16 images"),
        "device": (make(lambda x, y: (x.to("meta"), y)), "tensors on meta/cpu; expected them on cpu"),
        "raises": (make(boom), "failed at step 1: ValueError: boom in the plugin"),
        "exits": (make(lambda x, y: sys.exit(0)), "failed at step 1: SystemExit: 0"),
        "float64": (make(lambda x, y: (x.double(), y)), "images of dtype torch.float64"),
        "empty": (make(lambda x, y: (x[:0], y[:0])), "an empty batch"),
        "negative_soft": (
            make(lambda x, y: (x, torch.full((len(y), 10), 0.2) - 0.1 * (torch.arange(10) < 5))),
            "soft targets with minimum",
        ),
    }


@pytest.mark.parametrize("case", list(_bad_domains()))
def test_bad_plugin_output_names_the_domain(case, tmp_path, capsys, scratch_registry):
    cls, expected = _bad_domains()[case]
    mbn.register_domain("bad_plugin_test")(cls)  # type: ignore[arg-type]
    code = train(VANILLA, tmp_path / "run", "trainer.max_steps=2", "domains.weird.type=bad_plugin_test")
    assert code == 1
    err = one_line_error(capsys)
    assert "domain 'weird'" in err and expected in err, err


# ------------------------------------------------------------------------------- hostile-review cases
def test_lock_file_symlink_is_refused_and_target_untouched(tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").symlink_to(victim)
    assert train(VANILLA, run, "trainer.max_steps=1") == 2
    assert "lock file" in one_line_error(capsys)
    assert victim.read_text() == "precious"


@pytest.mark.slow
def test_lock_is_not_held_by_a_forked_child(tmp_path):
    """DataLoader workers are forked: the lock must die with the trainer, not with its last worker."""
    run = tmp_path / "run"
    lock = RunLock(run).acquire()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child sleeps and exits
        time.sleep(3)
        os._exit(0)
    try:
        lock.release()  # the parent's death, as far as the lock is concerned
        code = f"from mbn.rundir import RunLock; RunLock({str(run)!r}).acquire()"
        probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert probe.returncode == 0, probe.stderr
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


@pytest.mark.slow
def test_second_signal_aborts_with_the_truth(tmp_path, capsys, signal_domains):
    @mbn.register_domain("double_signal_test")
    class Twice(mbn.Domain):
        fired = False

        def generate(self, images, labels, ctx):
            if ctx.step == 2 and not Twice.fired:
                Twice.fired = True
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)
            return images, labels

    run = tmp_path / "run"
    code = train(VANILLA, run, "domains.stop.type=double_signal_test", "trainer.checkpoint_every_steps=1",
                 "trainer.max_steps=6")  # fmt: skip
    assert code == 143
    err = one_line_error(capsys)
    assert err.startswith("mbn-train: aborted by SIGTERM at step 2; the last checkpoint in"), err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"] == 2
    assert train_main(["--resume", str(run)]) == 0


@pytest.mark.slow
def test_resume_reports_same_train_metrics_as_uninterrupted(tmp_path, signal_domains):
    stop = ["domains.stop.type=signal_at_test", "trainer.log_every=4", "trainer.max_steps=7"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert train(VANILLA, ref, *stop, "domains.stop.at=-1") == 0
    assert train(VANILLA, run, *stop, "domains.stop.at=5") == 128 + signal.SIGHUP
    assert train_main(["--resume", str(run)]) == 0
    metrics = [json.loads((r / "metrics.json").read_text()) for r in (ref, run)]
    assert metrics[0]["train"] == metrics[1]["train"]


def test_resume_of_run_stopped_mid_epoch_by_max_steps_writes_nothing_new(tmp_path):
    run = tmp_path / "run"
    assert train(VANILLA, run, "trainer.max_steps=6") == 0
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    metrics = (run / "metrics.json").read_text()
    assert train_main(["--resume", str(run)]) == 0
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before
    assert json.loads((run / "metrics.json").read_text()) == json.loads(metrics)


@pytest.mark.parametrize(
    ("overrides", "code", "message"),
    [
        (["trainer.out_dir=/tmp/elsewhere"], 2, "key 'trainer.out_dir': cannot be set with --resume"),
        (["domains.clean.weight=1", "domains.clean.bn=clean", "domains.clean.start=0"], 0, ""),
    ],
)
def test_resume_overrides_that_repeat_defaults_or_move_the_run(overrides, code, message, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(VANILLA, run, "trainer.max_steps=2") == 0
    capsys.readouterr()
    assert train_main(["--resume", str(run), "trainer.max_steps=3", *overrides]) == code
    if message:
        assert message in one_line_error(capsys)


def test_resume_refuses_reordered_domains(tmp_path, capsys):
    run = tmp_path / "run"
    advprop = REPO / "recipes" / "advprop.yaml"
    assert train(advprop, run, "trainer.max_steps=2", "domains.adv.steps=1") == 0
    cfg = OmegaConf.load(run / "config.yaml")
    cfg.domains = {name: cfg.domains[name] for name in reversed(list(cfg.domains))}
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    capsys.readouterr()
    assert train_main(["--resume", str(run), "trainer.max_steps=3"]) == 2
    assert "domains (order)" in one_line_error(capsys)


def test_resume_refuses_other_data_under_the_same_keys(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MBN_CACHE_DIR", str(tmp_path / "cache"))
    first = _image_tree(tmp_path / "a")
    other_classes = tmp_path / "b"
    for split in ("train", "test"):
        for cls in ("apple", "zebra"):
            shutil.copytree(first / split / "cat", other_classes / split / cls)
    other_images = _image_tree(tmp_path / "c", seed=7)
    run = tmp_path / "run"
    assert _train_folder(first, run) == 0
    capsys.readouterr()
    for root, expected in (
        (other_classes, "holds classes ['apple', 'zebra']"),
        (other_images, "differ from the run's"),
    ):
        assert train_main(["--resume", str(run), f"data.root={root}", "trainer.max_steps=2"]) == 2
        assert expected in one_line_error(capsys)


def test_image_cache_tells_two_trees_with_the_same_names_apart(tmp_path):
    from mbn.data import load_image_folder

    trees = []
    for i, seed in enumerate((1, 2)):
        root = tmp_path / f"t{i}" / "data"
        for split in ("train", "test"):
            folder = root / split / "cat"
            folder.mkdir(parents=True)
            pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / "0.png", compress_level=0)  # one size for any pixels
        trees.append((root, pixels))
    for root, pixels in trees:
        train_split, _, _ = load_image_folder(root, cache_dir=tmp_path / "cache")
        assert np.array_equal(train_split.images[0], pixels)


def test_plain_user_temp_files_survive_cleanup(tmp_path):
    run = tmp_path / "run"
    assert train(VANILLA, run, "trainer.max_steps=1") == 0
    mine = run / ".notes.tmp"
    mine.write_text("mine")
    assert train_main(["--resume", str(run), "trainer.max_steps=2"]) == 0
    assert mine.read_text() == "mine"


def test_written_files_follow_the_umask(tmp_path):
    run = tmp_path / "run"
    assert train(VANILLA, run, "trainer.max_steps=1") == 0
    mask = os.umask(0)
    os.umask(mask)
    for path in (run / "config.yaml", run / "metrics.json", run / "checkpoints" / "last.pt"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path


def test_automatic_run_directories_never_collide(tmp_path):
    from mbn.cli.train import claim_run_dir

    stem = str(tmp_path / "runs" / "vanilla-20261124-101500")
    assert [claim_run_dir(stem).name for _ in range(3)] == [
        "vanilla-20261124-101500", "vanilla-20261124-101500-2", "vanilla-20261124-101500-3"
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("how", "message"),
    [("batch", "state.batch = 999 is past"), ("step", "state.step = 'x' is not a position"), ("scheduler", "")],
)
def test_malformed_checkpoint_state_is_one_line(how, message, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(VANILLA, run, "trainer.max_steps=1") == 0
    path = run / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(path)
    if how == "scheduler":
        ckpt["scheduler"] = 5
    else:
        ckpt["state"][how] = 999 if how == "batch" else "x"
    torch.save(ckpt, path)
    capsys.readouterr()
    assert train_main(["--resume", str(run)]) == 2
    err = one_line_error(capsys)
    assert "optimiser or training state does not fit this run" in err and message in err, err


# ------------------------------------------------------------------------------ second hostile review
def test_resume_does_not_need_the_init_from_source(tmp_path):
    source, fine = tmp_path / "source", tmp_path / "fine"
    assert train(VANILLA, source, "trainer.max_steps=1") == 0
    assert train(VANILLA, fine, f"model.init_from={source}", "trainer.max_steps=2") == 0
    shutil.rmtree(source)
    assert train_main(["--resume", str(fine), "trainer.max_steps=3"]) == 0


def test_domain_writing_its_input_in_place_is_named(tmp_path, capsys, scratch_registry):
    @mbn.register_domain("inplace_test")
    class InPlace(mbn.Domain):
        def generate(self, images, labels, ctx):
            return images.mul_(0.5), labels

    assert train(VANILLA, tmp_path / "run", "domains.w.type=inplace_test", "trainer.max_steps=1") == 1
    assert "domain 'w' changed its input images in place" in one_line_error(capsys)


def test_domain_breaking_the_contract_after_its_first_batch_is_named(tmp_path, capsys, scratch_registry):
    @mbn.register_domain("late_breaker_test")
    class Late(mbn.Domain):
        def generate(self, images, labels, ctx):
            return images, (labels + 100 if ctx.step >= 2 else labels)

    assert train(VANILLA, tmp_path / "run", "domains.w.type=late_breaker_test", "trainer.max_steps=4") == 1
    err = one_line_error(capsys)
    assert "domain 'w'" in err and "expected class indices" in err, err


def test_resume_refuses_same_classes_with_other_images(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MBN_CACHE_DIR", str(tmp_path / "cache"))
    first = _image_tree(tmp_path / "a")
    swapped = tmp_path / "b"
    for split in ("train", "test"):  # the class folders' contents exchanged: same names, counts and statistics
        shutil.copytree(first / split / "cat", swapped / split / "dog")
        shutil.copytree(first / split / "dog", swapped / split / "cat")
    run = tmp_path / "run"
    assert _train_folder(first, run) == 0
    capsys.readouterr()
    assert train_main(["--resume", str(run), f"data.root={swapped}", "trainer.max_steps=2"]) == 2
    assert "is not the one this run was trained on" in one_line_error(capsys)


def test_ignored_signals_stay_ignored(tmp_path, signal_domains):
    """nohup (SIGHUP ignored) must keep protecting the run."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert train(VANILLA, tmp_path / "run", "domains.stop.type=signal_at_test", "trainer.max_steps=4") == 0
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["state"]["step"] == 4


def test_max_steps_stop_and_resume_reports_uninterrupted_metrics(tmp_path):
    base = ["trainer.log_every=3", "trainer.epochs=2"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert train(VANILLA, ref, *base) == 0
    assert train(VANILLA, run, *base, "trainer.max_steps=7") == 0
    assert train_main(["--resume", str(run), "trainer.max_steps=null"]) == 0
    metrics = [json.loads((r / "metrics.json").read_text()) for r in (ref, run)]
    assert metrics[0]["train"] == metrics[1]["train"]


def test_second_signal_before_any_checkpoint_says_so(tmp_path, capsys, scratch_registry, default_stop_signals):
    @mbn.register_domain("double_early_test")
    class Twice(mbn.Domain):
        def generate(self, images, labels, ctx):
            if ctx.step == 1:
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)
            return images, labels

    assert train(VANILLA, tmp_path / "run", "domains.stop.type=double_early_test", "trainer.max_steps=3") == 143
    assert "before the first checkpoint; nothing to resume" in one_line_error(capsys)


def test_hard_linked_lock_file_is_refused(tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    os.link(victim, run / ".lock")
    assert train(VANILLA, run, "trainer.max_steps=1") == 2
    assert "lock file is not a plain file" in one_line_error(capsys)
    assert victim.read_text() == "precious"


def test_resume_of_a_run_saved_before_newer_recipe_keys(tmp_path):
    """A key mbn gained after a run started reads as its default on resume, not as a change."""
    run = tmp_path / "run"
    assert train(VANILLA, run, "trainer.max_steps=2") == 0
    path = run / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    for section, key in (("data", "preload"), ("data", "augment"), ("data", "mean"), ("trainer", "sync_bn")):
        del ckpt["config"][section][key]
    torch.save(ckpt, path)
    assert train_main(["--resume", str(run), "trainer.max_steps=3"]) == 0
    assert load_checkpoint(path)["state"]["step"] == 3
