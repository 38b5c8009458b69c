"""Recipe schema and loading: typed dataclasses merged as defaults -> base recipe -> recipe -> CLI dotlist.

A typo or a wrong type fails at load time with a :class:`RecipeError` naming the key (dinov2's
``get_cfg_from_args`` flow on omegaconf structured configs). ``domains`` maps a domain's name to
``{type, bn, weight, input, start, end, ...the type's parameters}``; the model's BN sources are the
distinct ``bn`` values in order, the first being the main BN used at inference.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mbn.errors import RecipeError, first_line
from mbn.fileio import atomic_write_text
from mbn.validators import ValueCheckError, check_choice, check_number
from mbn.written_recipe import interpolated_leaves, recipe_yaml, remember_interpolations

#: Keys of a domain entry that the trainer consumes; all other keys are the domain type's parameters.
DOMAIN_RESERVED_KEYS = ("type", "bn", "weight", "input", "start", "end", "fraction")


@dataclass
class ModelCfg:
    """Which network to build (see :func:`mbn.models.create_model`)."""

    name: str = "cifar_resnet18"  # cifar_resnet{8,20,18,...} | torchvision.<name> | timm.<name>
    width: int = 64  # base width of the CIFAR ResNets (16 for the small CPU-scale nets)
    pretrained: bool = False
    share_affine: bool = False  # one affine pair for every source (separate statistics only)
    share_stats: bool = False  # one set of running statistics (separate affine only)
    init_from: str | None = None  # run directory or checkpoint: load its backbone (and heads that fit) first
    # keyword arguments of the model's constructor (timm.create_model / torchvision), e.g. {drop_path_rate: 0.2}
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataCfg:
    """Dataset, loading and the CPU-side base transforms (crop, flip)."""

    name: str = "cifar10"  # cifar10 | cifar100 | imagefolder | webdataset | synthetic
    root: str = "data"  # webdataset: the training shards, a brace pattern (/data/train-{000000..001023}.tar)
    test_root: str | None = None  # webdataset: the evaluation shards (brace pattern)
    test_split: str = "test"  # imagefolder: the evaluation folder under root (<root>/<test_split>/<class>/*; val)
    download: bool = False
    batch_size: int = 128
    eval_batch_size: int = 512
    num_workers: int = 2
    image_size: int = 32
    crop_padding: int = 4  # random crop with this zero padding (0 disables)
    hflip: bool = True
    on_device: bool = False  # hold the whole dataset on the training device as uint8 (no workers)
    preload: bool = True  # decode every image once into memory; false: stream an imagefolder tree from disk
    augment: str = "cifar"  # cifar: pad-crop-flip at native size | imagenet: RandomResizedCrop + flip (streamed)
    crop_fraction: float = 0.875  # imagenet evaluation: resize to image_size / crop_fraction, centre crop
    min_image_side: int = 8  # streamed images with a shorter side below this are refused, naming the file
    max_image_pixels: int = 89_478_485  # images with more pixels (header) are refused before decoding (PIL's limit)
    decode: str = "workers"  # streamed: workers decode and crop | device: workers read, the training device decodes
    mean: list[float] | None = None  # input normalisation (0-1 units); None: the data set's (or the weights')
    std: list[float] | None = None
    aug_repeats: int = 0  # repeated augmentation: each training image k times per epoch, across ranks (0, 1: off)
    train_limit: int | None = None  # use the first N training images (after a fixed seeded shuffle)
    test_limit: int | None = None  # use the first N test images
    synthetic_train_size: int = 5000
    synthetic_test_size: int = 1000


@dataclass
class OptimCfg:
    """Optimiser and loss."""

    name: str = "sgd"  # any optimiser timm names (timm.optim.list_optimizers()): sgd, adamw, rmsproptf, lamb, ...
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    label_smoothing: float = 0.0
    grad_clip: float | None = None  # max global grad norm
    # domain_mean: the loss is sum(weight * mean loss of each domain). sample_mean (Fast AdvProp): every
    # parameter's gradient is the weighted mean over the samples that reached it (see docs/recipes.md)
    grad_normalization: str = "domain_mean"
    grad_accum_steps: int = 1  # optimiser step every k batches: k x data.batch_size images per step (BN sees each)
    # false: no weight decay on 1-d parameters (BN weights and biases) and biases (timm's param_groups_weight_decay);
    # true: decay every parameter, as mbn did before 0.3 (runs saved without this key keep that on resume)
    decay_norm_and_bias: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)  # further arguments of the optimiser (e.g. {eps: 0.001})


@dataclass
class ScheduleCfg:
    """Learning-rate schedule, stepped every optimisation step."""

    name: str = "cosine"  # timm's cosine | tanh | poly | step | multistep, or constant
    warmup_epochs: float = 0.0  # linear warm-up from optim.lr / warm-up steps to optim.lr, then the schedule
    # true: the schedule starts after the warm-up and spans the steps left; false (timm's and TF's default): it counts
    # from step 0 over every step, the warm-up replacing its first steps
    warmup_prefix: bool = True
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of training (multistep)
    decay_epochs: float | None = None  # step: decay by gamma every this many epochs (2.4: EfficientNet's)
    gamma: float = 0.1  # the decay factor of step / multistep (timm's decay_rate)
    min_lr: float = 0.0  # the floor of cosine / tanh / poly
    kwargs: dict[str, Any] = field(default_factory=dict)  # further arguments of timm's scheduler (e.g. {k_decay: 1})


@dataclass
class TrainerCfg:
    """Loop, device and run directory."""

    epochs: int = 30
    max_steps: int | None = None  # stop after this many steps (short runs, smoke tests)
    budget_of: str | None = None  # train for the cost of this recipe's `epochs` (a recipe name or path, e.g. vanilla)
    out_dir: str | None = None  # default: runs/<recipe>-<timestamp>
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "none"  # none | bf16 | fp16
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False  # under torchrun: one SyncBatchNorm per BN source (statistics over every rank)
    split_batch: bool = True  # one concatenated forward when every domain's batch is ready
    # under torchrun: DDP's find_unused_parameters; null decides from the recipe (true only when a BN or head can go
    # without a training forward in some step: domain windows, a BN or head no domain trains)
    find_unused_parameters: bool | None = None
    eval_every: int = 1  # epochs between test evaluations (0: only at the end)
    eval_all_bns: bool = False  # evaluate through every BN, not only the main one
    checkpoint_every_steps: int = 0  # extra checkpoints inside an epoch (0: at epoch ends only)
    log_every: int = 20  # steps between log lines / scalar writes
    keep_best_k: int = 0  # also keep the k best-testing checkpoints (best/step-<step>.pt; mbn-avg-checkpoints)
    progress: str = "auto"  # auto | bar | plain | none


@dataclass
class EvalCfg:
    """Evaluation settings used by ``mbn-eval`` (and stored with the run)."""

    limit: int | None = None
    corruptions: list[str] | None = None  # default: the 15 standard ones
    severities: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    linf_eps: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])  # 0-255 units
    l2_eps: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])  # [0,1]-pixel l2 norm
    pgd_steps: int = 10
    autoattack: bool = False
    # published robustness suites, KIND[:LABEL] -> DIR (mbn-eval --suites / --all), e.g. {cifar10-c: /data/CIFAR-10-C}
    suites: dict[str, str] = field(default_factory=dict)


@dataclass
class EmaCfg:
    """Exponential moving average of the weights (and BN statistics), evaluated beside the trained weights."""

    decay: float = 0.0  # ema = decay * ema + (1 - decay) * weights after every optimiser step; 0: off
    warmup: bool = False  # timm's warm-up: the decay grows as 1 - (1 + step) ** -2/3 up to `decay`


@dataclass
class WandbCfg:
    """Weights & Biases: the run's scalars, images, recipe and final metrics (``pip install wandb``)."""

    enabled: bool = False
    project: str = "mbn"
    entity: str | None = None  # W&B's default entity when None
    name: str | None = None  # the run's name in W&B; default: the run directory's name
    mode: str | None = None  # online, offline (synced later with `wandb sync`), disabled; None: WANDB_MODE, else online
    tags: list[str] = field(default_factory=list)


