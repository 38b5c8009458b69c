"""User modules a recipe imports before its domains are looked up (``imports:`` and ``mbn-train --import``).

A domain registered with ``@mbn.register_domain`` in the user's own file (``./my_domains.py``) needs its module
imported before the recipe names the domain; ``imports: [my_domains]`` does it, so no launcher script is needed.
The key is stored in the run's ``config.yaml`` and checkpoints, so ``mbn-train --resume`` and ``mbn-eval`` import
the modules again. The current directory is importable, as under ``python -m``.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable
from pathlib import PurePath
from types import ModuleType

from mbn.errors import RecipeError, first_line

#: How a failure names where a module came from: the recipe key, or the command-line option.
RECIPE_KEY = "key 'imports'"
CLI_OPTION = "--import"


def check_module_name(name: object, source: str = RECIPE_KEY) -> str:
    """A dotted module name (``my_domains``, ``pkg.domains``), not a file path.

    Raises:
        RecipeError: anything else, naming ``source``.
    """
    is_file = isinstance(name, str) and name.endswith(".py")  # pkg.py would be a module named py: never meant
    if isinstance(name, str) and not is_file and name and all(part.isidentifier() for part in name.split(".")):
        return name
    hint = ""
    if is_file:
        module = PurePath(str(name)).with_suffix("").as_posix().removeprefix("./").replace("/", ".")
        hint = f" (a module name, not a file: {module!r})"
    raise RecipeError(f"{_where(source, name)}: expected a module name such as my_domains or pkg.domains{hint}")


def import_user_modules(names: Iterable[str], source: str = RECIPE_KEY) -> list[ModuleType]:
    """Import each module in ``names`` (already imported ones are not run again), in order.

    The working directory is put first on ``sys.path`` (when absent), so ``my_domains`` finds ``./my_domains.py``.

    Args:
        names: module names.
        source: where they came from, for messages: :data:`RECIPE_KEY` or :data:`CLI_OPTION`.

    Raises:
        RecipeError: one line naming the first module that is not a module name or fails to import, with the
            exception it raised, e.g. ``--import my_domains: ModuleNotFoundError: No module named 'my_domains'``.
    """
    names = [check_module_name(name, source) for name in names]
    if not names:
        return []
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except Exception as err:
            raise RecipeError(f"{_where(source, name)}: {type(err).__name__}: {first_line(err)}") from err
    return modules


def _where(source: str, name: object) -> str:
    return f"{source} {name}" if source.startswith("--") else f"{source}: {name}"
