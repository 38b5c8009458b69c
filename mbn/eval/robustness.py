"""Robust accuracy under attack (PGD sweeps, AutoAttack) and on common corruptions, through one chosen BN.

Every evaluation runs the model in eval mode with one BN source (the main one, as the AdvProp paper evaluates),
and an attack differentiates through the *same* BN as the prediction it is trying to change.

References:
    * PGD-k: Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018: untargeted,
      uniform random start in the ball, ``k`` signed (L-inf) or normalised (L2) steps. The default step size
      ``2.5 * eps / k`` is the rule of MadryLab's ``robustness`` library (it lets the iterate travel from one side
      of the ball to the other), see :func:`default_step_size`.
    * AutoAttack: Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
      parameter-free attacks", ICML 2020, through ``torchattacks.AutoAttack`` (version ``standard``).
    * Sweeping L-inf eps beyond the training eps: Hendrycks et al., "Using Self-Supervised Learning Can Improve
      Model Robustness and Uncertainty", NeurIPS 2019 (their PGD robustness curves).
    * Corruptions: Hendrycks & Dietterich, ICLR 2019; sets from :mod:`mbn.eval.corruptions`, metrics from
      :mod:`mbn.eval.metrics`.

Conventions: ``eps`` arguments of :func:`robust_accuracy` and :func:`autoattack_accuracy` are in [0, 1] pixel
units (as :mod:`mbn.attacks` and torchattacks); :func:`robustness_sweep` takes L-inf eps in 0-255 units, the way
papers quote them. As in AutoAttack, an image counts as robust only if it is classified correctly both clean and
under attack, and only clean-correct images are attacked; robust accuracy is therefore never above clean accuracy.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mbn.attacks import NORMS, pgd
from mbn.data import ArraySplit, EvalLoader, default_cache_dir
from mbn.eval.accuracy import accuracy
from mbn.eval.corruptions import CORRUPTIONS, SEVERITIES, images_fingerprint, load_or_generate
from mbn.eval.metrics import mce, mean_corruption_accuracy, per_corruption_ce, per_corruption_mean
from mbn.extras import TORCHATTACKS, require
from mbn.routing import eval_mode, use_source
from mbn.validators import check_int, check_number

__all__ = [
    "RoutedModel",
    "autoattack_accuracy",
    "corruption_accuracy",
    "corruption_dataset_id",
    "corruption_summary",
    "default_corruption_cache",
    "default_step_size",
    "eps_key",
    "load_reference_corruptions",
    "read_eval_json",
    "robust_accuracy",
    "robustness_sweep",
]

Batch = tuple[Tensor, Tensor]
ToDevice = Callable[[Batch], Batch]


def eps_key(eps: float) -> str:
    """The JSON key of an eps value: shortest exact form (``8.0 -> "8"``, ``0.25 -> "0.25"``)."""
    return f"{float(eps):g}"


def default_step_size(eps: float, steps: int) -> float:
    """``2.5 * eps / steps``: the PGD step size rule of Madry et al.'s ``robustness`` library.

    Args:
        eps: Radius of the ball, in the attack's units.
        steps: Number of PGD steps (>= 1).

    Returns:
        The step size, in the units of ``eps``.
    """
    check_int("steps", steps, low=1)
    return 2.5 * eps / steps


def _bar(iterable: Iterable[Any], progress: bool, desc: str, total: int | None = None) -> Iterable[Any]:
    # disable=None: tqdm shows the bar only when stderr is a terminal
    return tqdm(iterable, desc=desc, total=total, leave=False, disable=None if progress else True)


def _len(batches: Iterable[Batch]) -> int | None:
    return len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]


def robust_accuracy(
    model: nn.Module,
    batches: Iterable[Batch],
    source: str,
    to_device: ToDevice,
    *,
    norm: str,
    eps: float,
    steps: int,
    step_size: float | None = None,
    random_start: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> float:
    """Accuracy under an untargeted PGD-k attack (Madry et al. 2018) through ``source``'s BN in eval mode.

    Args:
        model: A converted model (images in [0, 1] -> logits).
        batches: ``(images, labels)`` batches as produced by the data loaders.
        source: BN source used both to attack and to predict (the main source for the paper's numbers).
        to_device: Turns a batch into float images in [0, 1] and labels on the model's device.
        norm: ``"linf"`` or ``"l2"``.
        eps: Radius of the ball in [0, 1] pixel units (L-inf: per pixel; L2: over the whole image).
        steps: PGD steps (>= 1).
        step_size: Step length in [0, 1] pixel units; default :func:`default_step_size`.
        random_start: Start from a uniform random point of the ball (Madry et al.).
        seed: Seeds the random start (a CPU generator, so results do not depend on the device).
        progress: Show a tqdm bar over batches (only on a terminal).

    Returns:
        The fraction of images classified correctly both clean and after the attack.

    Raises:
        ValueError: on an unknown ``norm``, a negative ``eps`` or ``steps < 1``.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}")
    check_number("eps", eps, low=0)
    check_int("steps", steps, low=1)
    if step_size is None:
        step_size = default_step_size(eps, steps)
    generator = torch.Generator().manual_seed(seed)
    correct = total = 0
    desc = f"PGD-{steps} {norm} eps={eps:.4g}"
    with eval_mode(model), use_source(model, source):
        for batch in _bar(batches, progress, desc, _len(batches)):
            images, labels = to_device(batch)
            total += labels.numel()
            with torch.no_grad():
                keep = model(images).argmax(1) == labels
            if eps == 0 or not bool(keep.any()):
                correct += int(keep.sum())
                continue
            adv = pgd(
                model,
                images[keep],
                labels[keep],
                eps=float(eps),
                steps=steps,
                step_size=float(step_size),
                norm=norm,
                random_start=random_start,
                generator=generator,
            )
            with torch.no_grad():
                correct += int((model(adv).argmax(1) == labels[keep]).sum())
    return correct / max(total, 1)


