"""Recipe files that are not what they should be, and devices this build cannot use: one line, exit status 2.

A merge error in a ``base:`` chain names the key and the file that set it; a file that is not a recipe (a password
file, a binary, a list, a huge line) is named with the key that pointed at it, never quoted; long keys are cut.
``trainer.device`` takes only what this build of torch offers. And a run that fails before it logged anything
leaves no ``tb/`` behind, so the corrected command can use the same directory; one refused before training starts
leaves no directory it created (an automatic ``runs/NAME-TIME/``, a new ``trainer.out_dir``) at all.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mbn.builders import available_devices, resolve_device
from mbn.cli.train import main as train_main
from mbn.config import MESSAGE_CHARS, RecipeError
from mbn.fileio import WriteError
from mbn.rundir import NewRunDir, RunLock
from mbn.tblog import TensorBoardLogger
from tests.runs import REPO, TINY, train

VANILLA = REPO / "recipes" / "vanilla.yaml"
#: What a file that is not a recipe holds; a message must never show it.
SECRET = "s3cr3t-hash"
PASSWD = "".join(f"user{i}:x:{i}:{i}:{SECRET}{i}:/home/user{i}:/bin/sh\n" for i in range(40))


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def refused(recipe: Path | str, tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    """``mbn-train recipe`` (tiny setting): exit status 2, one line on stderr, returned; nothing written."""
    assert train(recipe, tmp_path / "run", "trainer.max_steps=1", *extra) == 2
    err = one_line_error(capsys)
    assert SECRET not in err
    return err


def recipe(tmp_path: Path, text: str, name: str = "mine.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------ base-chain merges
@pytest.mark.parametrize(
    ("body", "named"),
    [
        ("domains: [clean, adv]\n", "key 'domains': a mapping of domain names to their entries, not a list"),
        ("domains:\n  clean: [clean]\n", "key 'domains.clean': a domain entry (a mapping with at least 'type')"),
        ("ema: 0.9\n", "key 'ema': a section, not a value (its keys: decay, warmup), got 0.9"),
        ("optim: [sgd]\n", "key 'optim': a section, not a list"),
        ("optim:\n  betas: {a: 1}\n", "key 'optim.betas': a list, not a mapping"),
        ("trainer:\n  epochs: many\n", "key 'trainer.epochs': Value 'many'"),
    ],
    ids=["domains-list", "domain-entry-list", "section-scalar", "section-list", "list-mapping", "wrong-type"],
)
def test_a_merge_error_names_the_key_and_the_file_that_set_it(body, named, tmp_path, capsys):
    mine = recipe(tmp_path, f"base: {VANILLA}\n{body}")
    err = refused(mine, tmp_path, capsys)
    assert f"{mine}: {named}" in err, err
    assert not (tmp_path / "run").exists()


def test_a_merge_error_deep_in_the_chain_names_that_file_and_who_pointed_at_it(tmp_path, capsys):
    middle = recipe(tmp_path, f"base: {VANILLA}\nema: 0.9\n", "middle.yaml")
    top = recipe(tmp_path, "base: middle.yaml\noptim:\n  lr: 0.01\n")
    err = refused(top, tmp_path, capsys)
    assert f"{middle} (key 'base' of {top}): key 'ema': a section, not a value" in err, err


def test_a_list_of_domains_without_a_base_is_named_too(tmp_path, capsys):
    mine = recipe(tmp_path, "domains: [clean]\n")
    assert f"{mine}: key 'domains': a mapping of domain names" in refused(mine, tmp_path, capsys)


# ------------------------------------------------------------------------------ files that are not recipes
def test_a_base_that_is_not_a_recipe_is_named_with_the_key_never_quoted(tmp_path, capsys):
    passwd = tmp_path / "passwd"
    passwd.write_text(PASSWD)
    mine = recipe(tmp_path, f"base: {passwd}\n")
    err = refused(mine, tmp_path, capsys)
    assert err.startswith(f"mbn-train: error: {passwd} (key 'base' of {mine}): not a recipe"), err
    assert "user0" not in err and len(err) < 400


def test_a_budget_of_that_is_not_a_recipe_is_named_with_the_key_never_quoted(tmp_path, capsys):
    passwd = tmp_path / "passwd.yaml"
    passwd.write_text(PASSWD)
    err = refused(VANILLA, tmp_path, capsys, f"trainer.budget_of={passwd}")
    assert err.startswith(f"mbn-train: error: key 'trainer.budget_of': {passwd}: not a recipe"), err
    assert "user0" not in err and len(err) < 400


@pytest.mark.parametrize(
    ("content", "named"),
    [
        (b"- model\n- data\n", "not a recipe: its top level is a list"),
        (b"42\n", "not a recipe: its top level is a single value or text"),
        (("x" * 300_000 + "\n").encode(), "not a recipe: its top level is a single value or text"),
        (b"k" * (1 << 20) + b": 1\n", "over 1 MiB, too large for a recipe"),
        (bytes(range(256)) * 8, "not a text file"),
        (b"model:\n  name: a\x00b\n", "not a text file (it holds NUL bytes"),
        (b"model: {name: [\n", "not valid YAML"),
        (f"{'w' * 300}: 1\n{SECRET}: 2\n".encode(), "not a recipe: its top-level keys are not recipe sections"),
    ],
    ids=["list", "number", "huge-line", "over-1MiB", "binary", "nul", "broken-yaml", "long-key"],
)
def test_a_file_that_is_not_a_recipe_is_one_line_naming_it(content, named, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(content)
    for mine in (bad, recipe(tmp_path, f"base: {bad}\n")):  # given on the command line, or as a base
        err = refused(mine, tmp_path, capsys)
        via = f" (key 'base' of {mine})" if mine != bad else ""
        assert f"{bad}{via}: {named}" in err, err
        assert len(err) < 400 and "www" not in err and "xxx" not in err and "kkk" not in err


def test_a_misspelt_section_is_named(tmp_path, capsys):
    mine = recipe(tmp_path, f"base: {VANILLA}\noptm:\n  lr: 0.01\n")
    assert f"{mine}: key 'optm' is not a recipe section (imports, model, data" in refused(mine, tmp_path, capsys)


def test_long_keys_and_values_are_cut_in_messages(tmp_path, capsys):
    long = "e" * 500
    mine = recipe(tmp_path, f"base: {VANILLA}\ntrainer:\n  {long}: 1\n")
    err = refused(mine, tmp_path, capsys)
    assert f"key 'trainer.{'e' * (MESSAGE_CHARS - len('trainer.') - 1)}\u2026'" in err, err
    assert long not in err and len(err) < 400
    mine = recipe(tmp_path, f"base: {VANILLA}\ntrainer:\n  epochs: {long}\n")
    err = refused(mine, tmp_path, capsys)
    assert "key 'trainer.epochs': Value 'eee" in err and "could not be converted to Integer" in err, err
    assert long not in err and len(err) < 400
    err = refused(VANILLA, tmp_path, capsys, f"trainer.{long}=1")  # an override
    assert long not in err and len(err) < 400 and err.startswith("mbn-train: error: key 'trainer.eee"), err


def test_a_base_that_is_not_a_regular_file_is_named(tmp_path, capsys):
    mine = recipe(tmp_path, "base: /dev/null\n")
    assert f"/dev/null (key 'base' of {mine}): not a regular file" in refused(mine, tmp_path, capsys)


def test_a_saved_run_without_a_newer_key_still_reads_its_legacy_value(tmp_path):
    from omegaconf import OmegaConf

    from mbn.config import load_recipe

    stored = OmegaConf.to_container(load_recipe(VANILLA))
    assert isinstance(stored, dict)
    del stored["optim"]["decay_norm_and_bias"]
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(stored))
    assert load_recipe(tmp_path / "config.yaml", saved_run=True).optim.decay_norm_and_bias is True
    assert load_recipe(tmp_path / "config.yaml").optim.decay_norm_and_bias is False


# ------------------------------------------------------------------------------------------ trainer.device
def _not_offered() -> list[str]:
    bad = ["gpu", "xpu", "meta", "cuda:99", "cpu:1", "cuda:-1", "CUDA"]
    if not torch.cuda.is_available():
        bad.append("cuda")
    if "mps" not in available_devices():
        bad.append("mps")
    return bad


@pytest.mark.parametrize("name", _not_offered(), ids=lambda name: f"device={name}")
def test_a_device_this_build_cannot_use_is_one_line_naming_what_it_offers(name, tmp_path, capsys):
    err = refused(VANILLA, tmp_path, capsys, f"trainer.device={name}")
    assert err.startswith(f"mbn-train: error: key 'trainer.device': {name!r} cannot be used here: "), err
    assert err.endswith(f"; this build offers {', '.join(available_devices())}") or "..." in err, err
    assert not (tmp_path / "run").exists()  # refused before the run directory is touched


def test_a_gpu_index_beyond_the_visible_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    assert available_devices()[:4] == ["auto", "cpu", "cuda", "cuda:0"]
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(RecipeError) as caught:
        resolve_device("cuda:7")
    assert str(caught.value).startswith(
        "key 'trainer.device': 'cuda:7' cannot be used here: 1 CUDA GPU is visible; this build offers auto, cpu, "
        "cuda, cuda:0"
    ), caught.value
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    with pytest.raises(
        RecipeError, match=r"8 CUDA GPUs are visible; this build offers auto, cpu, cuda, cuda:0, \.\.\. "
    ):
        resolve_device("cuda:8", "--device")
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RecipeError, match="'cuda' cannot be used here: this build of torch has no CUDA"):
        resolve_device("cuda")


def test_cpu_and_auto_are_always_offered():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------- tb/ on the first write
def test_the_tensorboard_directory_is_made_by_the_first_write_only(tmp_path):
    logger = TensorBoardLogger(tmp_path / "tb")
    logger.flush()
    logger.resume_at(3)
    logger.close()
    assert not (tmp_path / "tb").exists()
    logger = TensorBoardLogger(tmp_path / "tb")
    logger.scalars({"loss/clean": 1.0}, 1)
    assert (tmp_path / "tb").is_dir()
    logger.close()


def test_a_failed_start_leaves_no_tb_and_the_corrected_command_runs_in_the_same_directory(
    tmp_path, capsys, monkeypatch
):
    import mbn.train.hooks as hooks

    real = hooks.save_recipe

    def full_disk(cfg, path):  # the first write of a run, after the logger was built
        raise WriteError(f"cannot write {path}: No space left on device", 28)

    monkeypatch.setattr(hooks, "save_recipe", full_disk)
    run = tmp_path / "run"
    assert train(VANILLA, run, "trainer.max_steps=1") == 1
    assert "No space left on device" in one_line_error(capsys)
    assert sorted(p.name for p in run.iterdir()) == [".lock"]
    monkeypatch.setattr(hooks, "save_recipe", real)
    assert train(VANILLA, run, "trainer.max_steps=1") == 0
    assert (run / "tb").is_dir() and (run / "config.yaml").is_file()


def test_a_resumed_run_logs_each_step_once_in_tensorboard(tmp_path):
    """The writer made on the first write after a resume hides the events logged after the checkpoint."""
    import shutil

    from tests.runs import tensorboard_scalars

    run = tmp_path / "run"
    last = run / "checkpoints" / "last.pt"
    assert train(VANILLA, run, "trainer.max_steps=2") == 0
    shutil.copy(last, tmp_path / "step2.pt")
    assert train_main(["--resume", str(run), "trainer.max_steps=3"]) == 0  # logs step 3, then "crashes" back to 2
    shutil.copy(tmp_path / "step2.pt", last)
    assert train_main(["--resume", str(run), "trainer.max_steps=5"]) == 0
    assert [step for step, _ in tensorboard_scalars(run / "tb")["loss/clean"]] == [1, 2, 3, 4, 5]


# ------------------------------------------------------------------ no run directory before training starts
#: Recipes refused before training starts: (override, what the one line names).
REFUSED = {
    "unknown-domain": ("domains.x.type=nosuch", "key 'domains.x.type': unknown domain type 'nosuch'"),  # recipe check
    "accumulation": ("optim.grad_accum_steps=8", "key 'optim.grad_accum_steps': 8 batches"),  # after the lock is taken
}


@pytest.mark.parametrize(("override", "named"), REFUSED.values(), ids=REFUSED)
def test_a_refused_run_leaves_no_out_dir_it_created(override, named, tmp_path, capsys):
    assert train(VANILLA, tmp_path / "new" / "run", override) == 2
    assert named in one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []  # neither run/ nor the parent made for it


@pytest.mark.parametrize(("override", "named"), REFUSED.values(), ids=REFUSED)
def test_a_refused_run_leaves_no_automatic_run_directory(override, named, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert train_main([str(VANILLA), *TINY, override]) == 2
    assert named in one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []  # no runs/vanilla-<time>/, no runs/
    (tmp_path / "runs").mkdir()
    assert train_main([str(VANILLA), *TINY, override]) == 2
    capsys.readouterr()
    assert list(tmp_path.iterdir()) == [tmp_path / "runs"] and list((tmp_path / "runs").iterdir()) == []


@pytest.mark.parametrize(("override", "named"), REFUSED.values(), ids=REFUSED)
def test_a_refused_run_keeps_an_existing_out_dir_as_it_was(override, named, tmp_path, capsys):
    empty, used = tmp_path / "empty", tmp_path / "used"
    empty.mkdir()
    used.mkdir()
    (used / ".lock").write_text("pid 1 on elsewhere\n")  # an earlier run's lock file, and a file of the user's
    (used / "notes.txt").write_text("mine\n")
    for out in (empty, used):
        assert train(VANILLA, out, override) == 2
        assert named in one_line_error(capsys)
    assert list(empty.iterdir()) == []  # kept, and empty again: its lock file went with the refused run
    assert sorted(p.name for p in used.iterdir()) == [".lock", "notes.txt"]


def test_another_processs_lock_file_is_never_removed(tmp_path):
    run = tmp_path / "new" / "run"
    new = NewRunDir()
    new.before_creating(run)
    new.lock_in(run)
    with RunLock(run):  # held by another trainer: this process's registry refuses a second holder, as would fcntl
        new.undo()
    assert (run / ".lock").is_file()  # the lock file, and so its directories, stay
    new = NewRunDir()
    new.before_creating(tmp_path / "new" / "other")
    (tmp_path / "new" / "other").mkdir()
    new.undo()
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["run"]  # only the empty one it made is removed


def test_a_refused_run_through_dot_dot_never_removes_the_directory_it_names(tmp_path, capsys):
    kept = tmp_path / "keep"
    kept.mkdir()
    out = tmp_path / "new" / ".." / "keep"
    assert train(VANILLA, out, "optim.grad_accum_steps=8") == 2  # refused after the lock was taken
    one_line_error(capsys)
    assert kept.is_dir() and list(kept.iterdir()) == []
