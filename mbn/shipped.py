"""The recipes shipped with mbn: found by name from any directory (``mbn-train quickstart``), listed with their purpose.

In a wheel they are package data (``mbn/recipes/*.yaml``); in a source checkout (an editable install) they are the
repository's ``recipes/`` folder.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def recipes_dir() -> Path:
    """The folder holding the shipped recipes."""
    packaged = Path(str(files("mbn"))) / "recipes"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "recipes"


def shipped_recipes() -> dict[str, Path]:
    """Name -> file of every shipped recipe (``base`` is a building block, not a recipe to run)."""
    return {p.stem: p for p in sorted(recipes_dir().glob("*.yaml")) if p.stem != "base"}


def recipe_purpose(path: Path) -> str:
    """The first comment line of a recipe: what it trains."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def resolve_recipe(name_or_path: str | Path) -> Path:
    """A recipe file: ``name_or_path`` itself when it exists, else the shipped recipe of that name (``.yaml`` optional).

    An unknown name comes back unchanged, for the loader to report as a missing file.
    """
    path = Path(name_or_path)
    if path.is_file() or len(path.parts) != 1:
        return path
    return shipped_recipes().get(path.name.removesuffix(".yaml").removesuffix(".yml"), path)
