"""One validation pass over a recipe before anything heavy (no dataset read, no model built).

:func:`plan_run` checks, in this order, what a recipe asks for: the domains (types, parameters,
``input`` links, the heads they need and the objectives that score them), the ``start``/``end`` windows
(every step needs an active domain), the model name and ``model.init_from``, the device and the data paths.
Each failure is a :class:`~mbn.config.RecipeError` naming the key. The resulting :class:`RunPlan` holds
the built domains, so the trainer does not build them twice. Last, what can never train on this machine is refused
(:func:`check_step_sizes`): a batch or a CIFAR ResNet's weights larger than the device's memory, or a BN source
given one image a step where the network's last BatchNorm layers see one value per channel.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from mbn.budget import matched_epochs
from mbn.builders import build_domains, check_model, resolve_device
from mbn.config import DomainSpec, ModelCfg, RecipeError, bn_sources, dependency_order, domain_specs
from mbn.data.files import evaluation_folder
from mbn.distributed import env_world_size
from mbn.domain import Domain
from mbn.errors import first_line
from mbn.models import build_network, cifar_depth, cifar_resnet_layers
from mbn.objective import CLASSES, Objective
from mbn.trackers import check_trackers
from mbn.train.checkpoints import CheckpointError, read_checkpoint, resolve_checkpoint
from mbn.train.runtime import ONE_VALUE_PER_CHANNEL, size_text
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
    budget_epochs: int | None = None  # trainer.budget_of: the epochs costing what the baseline's would


def plan_run(cfg: DictConfig, *, resume: bool = False) -> RunPlan:
    """Validate everything a training run needs before its data is read.

    A resume does not read ``model.init_from`` (its own checkpoint supersedes it; the source may be gone).

    Raises:
        RecipeError: the first problem found, naming its key.
    """
    check_trackers(cfg.logging)  # a tracker asked for but not installed: refused before anything is read or written
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
    check_step_sizes(cfg, specs, device)
    budget = None  # the baseline recipe read (and any error in it named) before the data is
    if cfg.trainer.budget_of:
        budget = matched_epochs(
            int(cfg.trainer.epochs), specs, domains, str(cfg.trainer.budget_of), repeats=cfg.data.get("aug_repeats")
        )
    sources = bn_sources(specs)
    return RunPlan(
        dependency_order(specs), sources, domains, objectives, heads, device, init_checkpoint, init_path, budget
    )


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
    if data.name == "webdataset":  # brace patterns of tar shards (data.root, data.test_root)
        from mbn.data.shards import check_shards_present

        check_shards_present(data)
    if data.name == "imagefolder" and not _is_folder(root / "train"):
        raise RecipeError(f"key 'data.root': imagefolder expects {root}/train/<class>/*; directory not found")
    if data.name == "imagefolder" and not _is_folder(root / (split := evaluation_folder(data))):
        key = "data.root" if split == "test" else "data.test_split"
        raise RecipeError(f"key '{key}': imagefolder evaluates on {root}/{split}/<class>/*; directory not found")
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


# ------------------------------------------------------------------------------ what can never train here
def check_step_sizes(cfg: DictConfig, specs: list[DomainSpec], device: torch.device) -> None:
    """Refuse a recipe whose sizes can never train on this machine, naming the key to change.

    - one training batch of float32 images (``data.batch_size`` images of ``data.image_size``) larger than the
      device's memory;
    - a CIFAR ResNet whose weights and gradients alone (``model.width``) are larger than it;
    - a BN source given one image a step (``data.batch_size`` 1, or a domain's ``fraction`` that leaves one) while
      the network's last BatchNorm layers see a 1x1 feature map: one value per channel, which torch cannot normalise
      in training.

    The memory checks are lower bounds (activations, optimiser state and the data come on top), so nothing that
    could train is refused; a step that runs out of memory later says so in one line too
    (:func:`mbn.train.runtime.step_size_error`).
    """
    check_memory(cfg, device)
    check_one_image_sources(cfg, specs)


def check_memory(cfg: DictConfig, device: torch.device) -> None:
    """One float32 batch, and a CIFAR ResNet's float32 weights and gradients, fit in the device's memory.

    Under CUDA the host must hold the batch as uint8 and the weights (the model is built there) too.
    """
    rooms = [(memory_limit(device), 4, 8)]  # (room, bytes a pixel value, bytes a parameter)
    if device.type != "cpu":
        rooms.append((memory_limit(torch.device("cpu")), 1, 4))
    side, n = int(cfg.data.image_size), int(cfg.data.batch_size)
    for room, per_value, _ in rooms:
        need = n * 3 * side * side * per_value
        if room is not None and need > room[0]:
            named = "data.image_size" if need // n > room[0] else "data.batch_size"  # one image too big, or the batch
            raise RecipeError(
                f"key '{named}': one batch of {n} images of {side}x{side} (data.batch_size, data.image_size) needs "
                f"{size_text(need)}, more than the {size_text(room[0])} of {room[1]}; lower data.image_size or "
                "data.batch_size"
            )
    smallest = min((room[0] for room, _, _ in rooms if room is not None), default=None)
    params = cifar_parameters(cfg.model, smallest) if smallest is not None else None
    if params is None:
        return
    for room, _, per_parameter in rooms:
        need = params * per_parameter
        if room is not None and need > room[0]:
            what = "weights and gradients" if per_parameter == 8 else "weights"
            raise RecipeError(
                f"key 'model.width': {cfg.model.name} with model.width={cfg.model.width} has {params:,} parameters, "
                f"whose float32 {what} need {size_text(need)}, more than the {size_text(room[0])} of {room[1]}; "
                "lower model.width"
            )


def memory_limit(device: torch.device) -> tuple[int, str] | None:
    """The most memory a process training on ``device`` can ever have, and what sets it (None when unknown).

    The host's RAM and swap, or the address-space limit (``ulimit -v``) when lower; for CUDA the device's memory.
    """
    if device.type == "cuda":
        try:
            return torch.cuda.get_device_properties(device).total_memory, f"device {device}"
        except (RuntimeError, AssertionError):  # CUDA cannot start: the trainer says so when it uses the device
            return None
    if device.type != "cpu":
        return None
    limits: list[tuple[int, str]] = []
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        limits.append((ram + _swap_bytes(), "this machine's memory (RAM and swap)"))
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows)
        pass
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft not in (resource.RLIM_INFINITY, -1) and soft > 0:
            limits.append((soft, "the process's address-space limit (ulimit -v)"))
    except (ImportError, ValueError, OSError):
        pass
    return min(limits) if limits else None


def _swap_bytes() -> int:
    """The swap space of a Linux host (``SwapTotal``); 0 elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("SwapTotal:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return 0


def cifar_parameters(model: Any, limit: int) -> int | None:
    """A CIFAR ResNet's parameter count when its weights could come near ``limit`` bytes; None otherwise.

    A bound from the widest stage decides without building anything; only beyond it is the network built on the
    meta device (no memory) and counted. Other networks' sizes do not follow a recipe key.
    """
    depth = cifar_depth(str(model.name))
    if depth is None:
        return None
    layers, width = cifar_resnet_layers(depth), int(model.width)
    widest = width * 2 ** (len(layers) - 1)
    bound = 20 * sum(layers) * widest**2 + 1000 * widest + 100  # two 3x3 convs and a shortcut a block, at most
    if 8 * bound <= limit:  # float32 weights and gradients far below the limit
        return None
    with torch.device("meta"):
        net = build_network(ModelCfg(name=str(model.name), width=width), num_classes=10)
    return sum(p.numel() for p in net.parameters())


def check_one_image_sources(cfg: DictConfig, specs: list[DomainSpec]) -> None:
    """No BN source trains on one image a step where the network's last BatchNorm layers see one value a channel."""
    images = images_per_step(specs, int(cfg.data.batch_size))
    by_bn: dict[str, list[DomainSpec]] = {}
    for spec in specs:
        by_bn.setdefault(spec.bn, []).append(spec)
    lone = [group[0] for group in by_bn.values() if len(group) == 1 and images[group[0].name] == 1]
    if not lone:
        return
    seen = one_image_refused(cfg)  # built on the meta device only now: rare
    if seen is None:
        return
    spec = lone[0]
    why = (
        f"the last BatchNorm layers of {cfg.model.name} see one value per channel (input {seen} at "
        f"data.image_size={cfg.data.image_size}), which cannot be normalised in training"
    )
    if int(cfg.data.batch_size) == 1:
        raise RecipeError(
            f"key 'data.batch_size': with data.batch_size=1, BN {spec.bn!r} normalises 1 image a step (domain "
            f"{spec.name!r}) and {why}; raise data.batch_size to 2 or more"
        )
    by_name = {s.name: s for s in specs}
    cut = spec  # the domain whose fraction leaves one image: this one or one it takes its input from
    while cut.fraction >= 1.0 and cut.input is not None:
        cut = by_name[cut.input]
    raise RecipeError(
        f"key 'domains.{cut.name}.fraction': domain {spec.name!r} gets 1 image a step (data.batch_size="
        f"{cfg.data.batch_size}, domains.{cut.name}.fraction={cut.fraction:g}) and is alone in BN {spec.bn!r}, where "
        f"{why}; raise domains.{cut.name}.fraction or data.batch_size"
    )


def images_per_step(specs: list[DomainSpec], batch_size: int) -> dict[str, int]:
    """Images each domain gets a (micro-)batch: its input's, or ``round(fraction x`` its input's) with at least one.

    As :func:`mbn.train.step._share` hands them out, for domains that keep the number of images they are given.
    """
    images: dict[str, int] = {}
    for spec in dependency_order(specs):
        given = images[spec.input] if spec.input else batch_size
        images[spec.name] = given if spec.fraction >= 1.0 else max(1, round(spec.fraction * given))
    return images


def one_image_refused(cfg: DictConfig) -> str | None:
    """The input of the recipe's network's BatchNorm layer that refuses one training image (``"1x512x1x1"``).

    None when one image trains, or when the network cannot be built on the meta device (no memory, no weights)
    to tell: the training forward then says so in one line if it fails.
    """
    model = ModelCfg(name=str(cfg.model.name), width=int(cfg.model.width))  # no pretrained weights: shapes only
    side = int(cfg.data.image_size)
    try:
        with torch.device("meta"):
            net = build_network(model, num_classes=10).train()
            net(torch.empty(1, 3, side, side))
    except ValueError as err:
        if ONE_VALUE_PER_CHANNEL not in str(err):
            return None
        shape = str(err).rsplit("torch.Size([", 1)[-1].rstrip("])")
        return "x".join(d.strip() for d in shape.split(","))
    except Exception:  # a network the meta device cannot build: the training forward tells instead
        return None
    return None
