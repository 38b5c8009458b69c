"""The layout keeps the architecture: small classes, one recipe reader in mbn/train, the 0.3 import paths kept."""

from __future__ import annotations

import ast
from pathlib import Path

MBN = Path(__file__).resolve().parents[1] / "mbn"
MAX_CLASS_LINES = 250


def test_no_class_in_mbn_is_longer_than_250_lines():
    sizes = {}
    for path in MBN.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                sizes[f"{path.relative_to(MBN.parent)}:{node.name}"] = node.end_lineno - node.lineno + 1
    too_long = {name: n for name, n in sizes.items() if n > MAX_CLASS_LINES}
    assert not too_long, too_long
    assert max(sizes.values()) > 100  # the walk found the classes


def _recipe_reads(path: Path) -> list[str]:
    """``cfg.<section>`` attribute reads in a module (the recipe's sections by name)."""
    sections = {"trainer", "data", "model", "optim", "schedule", "logging", "ema", "domains", "eval"}
    reads = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute) or node.attr not in sections:
            continue
        owner = node.value  # cfg.trainer, self.cfg.trainer, recipe.data
        name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else ""
        if name in ("cfg", "recipe"):
            reads.append(f"{path.name}:{node.lineno} {name}.{node.attr}")
    return reads


def test_the_builder_is_the_only_reader_of_the_recipe_in_mbn_train():
    readers = {p.name: _recipe_reads(p) for p in (MBN / "train").glob("*.py")}
    assert readers["build.py"], "the walk finds the builder's reads"
    others = [read for name, reads in readers.items() if name != "build.py" for read in reads]
    assert not others, others


def test_the_0_3_import_paths_still_work(tmp_path):
    from mbn.checkpoint import CheckpointError, load_checkpoint
    from mbn.engine import Trainer, TrainState, step_seed
    from mbn.train.checkpoints import CheckpointError as Owned
    from mbn.train.runtime import step_seed as owned_seed

    assert CheckpointError is Owned and step_seed is owned_seed and callable(load_checkpoint)
    assert TrainState().step == 0 and callable(Trainer)
