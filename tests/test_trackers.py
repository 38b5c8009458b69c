"""Optional trackers: W&B (offline) and MLflow (a local file store) get what TensorBoard and ``scalars.csv`` get.

The W&B and MLflow tests skip when the package is not installed; the others need neither.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml

from mbn.csvlog import read_scalars
from mbn.logger import RunLogger
from mbn.tracker_runs import TRACKERS_FILE, final_metrics, path_name, read_tracker_ids, write_tracker_ids
from mbn.trackers import check_trackers, trackers
from tests.runs import REPO, VANILLA, one_line_error, tensorboard_images, train

ADVPROP = REPO / "recipes" / "advprop.yaml"


def _logging(**over: Any) -> Any:
    """A ``logging`` section as the recipe has it (trackers off unless ``over`` says otherwise)."""
    wandb = {"enabled": False, "project": "mbn", "entity": None, "name": None, "mode": "offline", "tags": []}
    mlflow = {"enabled": False, "tracking_uri": None, "experiment": "mbn", "run_name": None}
    wandb.update(over.get("wandb", {}))
    mlflow.update(over.get("mlflow", {}))
    return SimpleNamespace(wandb=SimpleNamespace(**wandb), mlflow=SimpleNamespace(**mlflow))


# --------------------------------------------------------------------------------- no package needed
def test_no_tracker_by_default_and_no_tracker_package_imported_with_mbn():
    assert trackers(_logging(), Path("unused")) == []
    code = (  # (not mbn.train.build: timm.utils imports wandb whenever it is installed)
        "import sys, mbn, mbn.trackers, mbn.wandblog, mbn.mlflowlog\n"
        "assert not {'wandb', 'mlflow'} & set(sys.modules), sorted({'wandb', 'mlflow'} & set(sys.modules))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.parametrize(
    ("package", "override", "key", "command"),
    [
        ("wandb", "logging.wandb.enabled=true", "logging.wandb.enabled", "pip install wandb"),
        ("mlflow", "logging.mlflow.enabled=true", "logging.mlflow.enabled", "pip install mlflow"),
    ],
)
def test_enabling_a_missing_tracker_is_one_line_exit_2_and_writes_nothing(
    tmp_path, capsys, monkeypatch, package, override, key, command
):
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name.split(".")[0] == package else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    run = tmp_path / "run"
    assert train(VANILLA, run, "trainer.max_steps=1", override) == 2
    err = one_line_error(capsys)
    assert f"key '{key}'" in err and command in err, err
    assert not run.exists()
    empty = tmp_path / "empty"  # an out_dir made beforehand stays empty
    empty.mkdir()
    capsys.readouterr()
    assert train(VANILLA, empty, "trainer.max_steps=1", override) == 2
    assert command in one_line_error(capsys)
    assert list(empty.iterdir()) == []


def test_a_bad_wandb_mode_is_one_line_exit_2(tmp_path, capsys):
    assert train(VANILLA, tmp_path / "run", "logging.wandb.enabled=true", "logging.wandb.mode=cloud") == 2
    assert "key 'logging.wandb.mode'" in one_line_error(capsys)
    with pytest.raises(ValueError, match=r"logging\.wandb\.mode"):
        check_trackers(_logging(wandb={"mode": "cloud"}))


def test_disabled_mode_asks_for_no_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    check_trackers(_logging(wandb={"enabled": True, "mode": "disabled"}))
    assert trackers(_logging(wandb={"enabled": True, "mode": "disabled"}), Path("unused")) == []


def test_wandb_mode_disabled_in_the_environment_starts_no_tracker(monkeypatch):
    """With no mode in the recipe W&B's own WANDB_MODE decides: ``disabled`` there means no W&B at all."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert trackers(_logging(wandb={"enabled": True, "mode": None}), Path("unused")) == []
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert [t.name for t in trackers(_logging(wandb={"enabled": True, "mode": None}), Path("unused"))] == ["W&B"]