@dataclass
class MlflowCfg:
    """MLflow: the run's scalars, images, recipe and final metrics (``pip install mlflow``)."""

    enabled: bool = False
    tracking_uri: str | None = None  # None: MLflow's own default (MLFLOW_TRACKING_URI, else MLflow's local store)
    experiment: str = "mbn"
    run_name: str | None = None  # default: the run directory's name


@dataclass
class LoggingCfg:
    """TensorBoard output (``scalars.csv`` is always written) and optional trackers."""

    tensorboard: bool = True
    image_every: int = 500  # steps between per-domain image grids (0 disables)
    divergence_every: int = 500  # steps between BN-statistics divergence scalars (0 disables)
    perturbation_gain: float = 10.0  # amplification of (adv - clean) in the image grids
    wandb: WandbCfg = field(default_factory=WandbCfg)
    mlflow: MlflowCfg = field(default_factory=MlflowCfg)


@dataclass
class RecipeCfg:
    """A full training recipe."""

    imports: list[str] = field(default_factory=list)  # modules imported before the domains are looked up
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    domains: dict[str, Any] = field(default_factory=dict)
    optim: OptimCfg = field(default_factory=OptimCfg)
    schedule: ScheduleCfg = field(default_factory=ScheduleCfg)
    trainer: TrainerCfg = field(default_factory=TrainerCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    ema: EmaCfg = field(default_factory=EmaCfg)
    logging: LoggingCfg = field(default_factory=LoggingCfg)


@dataclass
class DomainSpec:
    """One resolved entry of ``domains``."""

    name: str
    type: str
    bn: str
    weight: float = 1.0
    input: str | None = None
    start: float = 0.0  # fraction of training at which the domain starts contributing
    end: float = 1.0  # fraction of training after which it stops
    params: dict[str, Any] = field(default_factory=dict)
    fraction: float = 1.0  # share of its input batch the domain gets (a seeded choice per step)


#: Keys whose default changed after runs were saved with them absent: a saved run's recipe without the key reads
#: this value, so it resumes (and is compared) as it was trained. New recipes get the schema default.
LEGACY_VALUES: dict[str, Any] = {"optim.decay_norm_and_bias": True}


def with_legacy_values(recipe: dict[str, Any]) -> dict[str, Any]:
    """A copy of a saved run's ``recipe`` (nested dicts) with :data:`LEGACY_VALUES` filled in where absent."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in recipe.items()}
    for dotted, value in LEGACY_VALUES.items():
        section, key = dotted.split(".")
        if isinstance(out.get(section), dict) and key not in out[section]:
            out[section][key] = value
    schedule = out.get("schedule")
    if isinstance(schedule, dict) and schedule.get("name") == "step" and schedule.get("decay_epochs") is None:
        schedule["name"] = "multistep"  # mbn < 0.5's step schedule (milestones) is timm's multistep
    return out


#: The recipe's sections: the only keys a recipe file's top level may hold (besides ``base``).
SECTIONS = tuple(f.name for f in fields(RecipeCfg))
#: The largest recipe file read: recipes are a few kB, and a file this big is not one.
MAX_RECIPE_BYTES = 1 << 20
#: Keys and values quoted in messages are cut to this many characters (with an ellipsis).
MESSAGE_CHARS = 80
_NAME_LIKE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


def _clip(text: object, limit: int = MESSAGE_CHARS) -> str:
    """``text`` for a message: at most ``limit`` characters, cut with an ellipsis."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _read_yaml(path: Path, name: str | None = None) -> DictConfig:
    """One recipe file, parsed: a mapping whose top-level keys are recipe sections (and ``base``).

    ``name``: the file as messages give it (with the key that pointed at it); default ``path``. A file that is not a
    recipe (binary, huge, a list, text, other keys) is refused in one line naming the file, never quoting its content.
    """
    name = name or str(path)
    if not path.is_file():
        what = "not a regular file" if path.exists() else "recipe file not found"
        raise RecipeError(f"{name}: {what}")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as err:
        raise RecipeError(f"{name}: cannot read it ({first_line(err)})") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{name}: over {MAX_RECIPE_BYTES >> 20} MiB, too large for a recipe (not a recipe file?)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(f"{name}: not a text file (byte {err.start} is not UTF-8; a recipe is YAML text)") from None
    if "\x00" in text:
        raise RecipeError(f"{name}: not a text file (it holds NUL bytes; a recipe is YAML text)")
    try:
        top = yaml.compose(text, Loader=yaml.SafeLoader)  # the top level's kind (aliases are not expanded here)
        if top is not None and not isinstance(top, yaml.MappingNode):  # OmegaConf reads text as a key
            kind = "a list" if isinstance(top, yaml.SequenceNode) else "a single value or text"
            raise RecipeError(
                f"{name}: not a recipe: its top level is {kind}, not a mapping of recipe sections "
                f"({', '.join(SECTIONS)})"
            )
        cfg = OmegaConf.load(io.StringIO(text))
    except RecipeError:
        raise
    except Exception as err:  # yaml errors carry multi-line context; keep the first line
        raise RecipeError(f"{name}: not valid YAML ({_clip(first_line(err), 200)})") from None
    assert isinstance(cfg, DictConfig)
    unknown = [key for key in cfg if key not in (*SECTIONS, "base")]
    if unknown:
        key = unknown[0]
        if isinstance(key, str) and len(key) <= MESSAGE_CHARS and _NAME_LIKE.fullmatch(key):
            raise RecipeError(f"{name}: key '{key}' is not a recipe section ({', '.join(SECTIONS)})")
        raise RecipeError(f"{name}: not a recipe: its top-level keys are not recipe sections ({', '.join(SECTIONS)})")
    return cfg


def _read_with_bases(path: Path, seen: tuple[Path, ...] = (), via: str | None = None) -> list[tuple[str, DictConfig]]:
    """``path`` and the recipes its ``base:`` key names (relative path), base-most first, each with its name.

    A file's name in messages is its path, and for a base also the key that pointed at it
    (``/etc/passwd (key 'base' of mine.yaml)``).
    """
    path = path.resolve()
    name = f"{path} ({via})" if via else str(path)
    if path in seen:
        raise RecipeError(f"{name}: recipe 'base' chain forms a cycle")
    cfg = _read_yaml(path, name)
    base = cfg.pop("base", None)
    if base is None:
        return [(name, cfg)]
    if not isinstance(base, str):
        raise RecipeError(f"{name}: key 'base' must be a path to another recipe, got {_clip(repr(base))}")
    return [*_read_with_bases(_base_path(path, base), (*seen, path), f"key 'base' of {path}"), (name, cfg)]


def _base_path(recipe: Path, base: str) -> Path:
    """``base:`` relative to the recipe's folder (``.yaml`` may be left out), else a shipped recipe's name.

    ``base: advprop`` takes ``advprop.yaml`` beside the recipe where there is one, else the shipped ``advprop``.
    """
    beside = recipe.parent / base
    if beside.name not in ("", ".", ".."):
        for candidate in (beside, beside.with_name(beside.name + ".yaml"), beside.with_name(beside.name + ".yml")):
            if candidate.is_file() and candidate.resolve() != recipe.resolve():  # never the recipe itself
                return candidate
    if len(Path(base).parts) != 1:
        return beside
    from mbn.shipped import shipped_recipes

    shipped = shipped_recipes().get(base.removesuffix(".yaml").removesuffix(".yml"))
    if shipped is not None:
        return shipped
    raise RecipeError(
        f"{recipe}: key 'base': {_clip(base)} is neither a file beside it nor a shipped recipe "
        "(mbn-train --list-recipes)"
    )


def _friendly(err: Exception, fallback_key: str | None = None) -> str:
    """OmegaConf's error on one line, naming its key; long keys and values are cut (never a file's content)."""
    key = getattr(err, "full_key", None) or fallback_key
    msg = first_line(err)
    for part in (getattr(err, "key", None), getattr(err, "value", None), key):
        if isinstance(part, str) and len(part) > MESSAGE_CHARS:
            msg = msg.replace(part, _clip(part))
    msg = _clip(msg, 4 * MESSAGE_CHARS)
    return f"key '{_clip(key)}': {msg}" if key else msg


def _kind(value: Any) -> str:
    if isinstance(value, (dict, DictConfig)):
        return "a mapping"
    return "a list" if isinstance(value, (list, tuple, ListConfig)) else "a value"


def _clash(dest: DictConfig, given: dict[Any, Any], path: tuple[str, ...] = ()) -> str | None:
    """Where ``given`` (a recipe file) puts a value or list over a mapping of ``dest``, or a mapping over a list.

    Returns the message naming the first such key, or None.
    """
    for key, value in given.items():
        if value is None or key not in dest:
            continue
        try:
            node = dest.get(key)
        except OmegaConfBaseException:
            continue
        here = (*path, str(key))
        dotted = _clip(".".join(here))
        shown = _clip(repr(value))
        if isinstance(node, DictConfig) and not isinstance(value, dict):
            if here == ("domains",):
                return (
                    f"key 'domains': a mapping of domain names to their entries, not {_kind(value)} "
                    f"(domains: {{clean: {{type: clean}}, ...}}), got {shown}"
                )
            if len(here) == 2 and here[0] == "domains":
                return (
                    f"key '{dotted}': a domain entry (a mapping with at least 'type'), not {_kind(value)}, got {shown}"
                )
            names = [str(k) for k in node]
            keys = f" (its keys: {_clip(', '.join(names))})" if names else ""
            return f"key '{dotted}': a section, not {_kind(value)}{keys}, got {shown}"
        if isinstance(node, ListConfig) and isinstance(value, dict):
            return f"key '{dotted}': a list, not a mapping, got {shown}"
        if isinstance(node, DictConfig) and isinstance(value, dict):
            found = _clash(node, value, here)
            if found is not None:
                return found
    return None


def _merge_file(cfg: DictConfig, name: str, layer: DictConfig) -> DictConfig:
    """``cfg`` with recipe file ``name``'s ``layer`` merged over it; a failure names the file and the key."""
    try:
        merged = OmegaConf.merge(cfg, layer)
    except (OmegaConfBaseException, TypeError, ValueError) as err:
        problem = None
        if not getattr(err, "full_key", None):  # OmegaConf names no key for a section given a value or a list
            given = OmegaConf.to_container(layer, resolve=False)
            problem = _clash(cfg, given) if isinstance(given, dict) else None
        raise RecipeError(f"{name}: {problem or _friendly(err)}") from None
    assert isinstance(merged, DictConfig)
    return merged


def _legacy_layer(layers: Sequence[tuple[str, DictConfig]]) -> DictConfig:
    """:data:`LEGACY_VALUES` of the sections a saved run's recipe holds (merged under it: its own values win)."""
    plain = [OmegaConf.to_container(layer, resolve=False) for _, layer in layers]
    held = {str(section) for p in plain if isinstance(p, dict) for section, v in p.items() if isinstance(v, dict)}
    legacy: dict[str, dict[str, Any]] = {}
    for dotted, value in LEGACY_VALUES.items():
        section, key = dotted.split(".")
        if section in held:
            legacy.setdefault(section, {})[key] = value
    return OmegaConf.create(legacy)


def load_recipe(
    path: str | Path | None,
    overrides: list[str] | None = None,
    *,
    saved_run: bool = False,
    imports: Sequence[str] = (),
) -> DictConfig:
    """Merge schema defaults, the recipe (and its bases) and ``key=value`` overrides, then validate.

    ``saved_run``: ``path`` is a run's ``config.yaml``; keys it lacks read as :data:`LEGACY_VALUES`.
    ``imports``: modules from the command line (``mbn-train --import``), appended to the recipe's ``imports`` key
    (so the run's ``config.yaml`` lists them); every module listed is imported (:mod:`mbn.imports`) before the
    recipe is validated.

    Raises:
        RecipeError: missing file, unknown key, wrong type or bad value; the message names it.
    """
    cfg = OmegaConf.structured(RecipeCfg)
    if path is not None:
        layers = _read_with_bases(Path(path))
        if saved_run:  # a key the run's recipe lacks reads as the run had it
            cfg = _merge_file(cfg, str(path), _legacy_layer(layers))
        for name, layer in layers:  # one file at a time, so a failure names the file that set the key
            cfg = _merge_file(cfg, name, layer)
    for item in overrides or []:
        if "=" not in item:
            raise RecipeError(f"override {_clip(repr(item))}: expected dotted.key=value")
    for item in overrides or []:  # one at a time, so a failure names its override
        key, value = (part.strip() for part in item.split("=", 1))
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            if isinstance(OmegaConf.select(cfg, key), DictConfig):  # ema=0.9: a section given a scalar
                shown = _clip(key)
                message = f"key '{shown}': a section, not a value (set {shown}.<name>=...), got {_clip(repr(value))}"
                raise RecipeError(message) from None
            raise RecipeError(_friendly(err, key)) from None
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or first_line(err)
            raise RecipeError(
                f"key '{_clip(key)}': {_clip(repr(value))} is not a YAML value ({problem}); quote what holds "
                "${...}, ':' or brackets"
            ) from None
        except (TypeError, ValueError) as err:
            raise RecipeError(f"key '{_clip(key)}': {_clip(first_line(err), 4 * MESSAGE_CHARS)}") from None
    leaves = (
        interpolated_leaves(cfg) if isinstance(cfg, DictConfig) else {}
    )  # written as their text, never as what they resolve to (secrets, paths)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise RecipeError(_friendly(err)) from None
    assert isinstance(cfg, DictConfig)
    from mbn.imports import CLI_OPTION, import_user_modules  # the user's modules import mbn: not at import time

    import_user_modules(imports, CLI_OPTION)
    import_user_modules(cfg.imports)
    if saved_run and cfg.schedule.name == "step" and cfg.schedule.decay_epochs is None:
        cfg.schedule.name = "multistep"  # mbn < 0.5's step schedule (milestones) is timm's multistep
    cfg.imports = [*cfg.imports, *(name for name in dict.fromkeys(imports) if name not in cfg.imports)]
    validate_recipe(cfg)
    remember_interpolations(cfg, leaves)
    return cfg


_CHOICES = {
    "data.name": ("cifar10", "cifar100", "imagefolder", "webdataset", "synthetic"),
    "data.augment": ("cifar", "imagenet"),
    "data.decode": ("workers", "device"),
    "optim.grad_normalization": ("domain_mean", "sample_mean"),
    "schedule.name": ("cosine", "tanh", "poly", "step", "multistep", "constant", "wsd", "rsqrt"),
    "trainer.amp": ("none", "bf16", "fp16"),
    "trainer.progress": ("auto", "bar", "plain", "none"),
    "logging.wandb.mode": (None, "online", "offline", "disabled"),
}
_POSITIVE = {"low": 0, "low_open": True}
_NON_NEGATIVE = {"low": 0}
#: Numeric keys and their bounds (``None`` values are allowed where the schema allows them).
_NUMBERS: dict[str, dict[str, Any]] = {
    "data.batch_size": _POSITIVE,
    "data.eval_batch_size": _POSITIVE,
    "data.image_size": _POSITIVE,
    "data.num_workers": _NON_NEGATIVE,
    "data.aug_repeats": _NON_NEGATIVE,
    "data.crop_padding": _NON_NEGATIVE,
    "data.crop_fraction": {"low": 0, "low_open": True, "high": 1},
    "data.min_image_side": _NON_NEGATIVE,
    "data.max_image_pixels": _POSITIVE,
    "model.width": {"low": 1},
    "trainer.seed": {"low": 0, "high": 2**32 - 1},
    "trainer.epochs": _POSITIVE,
    "trainer.max_steps": _POSITIVE,
    "trainer.log_every": _POSITIVE,
    "trainer.eval_every": _NON_NEGATIVE,
    "trainer.checkpoint_every_steps": _NON_NEGATIVE,
    "trainer.keep_best_k": _NON_NEGATIVE,
    "optim.lr": _POSITIVE,
    "optim.momentum": {"low": 0, "high": 1, "high_open": True},
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.label_smoothing": {"low": 0, "high": 1, "high_open": True},
    "optim.grad_clip": _POSITIVE,
    "optim.grad_accum_steps": {"low": 1},
    "ema.decay": {"low": 0, "high": 1, "high_open": True},
    "schedule.warmup_epochs": _NON_NEGATIVE,
    "schedule.gamma": _POSITIVE,
    "schedule.min_lr": _NON_NEGATIVE,
    "schedule.decay_epochs": _POSITIVE,
}


def _check_key(key: str, check: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a :mod:`mbn.validators` check on a recipe value; a failure names the key."""
    try:
        return check(key, *args, **kwargs)
    except ValueCheckError as err:
        raise RecipeError(f"key '{key}': expected {err.what}, got {err.value!r}") from None


def validate_recipe(cfg: DictConfig) -> None:
    """Check values the type system cannot (choices, ranges, domain entries)."""
    for key, choices in _CHOICES.items():
        _check_key(key, check_choice, OmegaConf.select(cfg, key), choices)
    for key, bounds in _NUMBERS.items():
        value = OmegaConf.select(cfg, key)
        if value is not None:
            _check_key(key, check_number, value, **bounds)
    betas = list(cfg.optim.betas)
    if len(betas) != 2:
        raise RecipeError(f"key 'optim.betas': expected two numbers in [0, 1), got {betas}")
    for i, beta in enumerate(betas):
        _check_key(f"optim.betas.{i}", check_number, beta, low=0, high=1, high_open=True)
    for key, count, low in (("data.mean", 3, 0.0), ("data.std", 3, 0.0)):
        values = OmegaConf.select(cfg, key)
        if values is not None and (len(values) != count or not all(float(v) >= low for v in values)):
            raise RecipeError(f"key '{key}': expected {count} per-channel values in 0-1 units, got {list(values)}")
    if (cfg.data.mean is None) != (cfg.data.std is None):
        raise RecipeError("keys 'data.mean' and 'data.std': set both (the input normalisation) or neither")
    if cfg.data.std is not None and min(float(v) for v in cfg.data.std) == 0:
        raise RecipeError(f"key 'data.std': expected positive values, got {list(cfg.data.std)}")
    check_schedule(cfg)
    check_preload_keys(cfg.data)
    check_suites(cfg.eval)
    domain_specs(cfg)


#: The schedules that decay to ``schedule.min_lr``.
_FLOORED_SCHEDULES = ("cosine", "tanh", "poly", "wsd", "rsqrt")


def check_schedule(cfg: DictConfig) -> None:
    """``schedule`` values that agree with each other.

    Milestones are increasing fractions of training in (0, 1) (not epochs, as torch's MultiStepLR takes them);
    ``min_lr`` is the cosine schedule's floor, at most ``optim.lr``.
    """
    schedule = cfg.schedule
    milestones = list(schedule.milestones)
    fractions = all(isinstance(m, (int, float)) and not isinstance(m, bool) and 0 < m < 1 for m in milestones)
    if not fractions or milestones != sorted(milestones) or len(set(milestones)) != len(milestones):
        raise RecipeError(
            "key 'schedule.milestones': expected increasing fractions of training in (0, 1) (0.5: half way; not "
            f"epochs or steps), got {milestones}"
        )
    if schedule.min_lr and schedule.name not in _FLOORED_SCHEDULES:
        raise RecipeError(
            f"key 'schedule.min_lr': the floor of the {'/'.join(_FLOORED_SCHEDULES)} schedules, but schedule.name is "
            f"{schedule.name}; set it to 0 or use one of them"
        )
    if schedule.name == "step" and schedule.decay_epochs is None:
        raise RecipeError(
            "key 'schedule.decay_epochs': timm's step schedule decays by schedule.gamma every decay_epochs epochs "
            "(e.g. 2.4); set it, or use schedule.name=multistep for schedule.milestones (mbn < 0.5's step)"
        )
    from mbn.optim import check_schedule_builds, optimizer_arguments

    optimizer_arguments(cfg.optim)  # an optimiser timm names, taking the optim.kwargs given
    check_schedule_builds(schedule, cfg.trainer.epochs, cfg.optim.lr)  # timm's schedule takes schedule.kwargs
    if schedule.min_lr > cfg.optim.lr:
        raise RecipeError(
            f"key 'schedule.min_lr': {schedule.min_lr} is above optim.lr={cfg.optim.lr}; the cosine schedule "
            "decays from optim.lr down to min_lr"
        )


def check_suites(ecfg: Any) -> None:
    """Every ``eval.suites`` entry is ``KIND[:LABEL]: DIR`` with a known kind (the folder is checked by mbn-eval)."""
    from mbn.eval.suite_spec import SuiteError, SuiteSpec

    for key, root in dict(ecfg.suites or {}).items():
        try:
            SuiteSpec.parse(f"{key}={root}", f"key 'eval.suites.{key}'")
        except SuiteError as err:
            raise RecipeError(str(err)) from None


def check_preload_keys(data: Any) -> None:
    """``data.preload`` agrees with the keys only one loading mode has (preloaded arrays or a streamed tree).

    Checked when the recipe loads, before any rank waits; :func:`mbn.plan.check_dataset_present` checks that the data
    is where ``data.root`` says. Tar shards (``webdataset``) always stream; ``data.preload`` does not apply to them.
    """
    if getattr(data, "preload", True) and data.name != "webdataset":
        if getattr(data, "decode", "workers") == "device":
            raise RecipeError("key 'data.decode': device decoding is for streamed trees: set data.preload=false")
        if getattr(data, "augment", "cifar") == "imagenet":
            raise RecipeError(
                "key 'data.augment': imagenet (RandomResizedCrop) needs the full-resolution images: "
                "set data.preload=false"
            )
        return
    if data.name not in ("imagefolder", "webdataset"):
        raise RecipeError(f"key 'data.preload': only imagefolder trees stream (data.preload=false), not {data.name}")
    if getattr(data, "on_device", False):
        raise RecipeError(
            "key 'data.on_device': holding the set on the device is for preloaded sets; a streamed tree "
            "(data.preload=false) decodes batch by batch (data.decode=device decodes them on the device)"
        )


#: A domain's name: a directory name under ``tb/`` (``domain=<name>``) and part of its tags.
_DOMAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}")
#: Names the run's totals take in the tags (``loss/total``, ``throughput/images_per_s``).
RESERVED_DOMAIN_NAMES = ("total", "images_per_s")


def domain_specs(cfg: DictConfig) -> list[DomainSpec]:
    """Resolve ``cfg.domains`` into specs in recipe order, checking entries and ``input`` links.

    Raises:
        RecipeError: no domains, a malformed entry, an unknown ``input`` or an ``input`` cycle.
    """
    domains = cfg.domains
    if not domains:
        raise RecipeError("key 'domains': expected at least one domain, e.g. domains.clean.type=clean")
    specs = []
    for name, entry in domains.items():
        key = f"domains.{name}"
        if not isinstance(entry, DictConfig):
            raise RecipeError(f"key '{key}': expected a mapping with at least 'type', got {entry!r}")
        entry = OmegaConf.to_container(entry, resolve=True)
        assert isinstance(entry, dict)
        if not isinstance(entry.get("type"), str):
            raise RecipeError(f"key '{key}.type': expected a registered domain type name")
        weight = _check_key(f"{key}.weight", check_number, entry.get("weight", 1.0), low=0)
        start = _check_key(f"{key}.start", check_number, entry.get("start", 0.0), low=0, high=1)
        end = _check_key(f"{key}.end", check_number, entry.get("end", 1.0), low=0, high=1)
        if not start < end:
            raise RecipeError(f"key '{key}.start/end': expected 0 <= start < end <= 1, got {start}, {end}")
        if not isinstance(name, str) or not _DOMAIN_NAME.fullmatch(name) or name in RESERVED_DOMAIN_NAMES:
            raise RecipeError(
                f"key '{_clip(str(key))}': a domain name is 1-64 letters, digits, '_', '-' or '.' (a file name in tb/ "
                f"and a tag), and not {' or '.join(RESERVED_DOMAIN_NAMES)} (the run's totals)"
            )
        bn = entry.get("bn") or name
        if not isinstance(bn, str) or not bn.isidentifier():
            raise RecipeError(f"key '{key}.bn': expected an identifier naming a BN source, got {bn!r}")
        fraction = _check_key(f"{key}.fraction", check_number, entry.get("fraction", 1.0), low=0, low_open=True, high=1)
        params = {k: v for k, v in entry.items() if k not in DOMAIN_RESERVED_KEYS}
        specs.append(DomainSpec(str(name), entry["type"], bn, weight, entry.get("input"), start, end, params, fraction))
    names = {s.name for s in specs}
    for spec in specs:
        if spec.input is not None and spec.input not in names:
            raise RecipeError(
                f"key 'domains.{spec.name}.input': unknown domain {spec.input!r}; domains: {sorted(names)}"
            )
    dependency_order(specs)
    return specs


def dependency_order(specs: list[DomainSpec]) -> list[DomainSpec]:
    """Specs ordered so every domain comes after its ``input``; a cycle is a RecipeError."""
    by_name = {s.name: s for s in specs}
    ordered: list[DomainSpec] = []
    state: dict[str, str] = {}

    def visit(spec: DomainSpec, path: tuple[str, ...]) -> None:
        if state.get(spec.name) == "done":
            return
        if state.get(spec.name) == "visiting":
            cycle = " -> ".join((*path, spec.name))
            raise RecipeError(f"key 'domains.{spec.name}.input': input cycle {cycle}")
        state[spec.name] = "visiting"
        if spec.input is not None:
            visit(by_name[spec.input], (*path, spec.name))
        state[spec.name] = "done"
        ordered.append(spec)

    for spec in specs:
        visit(spec, ())
    return ordered


def bn_sources(specs: list[DomainSpec]) -> tuple[str, ...]:
    """Distinct BN sources in recipe order; the first is the main BN."""
    return tuple(dict.fromkeys(s.bn for s in specs))


def save_recipe(cfg: DictConfig, path: Path) -> None:
    """Write the recipe as YAML, atomically: resolved, its interpolations as written (:mod:`mbn.written_recipe`)."""
    atomic_write_text(path, recipe_yaml(cfg))