def robustness_sweep(
    model: nn.Module,
    batches: Iterable[Batch],
    source: str,
    to_device: ToDevice,
    *,
    linf_eps: Sequence[float] = (1.0, 2.0, 4.0, 8.0),
    l2_eps: Sequence[float] = (0.25, 0.5, 1.0),
    steps: int = 10,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """PGD-k robust accuracy over lists of radii, for the robustness-vs-eps curves.

    Include radii above the training eps: how fast accuracy falls beyond it is the point of the curve
    (Hendrycks et al. 2019 sweep well past the eps they train with).

    Args:
        model: A converted model.
        batches: Re-iterable test batches (iterated once per radius).
        source: BN source to attack and predict through.
        to_device: As in :func:`robust_accuracy`.
        linf_eps: L-inf radii in **0-255 units** (8 means 8/255).
        l2_eps: L2 radii in [0, 1]-pixel units.
        steps: PGD steps per attack; step size ``2.5 * eps / steps``.
        seed: Seeds every attack's random start.
        progress: Show tqdm bars (only on a terminal).

    Returns:
        ``{"linf": {eps_key(eps_255): acc}, "l2": {eps_key(eps): acc}}``.
    """
    out: dict[str, dict[str, float]] = {"linf": {}, "l2": {}}
    for norm, radii, scale in (("linf", linf_eps, 1 / 255), ("l2", l2_eps, 1.0)):
        for eps in radii:
            out[norm][eps_key(eps)] = robust_accuracy(
                model,
                batches,
                source,
                to_device,
                norm=norm,
                eps=float(eps) * scale,
                steps=steps,
                seed=seed,
                progress=progress,
            )
    return out


class RoutedModel(nn.Module):
    """``model`` seen through one BN source: for tools (torchattacks) that call a plain module.

    Put it in eval mode (``.eval()`` reaches the wrapped model); every forward routes through ``source``.

    Args:
        model: A converted model.
        source: The BN source every forward uses.
    """

    def __init__(self, model: nn.Module, source: str) -> None:
        super().__init__()
        with use_source(model, source):  # validates the name now rather than at the first forward
            pass
        self.model, self.source = model, source

    def forward(self, images: Tensor) -> Tensor:
        """Logits of ``images`` through ``source``'s BN."""
        with use_source(self.model, self.source):
            return self.model(images)


def autoattack_accuracy(
    model: nn.Module,
    batches: Iterable[Batch],
    source: str,
    to_device: ToDevice,
    *,
    eps: float,
    num_classes: int,
    seed: int = 0,
    progress: bool = False,
) -> float:
    """Accuracy under standard L-inf AutoAttack (Croce & Hein 2020; APGD-CE, APGD-T, FAB-T, Square).

    Args:
        model: A converted model.
        batches: Test batches.
        source: BN source to attack and predict through (eval mode).
        to_device: As in :func:`robust_accuracy`.
        eps: L-inf radius in [0, 1] pixel units (8/255 is the usual CIFAR benchmark).
        num_classes: Number of classes, at least 4 (APGD-T's DLR loss reads the 4 largest logits; APGD-T and FAB-T
            target the top ``num_classes - 1``).
        seed: AutoAttack's seed.
        progress: Show a tqdm bar over batches (only on a terminal).

    Returns:
        The fraction of images classified correctly both clean and after AutoAttack.

    Raises:
        ValueError: if ``num_classes < 4``.
    """
    if num_classes < 4:
        raise ValueError(f"num_classes must be >= 4 for AutoAttack (its DLR loss uses 4 logits), got {num_classes}")
    require("torchattacks", "AutoAttack (mbn-eval --autoattack)", install=TORCHATTACKS)
    import torchattacks  # heavy; only needed behind --autoattack

    routed = RoutedModel(model, source)
    correct = total = 0
    with eval_mode(model):
        routed.eval()
        attack = torchattacks.AutoAttack(
            routed, norm="Linf", eps=float(eps), version="standard", n_classes=num_classes, seed=seed
        )
        for batch in _bar(batches, progress, f"AutoAttack eps={eps:.4g}", _len(batches)):
            images, labels = to_device(batch)
            total += labels.numel()
            with torch.no_grad():
                keep = routed(images).argmax(1) == labels
            if not bool(keep.any()):
                continue
            adv = attack(images[keep], labels[keep])
            with torch.no_grad():
                correct += int((routed(adv).argmax(1) == labels[keep]).sum())
    return correct / max(total, 1)


# ------------------------------------------------------------------------------------------- corruptions


def default_corruption_cache() -> Path:
    """``<mbn cache>/corruptions``: ``$MBN_CACHE_DIR`` or ``$XDG_CACHE_HOME/mbn`` (``~/.cache/mbn``).

    One cache per machine, so every run evaluated on the same test images shares the generated sets.
    """
    return default_cache_dir() / "corruptions"


def corruption_dataset_id(data_name: str, images: np.ndarray, limit: int | None, seed: int = 0) -> str:
    """Cache key of a clean test set: data name, image size, limit, content fingerprint and seed.

    The name, size and limit make the folder readable; the fingerprint keeps two sets that share them (another
    ``data.test_limit``, another imagefolder root) apart, so the cache never raises a mismatch between runs.

    Examples:
        >>> corruption_dataset_id("cifar10", np.zeros((4, 32, 32, 3), np.uint8), 4)[:22]
        'cifar10-32px-first4-s0'
    """
    size = f"{images.shape[1]}px" if images.shape[1] == images.shape[2] else f"{images.shape[1]}x{images.shape[2]}px"
    count = "all" if limit is None else f"first{limit}"
    return f"{data_name}-{size}-{count}-s{seed}-{images_fingerprint(images)[:12]}"


def corruption_accuracy(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    source: str,
    to_device: ToDevice,
    *,
    cache_dir: Path | str,
    dataset_id: str,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    batch_size: int = 512,
    seed: int = 0,
    progress: bool = False,
) -> dict[tuple[str, int], float]:
    """Accuracy on every (corruption, severity) copy of a clean set, through ``source``'s BN in eval mode.

    Missing sets are generated into ``cache_dir / dataset_id`` with :func:`mbn.eval.corruptions.load_or_generate`
    and reused afterwards.

    Args:
        model: A converted model.
        images: Clean test images, uint8 (N, H, W, 3).
        labels: Their labels (N,).
        source: BN source to predict through.
        to_device: Turns a uint8 NCHW batch into float [0, 1] images on the model's device.
        cache_dir: Parent directory of corruption caches.
        dataset_id: Name of this clean set inside ``cache_dir`` (see :func:`corruption_dataset_id`).
        corruptions: Corruption names.
        severities: Severities 1-5.
        batch_size: Images per forward.
        seed: Seed of the corruption generator.
        progress: Show tqdm bars (only on a terminal).

    Returns:
        ``{(corruption, severity): accuracy}``.

    Raises:
        mbn.eval.corruptions.CacheMismatchError: the cache folder holds sets of other images.
    """
    sets = load_or_generate(
        images, labels, cache_dir, dataset_id, corruptions, severities, seed=seed, progress=progress and _tty()
    )
    out: dict[tuple[str, int], float] = {}
    for key in _bar(list(sets), progress, "corruption accuracy"):
        loader = EvalLoader(ArraySplit(np.asarray(sets[key]), labels), batch_size)
        out[key] = accuracy(model, loader, source, to_device)
    return out


def _tty() -> bool:
    import sys

    return sys.stderr.isatty()


def read_eval_json(path: Path | str) -> tuple[Path, dict[str, Any]]:
    """An ``eval.json``, or the one in a run directory: ``(its path, its content)``.

    Raises:
        ValueError: missing, unreadable, or not a JSON object.
    """
    path = Path(path)
    file = path / "eval.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{file} not found (expected an eval.json or a run directory holding one)")
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{file} is not a readable eval.json ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} is not a readable eval.json (not a JSON object)")
    return file, data


