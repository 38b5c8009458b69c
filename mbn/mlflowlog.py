"""MLflow output of a training run (``logging.mlflow``; ``pip install mlflow``).

One MLflow run per mbn run, in the experiment ``logging.mlflow.experiment`` (created if missing) of the tracking
store ``logging.mlflow.tracking_uri`` (MLflow's default when unset: ``MLFLOW_TRACKING_URI``, else MLflow's own
local default), made when a session starts (after ``config.yaml`` is written, before the first step's clock
starts). Everything goes through one ``MlflowClient``, never MLflow's global active run, so a script's own MLflow
run and several trainers in one process do not meet. The run id and tracking URI are kept in
``RUN_DIR/trackers.json``; a resumed run continues the same MLflow run (status back to RUNNING).

What it logs: every scalar as a metric under its canonical tag (``loss/clean``, ``acc_test/adv``, ...) at the
trainer's step, sent in the background to a server (MLflow's asynchronous logging, so a remote server's latency
does not slow training) and written in place to a local file store (whose asynchronous batches race creating a
metric's folder); the image grids and divergence plots as PNG artifacts ``<tag>/step_<step>.png``; the recipe as
written flattened to parameters (``optim.lr``, ``domains.adv.eps``; lists as JSON, text cut at MLflow's 6000
characters) and its YAML as the artifact ``recipe.yaml``; the numeric leaves of ``metrics.json`` as metrics
(``final/test_acc_main``, ...) and ``metrics.json`` itself as an artifact. The run ends FINISHED after the final
metrics, KILLED when the session stopped before them (an interruption or an error; a resume reopens it).

MLflow keeps every point it is sent, two at one step included; a resumed run does not send again the steps after
its checkpoint that the run already holds (a deterministic resume trains them again bit for bit).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from torch import Tensor

from mbn.logger import RunLogger
from mbn.tracker_runs import (
    final_metrics,
    image_array,
    path_name,
    read_tracker_ids,
    run_name,
    uri_digest,
    write_tracker_ids,
)

#: MLflow's longest parameter value; a longer one is cut, with an ellipsis.
PARAM_CHARS = 6000
#: MLflow's most metrics and parameters per ``log_batch`` call.
METRICS_PER_BATCH, PARAMS_PER_BATCH = 1000, 100
#: Unfinished background batches kept before the oldest are waited for.
PENDING = 64


class MlflowLogger(RunLogger):
    """Log a run to MLflow; the MLflow run starts on the first call that writes (a session's start).

    Args:
        cfg: The recipe's ``logging.mlflow`` section (``tracking_uri``, ``experiment``, ``run_name``).
        run_dir: The run directory: the run id goes in ``RUN_DIR/trackers.json``.
    """

    name = "MLflow"
    wants_images = True

    def __init__(self, cfg: Any, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.tracking_uri = str(cfg.tracking_uri) if cfg.tracking_uri else None
        self.experiment = str(cfg.experiment)
        self.run_name = run_name(cfg.run_name, self.run_dir)
        self.client: Any = None  # an MlflowClient, once the run started
        self.run_id: str | None = None
        self.synchronous = False  # a local file store is written in place (see run())
        self._logged_through = -1  # a resumed run: the last step the MLflow run holds metrics of
        self._pending: list[Any] = []  # RunOperations of background batches
        self._finished = False

    # --------------------------------------------------------------------------------------- the run
    def run(self) -> tuple[Any, str]:
        """``(client, run_id)``: the MLflow run, created (or reopened: the id in ``trackers.json``) on first use."""
        if self.run_id is None:
            import mlflow
            from mlflow.tracking import MlflowClient

            uri = self.tracking_uri or mlflow.get_tracking_uri()
            client = MlflowClient(uri)
            stored = read_tracker_ids(self.run_dir).get("mlflow", {})
            digest = uri_digest(uri)  # the URI may hold credentials: only its SHA-256 is written
            run_id = stored.get("run_id") if stored.get("tracking_uri_sha256") == digest else None
            if run_id is not None and self._reopen(client, str(run_id)):
                self.client, self.run_id = client, str(run_id)
            else:
                experiment = client.get_experiment_by_name(self.experiment)
                experiment_id = experiment.experiment_id if experiment is not None else _create(client, self.experiment)
                tags = {"mbn.run_dir": str(self.run_dir.resolve())}
                run = client.create_run(experiment_id, run_name=self.run_name, tags=tags)
                self.client, self.run_id = client, run.info.run_id
                write_tracker_ids(self.run_dir, "mlflow", {"run_id": self.run_id, "tracking_uri_sha256": digest})
            # a local file store: written in place (MLflow's asynchronous batches race there creating a metric's
            # folder, "File exists"; and there is no server latency to hide)
            self.synchronous = urlparse(uri).scheme in ("", "file")
        assert self.run_id is not None
        return self.client, self.run_id

    def _reopen(self, client: Any, run_id: str) -> bool:
        """Reopen the stored run (status RUNNING), noting the last step it holds; False when it is gone."""
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(run_id)
        except MlflowException as err:
            if getattr(err, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        if run.info.lifecycle_stage != "active":  # deleted in the UI: start a new one
            return False
        client.update_run(run_id, status="RUNNING")
        steps = (m.step for key in run.data.metrics for m in client.get_metric_history(run_id, key))
        self._logged_through = max(steps, default=-1)
        return True

    def resume_at(self, step: int) -> None:
        """Nothing to hide: the steps after ``step`` that the MLflow run holds are not sent again."""

    def start(self, domains: Sequence[str], sources: Sequence[str], divergence: bool) -> None:
        """Create (or reopen) the MLflow run, before the session's first step."""
        self.run()

    # ------------------------------------------------------------------------------------------ logs
    def recipe(self, recipe: Mapping[str, Any], text: str) -> None:
        """The recipe flattened to parameters (``optim.lr``), and its YAML as the artifact ``recipe.yaml``."""
        from mlflow.entities import Param

        client, run_id = self.run()
        params = [Param(path_name(key), value) for key, value in recipe_params(recipe).items()]
        for i in range(0, len(params), PARAMS_PER_BATCH):
            client.log_batch(run_id, params=params[i : i + PARAMS_PER_BATCH])
        client.log_text(run_id, text, "recipe.yaml")

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Each ``{tag: value}`` as a metric at ``step``, sent in the background."""
        if step > self._logged_through:
            self._log_metrics(values, step)

    def _log_metrics(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        client, run_id = self.run()
        now = int(time.time() * 1000)
        metrics = [Metric(path_name(tag), float(value), now, int(step)) for tag, value in values.items()]
        for i in range(0, len(metrics), METRICS_PER_BATCH):
            done = client.log_batch(run_id, metrics=metrics[i : i + METRICS_PER_BATCH], synchronous=self.synchronous)
            if done is not None:
                self._pending.append(done)
        if len(self._pending) > PENDING:  # long sent: waiting only collects their errors
            waited, self._pending = self._pending[: PENDING // 2], self._pending[PENDING // 2 :]
            for operations in waited:
                operations.wait()

    def images(self, images: Mapping[str, Tensor], step: int) -> None:
        """Each ``{tag: image}`` as the PNG artifact ``<tag>/step_<step>.png`` (a resumed run's replaces it)."""
        client, run_id = self.run()
        for tag, image in images.items():
            client.log_image(run_id, image_array(image), artifact_file=f"{path_name(tag)}/step_{step:08d}.png")

    def final(self, metrics: Mapping[str, Any]) -> None:
        """``metrics.json``'s numeric leaves as metrics at the last step, and the file as an artifact."""
        client, run_id = self.run()
        step = metrics.get("steps")
        self._log_metrics(final_metrics(metrics), int(step) if isinstance(step, int) else 0)
        client.log_dict(run_id, json.loads(json.dumps(dict(metrics), default=str)), "metrics.json")
        self._finished = True

    def flush(self) -> None:
        """Wait for the metrics sent in the background (raising their error, if any)."""
        pending, self._pending = self._pending, []
        for operations in pending:
            operations.wait()

    def close(self) -> None:
        """Send what is pending and end the run: FINISHED after :meth:`final`, else KILLED (resumable)."""
        if self.run_id is None:
            return
        client, run_id = self.client, self.run_id
        self.client, self.run_id = None, None
        try:
            self.flush()
        finally:
            client.set_terminated(run_id, "FINISHED" if self._finished else "KILLED")


def _create(client: Any, name: str) -> str:
    """Create experiment ``name``; another process creating it first is fine."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.create_experiment(name))
    except MlflowException:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return str(experiment.experiment_id)


def recipe_params(recipe: Mapping[str, Any]) -> dict[str, str]:
    """The recipe's leaves as MLflow parameters ``{"section.key": text}``: numbers as written, lists as JSON.

    The names are TensorBoard's hyper-parameters' (:func:`mbn.tblog.hparams_of`); values keep their type's text
    (``128``, not ``128.0``) and are cut at :data:`PARAM_CHARS`.
    """
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping) and node:
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
            return
        text = node if isinstance(node, str) else json.dumps(node, default=str)
        out[prefix] = text if len(text) <= PARAM_CHARS else text[: PARAM_CHARS - 1] + "…"

    walk(recipe, "")
    return out
