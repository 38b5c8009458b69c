"""What a resume may change: keys that neither reinterpret the saved position nor change what was trained.

``mbn-train --resume RUN_DIR key=value ...`` compares the resulting recipe with the one stored in the
checkpoint. Keys listed in :data:`RESUMABLE_KEYS` may differ (how long to train, where the data lives,
logging, evaluation, the device, and the learning rate and gradient clipping: the rescue of a run that diverged);
anything else (the model, the data order and batch size, the seed, the domains, the optimiser, the schedule's
shape) is refused with one line naming every such key: start a
new run instead, with ``model.init_from=RUN_DIR`` to begin from its weights.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import MISSING, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mbn.config import DOMAIN_RESERVED_KEYS, DomainSpec, RecipeCfg, RecipeError, with_legacy_values
from mbn.written_recipe import digest_path, lookup, resolve_stored, value_digest

#: Exact keys, or prefixes ending in ``.``, that a resume may change.
RESUMABLE_KEYS: tuple[str, ...] = (
    "trainer.epochs",  # train longer (or shorter): the schedule and domain windows stretch from here on
    "trainer.max_steps",
    "trainer.keep_best_k",  # a lower k trims the ranking; a higher one keeps more from here on
    "trainer.out_dir",
    "trainer.device",
    "trainer.compile",
    "trainer.find_unused_parameters",  # how DDP finds its gradients, not what they are
    "trainer.progress",
    "trainer.log_every",
    "trainer.eval_every",
    "trainer.eval_all_bns",
    "trainer.checkpoint_every_steps",
    "optim.lr",  # a gentler learning rate or clipping to go on from the last good checkpoint after a divergence:
    "schedule.min_lr",  # the schedule keeps its shape and position, scaled from the resumed step on
    "optim.grad_clip",
    "data.root",  # the same data, moved
    "data.test_root",  # webdataset: the same evaluation shards, moved
    "data.download",
    "data.num_workers",
    "data.max_image_pixels",  # refuses images, never changes what is trained
    "data.eval_batch_size",
    "data.test_limit",
    "eval.",
    "logging.",
)


def resumable(key: str) -> bool:
    """True when a resume may change ``key``."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted.key, leaf)`` pairs of a nested mapping; lists are leaves."""
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def changed_keys(trained: Mapping[str, Any], now: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, trained value, new value)`` for every leaf that differs (missing leaves are ``None``)."""
    old, new = dict(flatten(trained)), dict(flatten(now))
    return [(k, old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]


#: The defaults of a domain entry's reserved keys, as :class:`~mbn.config.DomainSpec` declares them.
_RESERVED_DEFAULTS = {
    f.name: f.default for f in fields(DomainSpec) if f.name in DOMAIN_RESERVED_KEYS and f.default is not MISSING
}


def with_domain_defaults(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``recipe`` whose domain entries spell out every default (``weight: 1`` equals no weight)."""
    import inspect

    from mbn.registry import get_domain_class

    out = dict(recipe)
    domains = {}
    for name, entry in (recipe.get("domains") or {}).items():
        full = {**_RESERVED_DEFAULTS, "bn": name}
        try:
            sig = inspect.signature(get_domain_class(str(entry.get("type"))).__init__)
            full.update({k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty})
        except Exception:  # an unknown type is reported by the recipe check itself
            pass
        full.update(entry)
        domains[name] = {k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in full.items()}
    out["domains"] = domains
    return out


def with_schema_defaults(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """``recipe`` on top of the schema's defaults, so keys newer than a stored recipe read as their defaults."""
    try:
        stored = with_legacy_values(dict(recipe))  # a key whose default changed reads as the run had it
        merged = OmegaConf.merge(OmegaConf.structured(RecipeCfg), OmegaConf.create(stored))
        full = OmegaConf.to_container(merged, resolve=True)
    except Exception:  # a recipe the schema no longer accepts: compared as stored, so the change is named
        return dict(recipe)
    assert isinstance(full, dict)
    return {str(k): v for k, v in full.items()}


def check_resume_config(
    trained: Mapping[str, Any], cfg: DictConfig, digests: Mapping[str, str] | None = None
) -> list[str]:
    """Refuse a resume whose recipe changes what was trained; returns the (allowed) keys that changed.

    Args:
        trained: the recipe stored in the checkpoint (``ckpt["config"]``).
        cfg: the recipe this resume would run (saved ``config.yaml`` plus command-line overrides).
        digests: the checkpoint's ``interpolated`` entry: SHA-256 of what each interpolation of a key a resume may
            not change resolved to when trained (:func:`mbn.written_recipe.interpolation_digests`).

    Raises:
        RecipeError: naming every key that may not change, with its trained and requested values.
    """
    now = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(now, dict)
    stored = dict(trained)
    trained = resolve_stored(stored)  # its interpolations resolved in this environment
    trained = with_schema_defaults(trained)  # a key added to mbn after the run started keeps its default
    changes = changed_keys(with_domain_defaults(trained), with_domain_defaults({str(k): v for k, v in now.items()}))
    refused = [(k, a, b) for k, a, b in changes if not resumable(k)]
    for entry, digest in (digests or {}).items():  # an interpolation this environment resolves otherwise
        path = digest_path(entry)
        key = ".".join(map(str, path))
        _, value = lookup(now, path)
        if not resumable(key) and value_digest(value) != digest and key not in {k for k, _, _ in refused}:
            refused.append((key, f"{lookup(stored, path)[1]} as trained", value))
    if list(trained.get("domains") or {}) != list(now.get("domains") or {}):  # order sets the BN sources
        refused.append(("domains (order)", list(trained.get("domains") or {}), list(now.get("domains") or {})))
    if refused:
        listed = ", ".join(f"{k} ({a!r} -> {b!r})" for k, a, b in refused)
        raise RecipeError(
            f"resume cannot change {listed}: it changes what was trained; start a new run "
            "(model.init_from=RUN_DIR starts from this run's weights)"
        )
    return [k for k, _, _ in changes]