def load_reference_corruptions(path: Path | str) -> tuple[Path, dict[tuple[str, int], float], dict[str, Any]]:
    """Read the corruption accuracies of a reference evaluation (an ``eval.json`` or a run directory holding one).

    Returns:
        ``(eval.json path, {(corruption, severity): accuracy}, the whole eval.json)``.

    Raises:
        ValueError: missing or unreadable file, or no corruption results in it.
    """
    file, data = read_eval_json(path)
    try:
        table = data["corruptions"]["accuracy"] if data.get("corruptions") else None
    except (TypeError, KeyError, AttributeError) as err:
        raise ValueError(f"{file} is not a readable eval.json ({err})") from None
    if not table:
        raise ValueError(f"{file} has no corruption results; evaluate it with mbn-eval --corruptions first")
    try:
        acc = {(c, int(s)): float(v) for c, row in table.items() for s, v in row.items()}
    except (AttributeError, TypeError, ValueError) as err:
        raise ValueError(f"{file}: malformed corruptions.accuracy ({err})") from None
    return file, acc, data


def corruption_summary(
    acc: Mapping[tuple[str, int], float],
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    reference: Mapping[tuple[str, int], float] | None = None,
    reference_path: str | None = None,
    skipped: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The ``corruptions`` section of ``eval.json``: accuracies, means and (with a reference) CE and mCE.

    Args:
        acc: ``{(corruption, severity): accuracy}`` of the evaluated model.
        corruptions: Corruptions to report and average over.
        severities: Severities to report and average over.
        reference: The reference model's accuracy table (same pairs), or None for ``ce = mce = None``.
        reference_path: Where the reference came from, recorded as ``reference``.
        skipped: Corruptions of the suite left out, with why (see
            :func:`mbn.eval.corruptions.unavailable_corruptions`); the means are then over fewer corruptions.

    Returns:
        ``{"accuracy", "mean_acc", "per_corruption_mean", "ce", "mce", "reference", "skipped"}``.

    Raises:
        ValueError: the reference lacks pairs, or has zero error on a corruption (CE divides by it).
    """
    section: dict[str, Any] = {
        "accuracy": {c: {str(s): float(acc[(c, s)]) for s in severities} for c in corruptions},
        "mean_acc": mean_corruption_accuracy(acc, corruptions, severities),
        "per_corruption_mean": per_corruption_mean(acc, corruptions, severities),
        "ce": None,
        "mce": None,
        "reference": None,
        "skipped": dict(skipped or {}),
    }
    if reference is not None:
        errors = {k: 1.0 - v for k, v in acc.items()}
        ref_errors = {k: 1.0 - v for k, v in reference.items()}
        section["ce"] = per_corruption_ce(errors, ref_errors, corruptions, severities)
        section["mce"] = mce(errors, ref_errors, corruptions, severities)
        section["reference"] = reference_path
    return section
