"""Weights & Biases output of a training run (``logging.wandb``; ``pip install wandb``).

One W&B run per mbn run, made when a session starts (after ``config.yaml`` is written, before the clock of the
first step starts): ``wandb.init(project, entity, name, mode, tags, dir=RUN_DIR)``, so W&B's files go to
``RUN_DIR/wandb/`` (``offline-run-*`` in offline mode: ``wandb sync RUN_DIR/wandb/offline-run-*`` uploads them).
Its id is kept in ``RUN_DIR/trackers.json``; a resumed run continues it (``resume="allow"``).

What it logs: every scalar under its canonical tag (``loss/clean``, ``acc_test/adv``, ...) at the trainer's step
(W&B's own step is the trainer's, so nothing of the trainer's stepping or timing changes); the image grids and BN
divergence plots as ``wandb.Image``; the recipe as written as the run's config, and its YAML as the file
``recipe.yaml``; the numeric leaves of ``metrics.json`` in the run's summary (``final/test_acc_main``, ...).

W&B keeps one value per step and refuses a step below its last: a resumed run does not log again the steps after
its checkpoint that W&B already holds (an online run knows its last step; the values are those of the first
session, which a deterministic resume trains again bit for bit).
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from mbn.logger import RunLogger
from mbn.tracker_runs import final_metrics, image_array, read_tracker_ids, run_name, write_tracker_ids

#: The file the recipe's YAML is saved as, in the W&B run's files.
RECIPE_FILE = "recipe.yaml"


class WandbLogger(RunLogger):
    """Log a run to Weights & Biases; the W&B run starts on the first call that writes (a session's start).

    Args:
        cfg: The recipe's ``logging.wandb`` section (``project``, ``entity``, ``name``, ``mode``, ``tags``).
        run_dir: The run directory: W&B writes under ``RUN_DIR/wandb/``; the run id goes in ``trackers.json``.
    """

    name = "W&B"
    wants_images = True

    def __init__(self, cfg: Any, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.project = str(cfg.project)
        self.entity = str(cfg.entity) if cfg.entity else None
        self.run_name = run_name(cfg.name, self.run_dir)
        self.mode = str(cfg.mode) if cfg.mode else None  # None: W&B's own (WANDB_MODE, else online)
        self.tags = [str(tag) for tag in (cfg.tags or [])]
        self._run: Any = None  # the wandb Run, once started
        self._finished = False  # final() came: the run ended well

    def run(self) -> Any:
        """The W&B run, started (or resumed, with the id in ``trackers.json``) on first use."""
        if self._run is None:
            import wandb

            run_id = read_tracker_ids(self.run_dir).get("wandb", {}).get("id")
            if not isinstance(run_id, str) or not run_id:
                run_id = new_run_id()
                write_tracker_ids(self.run_dir, "wandb", {"id": run_id})  # before W&B writes: a resume finds it
            settings: dict[str, Any] = {
                "project": self.project,
                "entity": self.entity,
                "name": self.run_name,
                "tags": self.tags,
                "dir": str(self.run_dir),
                "id": run_id,
                "resume": "allow",
                "reinit": "create_new",  # beside any run the calling script has open: each logs through its object
            }
            if self.mode is not None:  # given, it overrides WANDB_MODE
                settings["mode"] = self.mode
            self._run = wandb.init(**settings)
        return self._run

    def start(self, domains: Sequence[str], sources: Sequence[str], divergence: bool) -> None:
        """Start (or resume) the W&B run, before the session's first step."""
        self.run()

    def recipe(self, recipe: Mapping[str, Any], text: str) -> None:
        """The recipe as written as the run's config, and its YAML as the run's file ``recipe.yaml``."""
        run = self.run()
        run.config.update(dict(recipe), allow_val_change=True)
        path = Path(run.dir) / RECIPE_FILE
        path.write_text(text, encoding="utf-8")
        run.save(str(path), base_path=run.dir, policy="now")

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """``{tag: value}`` at the trainer's ``step`` (a step below W&B's last, after a resume, is left out)."""
        run = self.run()
        if step >= run.step:
            run.log({tag: float(value) for tag, value in values.items()}, step=step)

    def images(self, images: Mapping[str, Tensor], step: int) -> None:
        """Each ``{tag: image}`` as a ``wandb.Image`` at ``step``."""
        import wandb

        run = self.run()
        if step >= run.step:
            run.log({tag: wandb.Image(image_array(image)) for tag, image in images.items()}, step=step)

    def final(self, metrics: Mapping[str, Any]) -> None:
        """``metrics.json``'s numeric leaves in the run's summary (``final/test_acc_main``, ``final/steps``, ...)."""
        self.run().summary.update(final_metrics(metrics))
        self._finished = True

    def close(self) -> None:
        """Finish the W&B run: exit code 0 after :meth:`final`, 1 when the run stopped before its end."""
        run, self._run = self._run, None
        if run is not None:
            run.finish(exit_code=0 if self._finished else 1)


def new_run_id() -> str:
    """A fresh W&B run id: 16 lowercase letters and digits."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(16))
