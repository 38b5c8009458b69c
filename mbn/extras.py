"""Optional dependencies: what needs ``pip install "mbn-advprop[robustness]"``, said in one line when it is missing."""

from __future__ import annotations

import importlib.util

from mbn.config import RecipeError

ROBUSTNESS = "mbn-advprop[robustness]"


class MissingExtraError(RecipeError):
    """A feature needs a package of an optional extra that is not installed; the message names the extra."""


def require(module: str, feature: str, extra: str = ROBUSTNESS) -> None:
    """Raise :class:`MissingExtraError` unless ``module`` can be imported (checked without importing it)."""
    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(f'{feature} needs the {module!r} package: pip install "{extra}"')
