"""The published robustness suites, read in the layout their authors ship: which images, which labels, which sets.

A suite is parsed from ``KIND[:LABEL]=DIR`` (``mbn-eval --suite``, or the recipe's ``eval.suites``) and read into
:class:`Suite`: one or more :class:`SuiteSet` (one per corruption and severity for the ``-C`` suites, else one),
each a list of files or rows of a memory-mapped array, plus the class map onto the model. Nothing is decoded here:
:mod:`mbn.eval.suite_eval` streams the images batch by batch.

* ``cifar10-c``, ``cifar100-c``: ``DIR/<corruption>.npy`` (uint8 NHWC, the 5 severities stacked, severity 1
  first) and ``DIR/labels.npy``; classes in CIFAR's label order (or ``DIR/classes.txt``).
* ``imagenet-c``: ``DIR/<corruption>/<severity>/<wnid>/*.JPEG``.
* ``imagenet-a``, ``imagenet-r``: ``DIR/<wnid>/*``; scored among the suite's 200 classes.
* ``imagenet-sketch``, ``stylized-imagenet``: ``DIR/<wnid>/*``.
* ``imagenet-v2``: ``DIR/<class index 0-999>/*`` (ImageNet-1k's index order).
* ``folder``: ``DIR/<class name>/*``; a subset of the model's classes is scored among itself.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mbn.eval.classes import (
    CIFAR10_CLASSES,
    CIFAR100_CLASSES,
    ClassMap,
    ClassMatchError,
    imagenet_subset,
    imagenet_synsets,
    match_classes,
)
from mbn.eval.corruptions import ALL_CORRUPTIONS, CORRUPTIONS, SEVERITIES
from mbn.eval.suite_spec import CORRUPTION_KINDS, KINDS, WHERE, SuiteError, SuiteSpec, parse_specs

__all__ = [
    "CORRUPTION_KINDS",
    "KINDS",
    "WHERE",
    "Suite",
    "SuiteError",
    "SuiteSet",
    "SuiteSpec",
    "parse_specs",
    "read_suite",
]


@dataclass(frozen=True)
class SuiteSet:
    """One scored set: all of a suite, or one (corruption, severity) of a ``-C`` suite.

    Exactly one of ``files`` (image paths) and ``rows`` (indices into ``array``) is set; ``labels`` are suite label
    indices, one per image.
    """

    corruption: str | None
    severity: int | None
    labels: np.ndarray
    files: list[str] | None = None
    array: np.ndarray | None = None  # memory-mapped, read-only
    rows: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Suite:
    """A suite read from disk: its sets, how its labels map onto the model, and how its images are prepared.

    ``cropped`` is the fraction of the shorter side a publisher already kept: ImageNet-C's files are the central
    224 x 224 of validation images resized to 256 (0.875), so they are not cropped a second time (see
    :class:`mbn.eval.suite_eval.Preparation`).
    """

    spec: SuiteSpec
    sets: list[SuiteSet]
    classes: ClassMap
    cropped: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        """Images over all sets."""
        return sum(len(s) for s in self.sets)


# --------------------------------------------------------------------------------------------- reading


def _folder(spec: SuiteSpec, layout: str) -> Path:
    root = spec.root
    if not root.is_dir():
        state = "does not exist" if not root.exists() else "is not a directory"
        raise SuiteError(f"{spec.name}: {root} {state} (expected {layout})")
    return root


def _subdirs(path: Path, spec: SuiteSpec) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    except OSError as err:
        raise SuiteError(f"{spec.name}: cannot read {path} ({err.strerror})") from None


def _image_folder(spec: SuiteSpec, root: Path, layout: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Class folders (sorted) and ``(path, class index)`` samples of ``root/<class>/*``, as torchvision lists them."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    from mbn.config import RecipeError
    from mbn.data.files import check_tree

    classes = _subdirs(root, spec)
    if not classes:
        raise SuiteError(f"{spec.name}: no class folders in {root} (expected {layout})")
    try:
        check_tree(root)  # make_dataset follows links: a loop would repeat images under wrong labels
        samples = make_dataset(str(root), {c: i for i, c in enumerate(classes)}, IMG_EXTENSIONS, allow_empty=True)
    except RecipeError as err:
        raise SuiteError(f"{spec.name}: {_unkeyed(err)}") from None
    except (OSError, TypeError) as err:  # an unreadable folder, a name that is not text
        raise SuiteError(f"{spec.name}: cannot list {root} ({err})") from None
    if not samples:
        raise SuiteError(f"{spec.name}: no images in {root}/<class>/ (expected {layout})")
    return classes, samples


def _subset(num: int, limit: int | None) -> np.ndarray:
    from mbn.data import subset_indices

    return subset_indices(num, limit, "--limit")


def _unkeyed(err: Exception) -> str:
    """A training-data message without its recipe key (the suite is named instead)."""
    return str(err).removeprefix("key 'data.root': ")


def _files_set(spec: SuiteSpec, samples: list[tuple[str, int]], limit: int | None, corruption: str | None = None,
               severity: int | None = None) -> SuiteSet:  # fmt: skip
    """The (limited) files of one set, each checked to be a readable, non-empty file before anything is scored."""
    from mbn.config import RecipeError
    from mbn.data.files import check_image_files

    keep = _subset(len(samples), limit)
    chosen = [samples[i] for i in keep]
    try:
        check_image_files(chosen)
    except RecipeError as err:
        raise SuiteError(f"{spec.name}: {_unkeyed(err)}") from None
    labels = np.asarray([label for _, label in chosen], dtype=np.int64)
    return SuiteSet(corruption, severity, labels, files=[path for path, _ in chosen])


def _match(spec: SuiteSpec, labels: Sequence[str], model_classes: Sequence[str], **kw: Any) -> ClassMap:
    try:
        return match_classes(f"{spec.name}", labels, model_classes, **kw)
    except ClassMatchError as err:
        raise SuiteError(str(err)) from None


def _read_tree_suite(spec: SuiteSpec, model_classes: Sequence[str], limit: int | None) -> Suite:
    """ImageNet-A/-R/Sketch/V2/Stylized and ``folder``: ``DIR/<class>/*``."""
    what = "class indices 0-999" if spec.kind == "imagenet-v2" else ("wnids" if spec.kind != "folder" else "classes")
    layout = f"{spec.root}/<{what}>/<image>"
    classes, samples = _image_folder(spec, _folder(spec, layout), layout)
    labels = classes
    if spec.kind == "imagenet-v2":  # folders are ImageNet-1k class indices
        synsets = imagenet_synsets()
        bad = [c for c in classes if not (c.isdigit() and int(c) < len(synsets))]
        if bad:
            raise SuiteError(f"{spec.name}: folder {spec.root / bad[0]} is not a class index 0-999 ({layout})")
        labels = [synsets[int(c)] for c in classes]
    restrict: Sequence[str] | None = None
    notes = []
    if spec.kind in ("imagenet-a", "imagenet-r"):
        restrict = imagenet_subset(spec.kind)
    elif spec.kind == "folder":
        present = set(labels)
        if present < set(model_classes):  # a subset of the model's classes is scored among itself
            restrict = [c for c in model_classes if c in present]
            if len(restrict) < 2:
                raise SuiteError(
                    f"{spec.name}: {spec.root} holds one of the model's classes; scored among itself it would be "
                    "100 % (give a folder with at least two classes)"
                )
    classes_map = _match(spec, labels, model_classes, restrict_to=restrict)
    if restrict is None and len(set(labels)) < len(model_classes):
        notes.append(f"images of {len(set(labels))} of the model's {len(model_classes)} classes, scored among all")
    return Suite(spec, [_files_set(spec, samples, limit)], classes_map, notes=notes)


def _read_imagenet_c(spec: SuiteSpec, model_classes: Sequence[str], limit: int | None,
                     corruptions: Sequence[str], severities: Sequence[int]) -> Suite:  # fmt: skip
    layout = f"{spec.root}/<corruption>/<severity 1-5>/<wnid>/<image>"
    root = _folder(spec, layout)
    folders = {c: root / c for c in corruptions if (root / c).is_dir()}
    for category in CATEGORIES:  # the release's tarballs extract to <category>/<corruption>/ when kept apart
        folders.update(
            {c: root / category / c for c in corruptions if c not in folders and (root / category / c).is_dir()}
        )
    present = [c for c in corruptions if c in folders]
    if not present:
        found = ", ".join(_subdirs(root, spec)[:5]) or "nothing"
        raise SuiteError(f"{spec.name}: no corruption folders in {root} (found {found}; expected {layout})")
    sets, labels, notes, first = [], None, [], root
    for corruption in present:
        for severity in severities:
            folder = folders[corruption] / str(severity)
            if not folder.is_dir():
                notes.append(f"{corruption}/{severity}")
                continue
            classes, samples = _image_folder(spec, folder, layout)
            if labels is None:
                labels, first = classes, folder
            elif classes != labels:
                raise SuiteError(f"{spec.name}: {folder} has other class folders than {first}")
            sets.append(_files_set(spec, samples, limit, corruption, severity))
    if not sets or labels is None:
        raise SuiteError(f"{spec.name}: no severity folders 1-5 under {root}/<corruption>/ ({layout})")
    notes = [f"missing severity folders: {', '.join(notes)}"] if notes else []
    classes_map = _match(spec, labels, model_classes)
    return Suite(spec, sets, classes_map, cropped=IMAGENET_C_CROP, notes=_coverage(sets) + notes)


IMAGENET_C_CROP = 224 / 256
"""ImageNet-C's generator resized validation images to 256 and kept the central 224 (``make_imagenet_c.py``)."""

CATEGORIES = ("noise", "blur", "weather", "digital", "extra")
"""ImageNet-C's tarballs (``noise.tar``, ...): their corruption folders may sit one level down, under these names."""


def _coverage(sets: Sequence[SuiteSet]) -> list[str]:
    """Notes on a -C suite's sets that fall short of the 15 benchmark corruptions x 5 severities."""
    present = {(s.corruption, s.severity) for s in sets}
    missing = [c for c in CORRUPTIONS if not any(k[0] == c for k in present)]
    partial = [c for c in CORRUPTIONS if c not in missing and any((c, v) not in present for v in SEVERITIES)]
    notes = [f"missing benchmark corruptions: {', '.join(missing)}"] if missing else []
    if partial:
        notes.append(f"not all five severities: {', '.join(partial)}")
    return notes


def _load_array(path: Path, spec: SuiteSpec) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise SuiteError(f"{spec.name}: cannot read {path} ({str(err).splitlines()[0]})") from None
    if not isinstance(array, np.ndarray):  # an .npz archive saved under a .npy name
        raise SuiteError(f"{spec.name}: {path} is not a .npy array (np.save's format), found {type(array).__name__}")
    return array


def _read_cifar_c(spec: SuiteSpec, model_classes: Sequence[str], limit: int | None,
                  corruptions: Sequence[str], severities: Sequence[int]) -> Suite:  # fmt: skip
    layout = f"{spec.root}/<corruption>.npy and {spec.root}/labels.npy"
    root = _folder(spec, layout)
    labels_file = root / "labels.npy"
    if not labels_file.is_file():
        raise SuiteError(f"{spec.name}: {labels_file} not found (expected {layout})")
    labels = _load_array(labels_file, spec)
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) == 0 or len(labels) % len(SEVERITIES):
        raise SuiteError(
            f"{spec.name}: {labels_file} must be a 1-D integer array of 5 x N labels (5 severities "
            f"stacked), got shape {labels.shape} {labels.dtype}"
        )
    names = _class_names(spec, root)
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(names)):
        raise SuiteError(
            f"{spec.name}: {labels_file} holds labels {int(labels.min())}..{int(labels.max())}, "
            f"outside the suite's {len(names)} classes"
        )
    per_severity = len(labels) // len(SEVERITIES)
    base = np.asarray(labels[:per_severity])
    for s in range(1, len(SEVERITIES)):
        if not np.array_equal(labels[s * per_severity : (s + 1) * per_severity], base):
            raise SuiteError(f"{spec.name}: {labels_file} is not 5 repeats of one label list (severity {s + 1})")
    present = [c for c in corruptions if (root / f"{c}.npy").is_file()]
    if not present:
        found = ", ".join(sorted(p.name for p in root.glob("*.npy"))[:5]) or "no .npy files"
        raise SuiteError(f"{spec.name}: no corruption arrays in {root} (found {found}; expected {layout})")
    keep = _subset(per_severity, limit)
    sets = []
    for corruption in present:
        path = root / f"{corruption}.npy"
        array = _load_array(path, spec)
        if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8 or min(array.shape[1:3]) < 1:
            raise SuiteError(
                f"{spec.name}: {path} must be uint8 (N, H, W, 3) images, got shape {array.shape} {array.dtype}"
            )
        if len(array) != len(labels):
            raise SuiteError(f"{spec.name}: {path} holds {len(array)} images but {labels_file} {len(labels)} labels")
        for severity in severities:
            rows = (severity - 1) * per_severity + keep
            sets.append(SuiteSet(corruption, severity, base[keep].astype(np.int64), array=array, rows=rows))
    label_names = [names[i] for i in range(len(names))]
    return Suite(spec, sets, _match(spec, label_names, model_classes), notes=_coverage(sets))


def _class_names(spec: SuiteSpec, root: Path) -> tuple[str, ...]:
    """CIFAR's label order, or ``DIR/classes.txt`` (one name per line; written by ``mbn-eval --write-suite``)."""
    listed = root / "classes.txt"
    if listed.is_file():
        try:
            text = listed.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise SuiteError(f"{spec.name}: cannot read {listed} as UTF-8 text ({err})") from None
        names = tuple(line.strip() for line in text.splitlines() if line.strip())
        if not names or len(set(names)) != len(names):
            raise SuiteError(f"{spec.name}: {listed} must list distinct class names, one per line")
        return names
    return CIFAR10_CLASSES if spec.kind == "cifar10-c" else CIFAR100_CLASSES


def read_suite(
    spec: SuiteSpec,
    model_classes: Sequence[str],
    *,
    limit: int | None = None,
    corruptions: Sequence[str] = ALL_CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
) -> Suite:
    """List a suite's images (nothing decoded) and match its classes to the model's.

    Args:
        spec: the suite.
        model_classes: the class names stored with the model, in output order.
        limit: a fixed seeded subset of N images per set (the same positions in every set of a ``-C`` suite).
        corruptions: ``-C`` suites: the corruptions to read when present (default: the 15 and the 4 extra ones).
        severities: ``-C`` suites: the severities to read.

    Raises:
        SuiteError: a missing or mis-laid folder, arrays whose shapes or lengths disagree, labels outside the
            suite's classes, classes the model lacks, no class in common; one line naming the file or folder.
    """
    if spec.kind in ("cifar10-c", "cifar100-c"):
        return _read_cifar_c(spec, model_classes, limit, corruptions, severities)
    if spec.kind == "imagenet-c":
        return _read_imagenet_c(spec, model_classes, limit, corruptions, severities)
    return _read_tree_suite(spec, model_classes, limit)