@pytest.mark.slow
def test_a_tracker_that_raises_is_dropped_with_one_line_and_training_finishes(tmp_path, capsys, monkeypatch):
    class Broken(RunLogger):
        name = "broken tracker"

        def __init__(self) -> None:
            self.calls = 0

        def scalars(self, values, step):
            self.calls += 1
            raise ConnectionError("server unreachable\nsecond line")

    broken = Broken()
    monkeypatch.setattr("mbn.train.build.trackers", lambda logging, run_dir: [broken])  # build imported the name
    run = tmp_path / "run"
    assert train(VANILLA, run, "trainer.max_steps=3") == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ["mbn: broken tracker logging stopped (server unreachable); training goes on"]
    assert broken.calls == 1
    assert {step for step, _, _ in read_scalars(run / "scalars.csv")} == {1, 2, 3}
    assert json.loads((run / "metrics.json").read_text())["steps"] == 3


def test_names_mlflow_refuses_become_ones_it_takes():
    assert path_name("loss/clean") == "loss/clean"
    assert path_name("x_diagnostics/bn_divergence_log10/adv") == "x_diagnostics/bn_divergence_log10/adv"
    assert path_name("loss/adv@eps=4") == "loss/adv_eps_4"
    assert path_name("samples/../etc") == "samples/_/etc"
    assert path_name("a//b/") == "a/_/b/_"
    assert len(path_name("x" * 400)) == 250


def test_final_metrics_are_the_numeric_leaves_of_metrics_json():
    metrics = {"steps": 4, "test_acc": {"clean": 0.5, "adv": 0.25}, "device": "cpu", "x": None, "ok": True}
    assert final_metrics(metrics) == {"final/steps": 4.0, "final/test_acc/clean": 0.5, "final/test_acc/adv": 0.25}


def test_tracker_ids_are_kept_side_by_side(tmp_path):
    assert read_tracker_ids(tmp_path) == {}
    write_tracker_ids(tmp_path, "wandb", {"id": "abc"})
    write_tracker_ids(tmp_path, "mlflow", {"run_id": "r1", "tracking_uri": "file:/x"})
    assert read_tracker_ids(tmp_path) == {"wandb": {"id": "abc"}, "mlflow": {"run_id": "r1", "tracking_uri": "file:/x"}}
    (tmp_path / TRACKERS_FILE).write_text("{not json")
    assert read_tracker_ids(tmp_path) == {}


# ---------------------------------------------------------------------------------------------- W&B
WANDB = ["logging.wandb.enabled=true", "logging.wandb.mode=offline", "logging.wandb.tags=[smoke]"]


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B offline, silent, with its own directories under ``tmp_path`` (nothing in the home directory)."""
    pytest.importorskip("wandb")
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        path = tmp_path / var.lower()
        path.mkdir()
        monkeypatch.setenv(var, str(path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_RESUME", raising=False)


def _wandb_records(path: Path) -> list[Any]:
    """The records of an offline run's ``.wandb`` file (W&B's LevelDB-style log of protobuf ``Record``s)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    block, pos, chunks, records = 32768, 7, [], []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            records.append(record)
            chunks = []
    return records


def _wandb_run(run_dir: Path, wait_s: float = 30.0) -> dict[str, Any]:
    """What the offline W&B sessions of a run logged: run ids, history by step, config, summary, files, exit codes.

    W&B's service process writes the offline files; on a loaded machine a session's file can lag the training
    process's exit, so this reads again (up to ``wait_s``) until every session's run record is there.
    """
    deadline = time.monotonic() + wait_s
    while True:
        out = _read_wandb_run(run_dir)
        sessions = len(list(run_dir.glob("wandb/offline-run-*")))
        if len(out["ids"]) >= sessions or time.monotonic() > deadline:
            return out
        time.sleep(0.5)


