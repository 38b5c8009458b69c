"""Domain registry: decorator registration plus lazily loaded ``mbn.domains`` entry points.

Strict like torchvision's model registry (a duplicate name raises, naming both origins) with timm's
query API (``create_domain``, ``available_domains``). Every plugin package, the built-in ``mbn_domains``
(the repository's ``domains/`` folder) included, declares ``[project.entry-points."mbn.domains"]
name = "pkg.module:Class"``; a plugin's module is imported on first use of its name, like torch's
compiler-backend registry, and its class carries the ``register_domain`` decorator. The core names no plugin
package: a ``domains.py`` in the working directory changes nothing.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any, TypeVar

from mbn.domain import Domain, build_domain
from mbn.errors import first_line

ENTRY_POINT_GROUP = "mbn.domains"


class PluginLoadError(ValueError):
    """A domain's entry point failed to import (a missing module or attribute, an exception at import)."""


D = TypeVar("D", bound=type[Domain])

_DOMAINS: dict[str, type[Domain]] = {}
_ORIGINS: dict[str, str] = {}
_ENTRY_POINTS: dict[str, EntryPoint] = {}
_discovered = False


def _origin_of(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _claim(name: str, origin: str) -> None:
    """Record that ``origin`` provides ``name``; a different origin already holding it is an error."""
    previous = _ORIGINS.get(name)
    if previous is not None and previous != origin:
        raise ValueError(f"domain {name!r} registered twice: by {previous} and by {origin}")
    _ORIGINS[name] = origin


def register_domain(name: str) -> Callable[[D], D]:
    """Class decorator registering a :class:`~mbn.Domain` under ``name``.

    Examples:
        >>> import mbn
        >>> @mbn.register_domain("identity_example")
        ... class Identity(mbn.Domain):
        ...     def generate(self, images, labels, ctx):
        ...         return images, labels
        >>> "identity_example" in mbn.available_domains()
        True
    """
    if not name or not isinstance(name, str):
        raise ValueError(f"domain name must be a non-empty string, got {name!r}")

    def add(cls: D) -> D:
        if not (isinstance(cls, type) and issubclass(cls, Domain)):
            raise TypeError(f"@register_domain({name!r}) expects a subclass of mbn.Domain, got {cls!r}")
        ep = _ENTRY_POINTS.get(name)
        if ep is not None and ep.value.replace(":", ".") != _origin_of(cls).replace(":", "."):
            raise ValueError(f"domain {name!r} registered twice: by entry point {ep.value} and by {_origin_of(cls)}")
        if ep is None:  # the entry point naming this very class keeps its origin
            _claim(name, _origin_of(cls))
        cls.name = name
        _DOMAINS[name] = cls
        return cls

    return add


def _discover() -> None:
    """Index the ``mbn.domains`` entry points, built-ins (``mbn_domains``) and third parties alike (once)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        origin = f"entry point {ep.value}" + (f" ({dist.name})" if dist is not None else "")
        if ep.name in _DOMAINS:
            if _origin_of(_DOMAINS[ep.name]).replace(":", ".") == ep.value.replace(":", "."):
                continue  # the entry point names the class already registered by its decorator
            raise ValueError(f"domain {ep.name!r} registered twice: by {_ORIGINS[ep.name]} and by {origin}")
        if ep.name in _ENTRY_POINTS and _ENTRY_POINTS[ep.name].value != ep.value:
            raise ValueError(
                f"domain {ep.name!r} registered twice: by entry point {_ENTRY_POINTS[ep.name].value} and by {origin}"
            )
        _ENTRY_POINTS[ep.name] = ep
        _ORIGINS[ep.name] = origin


def available_domains() -> dict[str, str]:
    """Every registered domain name mapped to where it came from (module:Class or entry point)."""
    _discover()
    return dict(sorted(_ORIGINS.items()))


def get_domain_class(name: str) -> type[Domain]:
    """The class registered as ``name``, importing its entry point on first use.

    Raises:
        KeyError: unknown name, with close matches and the registered names.
    """
    _discover()
    if name not in _DOMAINS and name in _ENTRY_POINTS:
        ep = _ENTRY_POINTS[name]
        try:
            cls = ep.load()
        except (Exception, SystemExit, KeyboardInterrupt) as err:  # the plugin's import, not the user's Ctrl-C
            raise PluginLoadError(
                f"{_ORIGINS[name]} of domain type {name!r} failed to load: {type(err).__name__}: {first_line(err)}"
            ) from err
        if not (isinstance(cls, type) and issubclass(cls, Domain)):
            raise TypeError(f"entry point {ep.value} for domain {name!r} is not an mbn.Domain subclass")
        cls.name = name
        _DOMAINS[name] = cls
    if name not in _DOMAINS:
        hint = difflib.get_close_matches(name, list(_ORIGINS), n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise KeyError(f"unknown domain type {name!r}{did_you_mean}; registered: {sorted(_ORIGINS)}")
    return _DOMAINS[name]


def create_domain(name: str, **params: Any) -> Domain:
    """Build the domain registered as ``name`` from its recipe parameters.

    Raises:
        KeyError: unknown domain name.
        ValueError: a parameter the domain does not take, or a bad value.
    """
    return build_domain(get_domain_class(name), name, params)
