"""The recipe as mbn writes it: resolved values, except that interpolations stay interpolations.

A run trains with its recipe fully resolved, but what it writes (``config.yaml``, the checkpoints' ``config`` entry,
the recipe text in TensorBoard) keeps every leaf that was an interpolation in the recipe as its text, e.g.
``${oc.env:HF_TOKEN}`` or ``${oc.env:DATA}/imagenet``: a secret or a machine's path read from the environment never
lands in a file, and a resume on another machine resolves it there. :func:`remember_interpolations` notes them
before :func:`mbn.config.load_recipe` resolves the recipe; :func:`recipe_as_written` gives what to write;
:func:`resolve_stored` reads a stored recipe back with its interpolations resolved where the environment allows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

Path = tuple[str | int, ...]

#: The attribute of a loaded recipe that holds its interpolations: ``{path: (text, resolved value)}``.
_ATTRIBUTE = "_mbn_interpolations"


def interpolated_leaves(node: DictConfig | ListConfig, prefix: Path = ()) -> dict[Path, str]:
    """``{path: text}`` of every leaf of ``node`` (unresolved) that is an interpolation."""
    out: dict[Path, str] = {}
    keys: list[Any] = list(range(len(node))) if isinstance(node, ListConfig) else list(node.keys())
    for key in keys:
        path: Path = (*prefix, key)
        if OmegaConf.is_interpolation(node, key):
            out[path] = str(node._get_node(key)._value())  # type: ignore[union-attr]
            continue
        child = node._get_node(key)
        if isinstance(child, (DictConfig, ListConfig)) and not child._is_none() and not child._is_missing():
            out.update(interpolated_leaves(child, path))
    return out


def remember_interpolations(cfg: DictConfig, leaves: dict[Path, str]) -> None:
    """Attach ``leaves`` (found before resolving) to the resolved ``cfg``, with the values they resolved to."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    remembered = {}
    for path, text in leaves.items():
        found, value = _lookup(resolved, path)
        if found:
            remembered[path] = (text, value)
    object.__setattr__(cfg, _ATTRIBUTE, remembered)


def recipe_as_written(cfg: DictConfig) -> dict[str, Any]:
    """``cfg`` as a plain dict to write: resolved, but each remembered interpolation as its text.

    A leaf changed after loading (its value no longer what the interpolation gave) is written as it is now.
    """
    out = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(out, dict)
    for path, (text, value) in getattr(cfg, _ATTRIBUTE, {}).items():
        found, now = _lookup(out, path)
        if found and now == value:
            _assign(out, path, text)
    return {str(k): v for k, v in out.items()}


def recipe_yaml(cfg: DictConfig) -> str:
    """:func:`recipe_as_written` as YAML."""
    return OmegaConf.to_yaml(OmegaConf.create(recipe_as_written(cfg)))


def interpolation_digests(cfg: DictConfig, keep: Callable[[str], bool]) -> dict[str, str]:
    """``{path: SHA-256 of its resolved value}`` for the remembered interpolations whose dotted key ``keep`` selects.

    A checkpoint stores these for the keys a resume may not change, so a resume whose environment resolves one of
    them otherwise is refused, without the value itself ever being written. ``path`` is the key's parts as a JSON
    list (a key may hold dots, e.g. a suite label): :func:`digest_path` reads it back.
    """
    out = {}
    for path, (_, value) in getattr(cfg, _ATTRIBUTE, {}).items():
        if keep(".".join(map(str, path))):
            out[json.dumps(list(path))] = value_digest(value)
    return out


def digest_path(key: str) -> Path:
    """The path of an :func:`interpolation_digests` key (older checkpoints: a dotted key)."""
    try:
        parts = json.loads(key)
    except ValueError:
        parts = None
    if isinstance(parts, list) and all(isinstance(p, (str, int)) for p in parts):
        return tuple(parts)
    return tuple(key.split("."))


def lookup(tree: Any, path: Path) -> tuple[bool, Any]:
    """``(found, value)`` of ``path`` in a plain nested dict/list."""
    return _lookup(tree, path)


def value_digest(value: Any) -> str:
    """SHA-256 of a recipe value (its JSON, keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def resolve_stored(recipe: Any) -> Any:
    """A stored recipe (a checkpoint's ``config``) with its interpolations resolved where possible.

    Each interpolated leaf is resolved on its own against the whole recipe and this environment; one that cannot
    be (an unset variable) stays as its text, so reading an old run never fails on a value it does not need.
    """
    if not isinstance(recipe, dict):
        return recipe
    try:
        cfg = OmegaConf.create(recipe)
        leaves = interpolated_leaves(cfg)
    except (OmegaConfBaseException, ValueError, TypeError):
        return recipe
    if not leaves:
        return recipe
    out = OmegaConf.to_container(cfg, resolve=False)
    for path in leaves:
        try:
            node: Any = cfg
            for key in path[:-1]:  # node by node: a key may hold dots
                node = node[key]
            value = node[path[-1]]
        except (OmegaConfBaseException, ValueError, TypeError, KeyError, IndexError):
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        _assign(out, path, value)
    return out


def _lookup(tree: Any, path: Path) -> tuple[bool, Any]:
    node: Any = tree
    for key in path:
        in_list = isinstance(node, list) and isinstance(key, int) and key < len(node)
        if not (in_list or (isinstance(node, dict) and key in node)):
            return False, None
        node = node[key]
    return True, node


def _assign(tree: Any, path: Path, value: Any) -> None:
    node: Any = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
