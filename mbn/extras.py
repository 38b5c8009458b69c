"""Optional dependencies: what needs ``pip install "mbn-advprop[robustness]"``, said in one line when it is missing."""

from __future__ import annotations

import importlib.util

from mbn.config import RecipeError

ROBUSTNESS = "mbn-advprop[robustness]"
TORCHATTACKS = 'pip install --no-deps "torchattacks>=3.5"'
"""How to install torchattacks (AutoAttack) without downgrading anything: it pins ``requests~=2.25.1``, a package it
never imports, and what it does need (torch, torchvision, numpy, scipy, tqdm) comes with mbn."""


class MissingExtraError(RecipeError):
    """A feature needs a package of an optional extra that is not installed; the message names the extra."""


def available(module: str) -> bool:
    """Whether ``module`` can be imported (checked without importing it)."""
    return importlib.util.find_spec(module) is not None


def require(module: str, feature: str, extra: str = ROBUSTNESS, install: str | None = None) -> None:
    """Raise :class:`MissingExtraError` unless ``module`` can be imported (checked without importing it).

    Args:
        module: The package's import name.
        feature: What needs it, as the message names it.
        extra: The optional extra that installs it (``pip install "mbn-advprop[EXTRA]"``).
        install: The command to show instead, for a package no extra installs.
    """
    if not available(module):
        command = install or f'pip install "{extra}"'
        raise MissingExtraError(f"{feature} needs the {module!r} package: {command}")