def _read_wandb_run(run_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"ids": [], "names": [], "tags": [], "history": {}, "config": {}, "summary": {}}
    out.update(files=[], exit_codes=[])
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                out["ids"].append(record.run.run_id)
                out["names"].append(record.run.display_name)
                out["tags"].append(list(record.run.tags))
            elif kind == "history":
                items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
                out["history"].setdefault(record.history.step.num, {}).update(items)
            elif kind == "config":
                out["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "summary":
                out["summary"].update({i.key: json.loads(i.value_json) for i in record.summary.update if i.key})
            elif kind == "files":
                out["files"] += [(path.parent / "files" / f.path) for f in record.files.files]
            elif kind == "exit":
                out["exit_codes"].append(record.exit.exit_code)
    return out


@pytest.mark.slow
def test_wandb_offline_logs_the_scalars_images_recipe_and_final_metrics(tmp_path, wandb_offline):
    run = tmp_path / "run"
    assert train(ADVPROP, run, "trainer.max_steps=2", "optim.lr=0.05", *WANDB) == 0
    logged = _wandb_run(run)
    wandb_id = json.loads((run / TRACKERS_FILE).read_text())["wandb"]["id"]
    assert logged["ids"] == [wandb_id] and logged["names"] == ["run"] and logged["tags"] == [["smoke"]]
    rows = read_scalars(run / "scalars.csv")
    tags = {tag for _, tag, _ in rows}
    assert {"loss/clean", "loss/adv", "acc_test/clean", "x_diagnostics/bn_divergence_log10/adv"} <= tags
    for step, tag, value in rows:  # every scalar, at the trainer's step
        assert logged["history"][step][tag] == pytest.approx(value, rel=1e-12, nan_ok=True), (step, tag)
    images = {key[: -len("/_type")] for h in logged["history"].values() for key in h if key.endswith("/_type")}
    assert images == tensorboard_images(run / "tb")  # the same image tags as TensorBoard's
    assert logged["config"]["optim"]["lr"] == 0.05 and logged["config"]["domains"]["adv"]["type"] == "pgd"
    recipe_file = next(f for f in logged["files"] if f.name == "recipe.yaml")
    assert yaml.safe_load(recipe_file.read_text())["optim"]["lr"] == 0.05
    metrics = json.loads((run / "metrics.json").read_text())
    assert logged["summary"]["final/test_acc_main"] == metrics["test_acc_main"]
    assert logged["summary"]["final/steps"] == 2
    assert logged["exit_codes"] == [0]


@pytest.mark.slow
def test_wandb_resume_continues_the_same_run(tmp_path, wandb_offline):
    run = tmp_path / "run"
    assert train(VANILLA, run, "trainer.max_steps=2", *WANDB) == 0
    wandb_id = read_tracker_ids(run)["wandb"]["id"]
    from mbn.cli.train import main as train_main

    assert train_main(["--resume", str(run), "trainer.max_steps=4"]) == 0
    assert read_tracker_ids(run)["wandb"]["id"] == wandb_id
    logged = _wandb_run(run)
    assert set(logged["ids"]) == {wandb_id}
    for step, tag, value in read_scalars(run / "scalars.csv"):
        assert logged["history"][step][tag] == pytest.approx(value, rel=1e-12), (step, tag)


# --------------------------------------------------------------------------------------------- MLflow
@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A local MLflow file store's tracking URI (MLflow 3 refuses one unless ``MLFLOW_ALLOW_FILE_STORE``)."""
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    return (tmp_path / "mlruns").as_uri()


def _mlflow_metrics(client: Any, run_id: str) -> list[tuple[int, str, float]]:
    """Every metric point of a run as ``(step, name, value)``, sorted."""
    names = client.get_run(run_id).data.metrics
    return sorted((m.step, name, m.value) for name in names for m in client.get_metric_history(run_id, name))


def _artifacts(client: Any, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return out


@pytest.mark.slow
def test_mlflow_logs_the_scalars_images_recipe_and_final_metrics(tmp_path, mlflow_store):
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    mlflow = ["logging.mlflow.enabled=true", f"logging.mlflow.tracking_uri={mlflow_store}", "logging.image_every=1"]
    assert train(ADVPROP, run, "trainer.max_steps=2", "optim.lr=0.05", *mlflow) == 0
    ids = read_tracker_ids(run)["mlflow"]
    assert ids["tracking_uri_sha256"] == hashlib.sha256(mlflow_store.encode()).hexdigest()  # never the URI itself
    assert mlflow_store not in (run / "trackers.json").read_text()
    client = MlflowClient(mlflow_store)
    logged = client.get_run(ids["run_id"])
    assert logged.info.status == "FINISHED" and logged.info.run_name == "run"
    assert client.get_experiment(logged.info.experiment_id).name == "mbn"
    points = _mlflow_metrics(client, ids["run_id"])
    rows = sorted(read_scalars(run / "scalars.csv"))
    assert [p for p in points if not p[1].startswith("final/")] == rows  # every tag and step, bit for bit
    metrics = json.loads((run / "metrics.json").read_text())
    assert logged.data.metrics["final/test_acc_main"] == metrics["test_acc_main"]
    assert logged.data.params["optim.lr"] == "0.05" and logged.data.params["data.batch_size"] == "16"
    assert logged.data.params["domains.adv.type"] == "pgd"
    artifacts = _artifacts(client, ids["run_id"])
    assert {"recipe.yaml", "metrics.json", "samples/clean/step_00000001.png", "samples/adv/step_00000002.png"} <= (
        artifacts
    )
    images = {path.rsplit("/", 1)[0] for path in artifacts if path.endswith(".png")}
    assert images == tensorboard_images(run / "tb")  # the same image tags as TensorBoard's
    recipe = Path(client.download_artifacts(ids["run_id"], "recipe.yaml", str(tmp_path)))
    assert yaml.safe_load(recipe.read_text())["optim"]["lr"] == 0.05


@pytest.mark.slow
def test_mlflow_resume_continues_the_same_run(tmp_path, mlflow_store):
    from mlflow.tracking import MlflowClient

    from mbn.cli.train import main as train_main

    run = tmp_path / "run"
    mlflow = ["logging.mlflow.enabled=true", f"logging.mlflow.tracking_uri={mlflow_store}"]
    assert train(VANILLA, run, "trainer.max_steps=2", *mlflow) == 0
    run_id = read_tracker_ids(run)["mlflow"]["run_id"]
    assert train_main(["--resume", str(run), "trainer.max_steps=4"]) == 0
    assert read_tracker_ids(run)["mlflow"]["run_id"] == run_id
    client = MlflowClient(mlflow_store)
    assert [r.info.run_id for r in client.search_runs([client.get_run(run_id).info.experiment_id])] == [run_id]
    assert client.get_run(run_id).info.status == "FINISHED"
    points = [p for p in _mlflow_metrics(client, run_id) if not p[1].startswith("final/")]
    assert points == sorted(read_scalars(run / "scalars.csv"))


def test_mlflow_resume_does_not_send_again_the_steps_the_run_holds(tmp_path, mlflow_store):
    from mlflow.tracking import MlflowClient

    from mbn.mlflowlog import MlflowLogger

    section = _logging(mlflow={"enabled": True, "tracking_uri": mlflow_store}).mlflow
    first = MlflowLogger(section, tmp_path)
    first.start(["clean"], ["clean"], False)
    for step in (1, 2, 3, 4):
        first.scalars({"loss/clean": float(step)}, step)
    first.images({"samples/clean": torch.zeros(3, 4, 4)}, 4)
    first.close()  # stopped before its end (no final metrics): KILLED
    run_id = read_tracker_ids(tmp_path)["mlflow"]["run_id"]
    client = MlflowClient(mlflow_store)
    assert client.get_run(run_id).info.status == "KILLED"

    resumed = MlflowLogger(section, tmp_path)  # a resume from the checkpoint at step 2
    resumed.resume_at(2)
    resumed.start(["clean"], ["clean"], False)
    assert client.get_run(run_id).info.status == "RUNNING"
    for step in (3, 4, 5):
        resumed.scalars({"loss/clean": 10.0 * step}, step)
    resumed.final({"steps": 5, "test_acc_main": 0.5})
    resumed.close()
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "loss/clean")]
    assert sorted(history) == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0)]  # each step once
    assert client.get_run(run_id).info.status == "FINISHED"
    assert client.get_run(run_id).data.metrics["final/test_acc_main"] == 0.5
