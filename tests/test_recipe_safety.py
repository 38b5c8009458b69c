"""What a recipe resolves from the environment stays out of files; schedule values that contradict are refused."""

from __future__ import annotations

import pytest

from mbn.checkpoint import load_checkpoint
from mbn.cli.train import main as train_main
from tests.runs import VANILLA, one_line_error, train

SECRET = "s3cr3t-token-4d1f"


def test_values_from_the_environment_are_written_as_their_interpolation(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MBN_TEST_TOKEN", SECRET)
    monkeypatch.setenv("MBN_TEST_SEED", "3")
    run = tmp_path / "run"
    interpolated = ["data.root=${oc.env:MBN_TEST_TOKEN}/cifar", "trainer.seed=${oc.env:MBN_TEST_SEED}"]
    assert train(VANILLA, run, "trainer.max_steps=2", "trainer.checkpoint_every_steps=1", *interpolated) == 0
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.parent.name == "tb" or "tb" in p.parts for p in files)  # TensorBoard's recipe text is among them
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path
    assert "${oc.env:MBN_TEST_TOKEN}/cifar" in (run / "config.yaml").read_text()
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["config"]["data"]["root"] == "${oc.env:MBN_TEST_TOKEN}/cifar"
    assert ckpt["config"]["trainer"]["seed"] == "${oc.env:MBN_TEST_SEED}"
    # what ran is the resolved value; a resume in the same environment goes on (the seed compares as 3 = 3)
    assert train_main(["--resume", str(run), "trainer.max_steps=3"]) == 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"] == 3
    # another environment resolving the seed otherwise changes what is trained: refused, naming the key
    monkeypatch.setenv("MBN_TEST_SEED", "4")
    capsys.readouterr()
    assert train_main(["--resume", str(run), "trainer.max_steps=4"]) == 2
    assert "trainer.seed ('${oc.env:MBN_TEST_SEED} as trained' -> 4)" in one_line_error(capsys)
    monkeypatch.delenv("MBN_TEST_TOKEN")
    monkeypatch.setenv("MBN_TEST_SEED", "3")
    assert train_main(["--resume", str(run), "trainer.max_steps=4"]) == 2
    err = one_line_error(capsys)
    assert "MBN_TEST_TOKEN" in err, err


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["schedule.name=multistep", "schedule.milestones=[30,60]"], "key 'schedule.milestones': expected increasing"),
        (["schedule.name=multistep", "schedule.milestones=[2.0,-1]"], "got [2.0, -1.0]"),
        (["schedule.milestones=[0.75,0.5]"], "key 'schedule.milestones'"),
        (["schedule.milestones=[0.5,0.5]"], "key 'schedule.milestones'"),
        (["schedule.milestones=[0,0.5]"], "key 'schedule.milestones'"),
        (
            ["schedule.name=multistep", "schedule.min_lr=0.001"],
            "key 'schedule.min_lr': the floor of the cosine/tanh/poly/wsd/rsqrt schedules",
        ),
        (["optim.lr=0.01", "schedule.min_lr=0.1"], "key 'schedule.min_lr': 0.1 is above optim.lr=0.01"),
        (["optim.betas=[0.9,${oc.env:X}]"], "key 'optim.betas': '[0.9,${oc.env:X}]' is not a YAML value"),
    ],
)
def test_contradicting_schedule_values_are_refused_in_one_line(overrides, expected, tmp_path, capsys):
    assert train(VANILLA, tmp_path / "run", *overrides) == 2
    err = one_line_error(capsys)
    assert expected in err, err


def test_interpolations_under_a_key_holding_dots_read_back(tmp_path, monkeypatch):
    from mbn.eval.loading import read_stored_run

    monkeypatch.setenv("MBN_TEST_SEED", "3")
    run = tmp_path / "run"
    suite = "eval.suites={cifar10-c:v1.0: '${oc.env:MBN_TEST_DATA,/tmp}/C'}"  # a suite label may hold dots
    assert train(VANILLA, run, "trainer.max_steps=2", suite, "trainer.seed=${oc.env:MBN_TEST_SEED}") == 0
    stored = read_stored_run(run)
    assert stored.cfg.eval.suites["cifar10-c:v1.0"] == "/tmp/C"
    assert stored.cfg.trainer.seed == 3
    assert train_main(["--resume", str(run), "trainer.max_steps=3"]) == 0


def test_a_bad_budget_of_is_refused_before_the_data_is_read(tmp_path, capsys, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("the data was read before trainer.budget_of was checked")

    monkeypatch.setattr("mbn.train.build.build_data", no_data)
    assert train(VANILLA, tmp_path / "run", f"trainer.budget_of={tmp_path / 'missing.yaml'}") == 2
    assert "key 'trainer.budget_of'" in one_line_error(capsys)
