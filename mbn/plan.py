"""One validation pass over a recipe before anything heavy (no dataset read, no model built).

:func:`plan_run` checks, in this order, what a recipe asks for: the domains (types, parameters,
``input`` links, the heads they need and the objectives that score them), the ``start``/``end`` windows
(every step needs an active domain), the model name and ``model.init_from``, the device and the data paths.
Each failure is a :class:`~mbn.config.RecipeError` naming the key. The resulting :class:`RunPlan` holds
the built domains, so the trainer does not build them twice.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from mbn.builders import build_domains, check_model, resolve_device
from mbn.config import DomainSpec, RecipeError, bn_sources, dependency_order, domain_specs
from mbn.distributed import env_world_size
from mbn.domain import Domain
from mbn.errors import first_line
from mbn.objective import CLASSES, Objective
from mbn.train.checkpoints import CheckpointError, read_checkpoint, resolve_checkpoint
from mbn.validators import is_int

#: Where torchvision's CIFAR loaders expect their extracted archives under ``data.root``.
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


@dataclass
class RunPlan:
    """What a validated recipe trains: domains in dependency order, BN sources, heads and objectives."""

    specs: list[DomainSpec]
    sources: tuple[str, ...]
    domains: dict[str, Domain]
    objectives: dict[str, Objective]
    heads: dict[str, int]
    device: torch.device
    init_checkpoint: dict[str, Any] | None = None
    init_path: Path | None = None


def plan_run(cfg: DictConfig, *, resume: bool = False) -> RunPlan:
    """Validate everything a training run needs before its data is read.

    A resume does not read ``model.init_from`` (its own checkpoint supersedes it; the source may be gone).

    Raises:
        RecipeError: the first problem found, naming its key.
    """
    specs = domain_specs(cfg)
    domains = build_domains(specs)
    check_windows(specs)
    heads = collect_heads(specs, domains)
    default = Objective(label_smoothing=float(cfg.optim.label_smoothing))
    objectives = {s.name: domains[s.name].objective(default) for s in specs}
    for name, objective in objectives.items():
        if objective.head != CLASSES and objective.head not in heads:
            raise RecipeError(
                f"key 'domains.{name}': scored by head {objective.head!r}, which no domain declares in heads()"
            )
    for spec in specs:  # a domain gets its input domain's targets as labels: they must be for its own head
        if spec.input is None:
            continue
        given, wanted = objectives[spec.input].head, objectives[spec.name].head
        if given != CLASSES and wanted == CLASSES:
            raise RecipeError(
                f"key 'domains.{spec.name}.input': {spec.input!r} produces targets for head {given!r}, but "
                f"{spec.name!r} is scored by the class labels; take its input from a class-labelled domain"
            )
    check_model(cfg)
    init_path, init_checkpoint = None, None
    if cfg.model.get("init_from") and not resume:
        init_path, init_checkpoint = read_init_checkpoint(str(cfg.model.init_from))
    device = resolve_device(cfg.trainer.device)
    if cfg.trainer.sync_bn and device.type == "cpu" and env_world_size() > 1:
        raise RecipeError(
            "key 'trainer.sync_bn': SyncBatchNorm needs CUDA devices under torchrun; on CPU (gloo) train with "
            "trainer.sync_bn=false (each rank normalises with its own batch statistics)"
        )
    check_dataset_present(cfg.data)
    sources = bn_sources(specs)
    return RunPlan(dependency_order(specs), sources, domains, objectives, heads, device, init_checkpoint, init_path)


def check_windows(specs: list[DomainSpec]) -> None:
    """Every fraction of training in [0, 1) lies in some domain's ``[start, end)`` window."""
    covered = 0.0
    for spec in sorted(specs, key=lambda s: s.start):
        if spec.start > covered:
            break
        covered = max(covered, spec.end)
    if covered < 1.0:
        gap_end = min((s.start for s in specs if s.start > covered), default=1.0)
        raise RecipeError(
            f"key 'domains': no domain is active for training fractions [{covered:g}, {gap_end:g}); "
            "every step needs at least one (adjust the domains' start/end)"
        )


def collect_heads(specs: list[DomainSpec], domains: dict[str, Domain]) -> dict[str, int]:
    """The auxiliary heads every domain asks for; two domains asking for one name with two sizes is an error."""
    heads: dict[str, int] = {}
    owner: dict[str, str] = {}
    for spec in specs:
        try:
            asked = dict(domains[spec.name].heads())
        except (Exception, SystemExit, KeyboardInterrupt) as err:  # a plugin's heads() failing
            raise RecipeError(
                f"key 'domains.{spec.name}': its heads() raised {type(err).__name__}: {first_line(err)}"
            ) from None
        for head, size in asked.items():
            if head == CLASSES or not isinstance(head, str) or not head.isidentifier():
                raise RecipeError(f"key 'domains.{spec.name}': head name {head!r} is reserved or not an identifier")
            if not is_int(size, low=1):
                raise RecipeError(f"key 'domains.{spec.name}': head {head!r} needs a positive size, got {size!r}")
            if head in heads and heads[head] != size:
                raise RecipeError(
                    f"key 'domains.{spec.name}': head {head!r} with {size} outputs, "
                    f"but domain {owner[head]!r} asks for {heads[head]}"
                )
            heads[head], owner[head] = size, owner.get(head, spec.name)
    return heads


def check_dataset_present(data: DictConfig) -> None:
    """The dataset the recipe names is on disk under ``data.root`` (or will be downloaded); nothing is read.

    The loading-mode keys were checked when the recipe loaded (:func:`mbn.config.check_preload_keys`).
    """
    root = Path(str(data.root))
    if data.name == "imagefolder" and not _is_folder(root / "train"):
        raise RecipeError(f"key 'data.root': imagefolder expects {root}/train/<class>/*; directory not found")
    if data.name in CIFAR_FOLDERS and not data.download and not (root / CIFAR_FOLDERS[data.name]).is_dir():
        raise RecipeError(
            f"key 'data.root': {data.name} not found under {str(root)!r} (expected {CIFAR_FOLDERS[data.name]}/ "
            "there; set data.download=true to fetch it)"
        )


def _is_folder(path: Path) -> bool:
    """Whether ``path`` is a directory; one that cannot be reached names its parent and the errno's words."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except PermissionError as err:  # no search permission on data.root: not "directory not found"
        raise RecipeError(f"key 'data.root': cannot read folder {path.parent} ({err.strerror})") from None
    except OSError:
        return False


def read_init_checkpoint(path: str) -> tuple[Path, dict[str, Any]]:
    """The checkpoint ``model.init_from`` names (a run directory or a checkpoint file), read safely."""
    try:
        ckpt_path, _ = resolve_checkpoint(Path(path))
        return ckpt_path, dict(read_checkpoint(ckpt_path, "init"))
    except CheckpointError as err:
        raise RecipeError(f"key 'model.init_from': {err}") from None
