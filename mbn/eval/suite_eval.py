"""Score a model on a robustness suite: top-1/top-5 among its classes, mCE, BN adaptation, entropy routing.

Covers the ``-C`` suites' per-corruption tables, test-time BN adaptation and entropy-routed BNs.

Every set of a suite (all of it, or one corruption and severity) is read batch by batch with the run's evaluation
transform (resize the shorter side to ``image_size / crop_fraction``, centre crop), decoded in DataLoader workers;
the ``-C`` arrays are memory-mapped and sliced per batch. Scoring is in eval mode through one BN source
(the main one unless ``--bn`` says otherwise).

Variants reported beside the plain score:

* ``bn_adapt``: the chosen BN's statistics re-estimated on each set's unlabelled images before scoring it
  (:mod:`mbn.eval.bn_adapt`; Schneider et al., NeurIPS 2020).
* ``bn_route_auto``: each test batch goes through every BN and the prediction of the BN whose softmax has the
  lowest mean entropy is kept: an ensemble baseline that needs no labels (entropy as a confidence signal, as in
  Wang et al.'s Tent, ICLR 2021). It is a per-batch choice, so it depends on the batch size.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from mbn.eval.classes import ClassMap
from mbn.eval.corruptions import CORRUPTIONS, EXTRA_CORRUPTIONS
from mbn.eval.metrics import imagenet_c_ce, per_corruption_ce
from mbn.eval.suites import CORRUPTION_KINDS, Suite, SuiteError, SuiteSet
from mbn.routing import eval_mode, use_source

Batch = tuple[Tensor, Tensor]
ToDevice = Callable[[Batch], Batch]


# ------------------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class Preparation:
    """How suite images become model inputs: the run's evaluation transform."""

    image_size: int
    crop_fraction: float = 1.0  # resize the shorter side to image_size / crop_fraction, then centre-crop
    cropped: float | None = None  # the fraction of the shorter side the suite's files already are (ImageNet-C: 0.875)

    def __call__(self, image: Tensor) -> Tensor:
        """uint8 (3, H, W) -> uint8 (3, S, S).

        Files already cropped to a fraction ``c`` of their shorter side are cropped further only by what remains,
        ``crop_fraction / c`` (never below 1): ImageNet-C's 224 crops go to a 224-px model unchanged, as the authors
        evaluate them, and a model whose own crop is wider sees the whole file.
        """
        from mbn.data.transforms import resize_centre_crop

        fraction = self.crop_fraction if self.cropped is None else min(1.0, self.crop_fraction / self.cropped)
        return resize_centre_crop(image, self.image_size, fraction)


class SuiteFiles(Dataset):
    """The image files of a :class:`SuiteSet`, decoded and prepared per batch (``__getitems__``) in workers."""

    def __init__(self, files: Sequence[str], labels: np.ndarray, prepare: Preparation) -> None:
        self.files, self.labels, self.prepare = list(files), labels, prepare

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from mbn.config import RecipeError
        from mbn.data.files import decode_image_file

        try:
            image = decode_image_file(self.files[index])
        except RecipeError as err:  # its message starts with the recipe key of training data
            raise SuiteError(str(err).removeprefix("key 'data.root': ")) from None
        return self.prepare(image).contiguous(), int(self.labels[index])

    def __getitems__(self, indices: list[int]) -> Batch:
        items = [self[i] for i in indices]
        return torch.stack([image for image, _ in items]), torch.as_tensor([label for _, label in items])


def set_batches(
    suite_set: SuiteSet, prepare: Preparation, batch_size: int, workers: int = 0, pin_memory: bool = False
) -> Iterable[Batch]:
    """``(uint8 N3SS images, suite labels)`` batches of a set, in order, streamed (never the whole set at once).

    Workers are capped by the CPU count and the number of batches (a one-batch set is read in-process).
    """
    if suite_set.files is not None:
        batches = -(-len(suite_set) // batch_size)
        workers = min(workers, os.cpu_count() or 1, batches if batches > 1 else 0)
        return _file_batches(suite_set, prepare, batch_size, workers, pin_memory)
    return _array_batches(suite_set, prepare, batch_size)


def _file_batches(
    suite_set: SuiteSet, prepare: Preparation, batch_size: int, workers: int, pin: bool
) -> Iterator[Batch]:
    from mbn.data.loaders import closing_workers, collate_batch, worker_init_fn

    assert suite_set.files is not None
    n = len(suite_set)
    loader = DataLoader(
        SuiteFiles(suite_set.files, suite_set.labels, prepare),
        batch_sampler=[list(range(lo, min(lo + batch_size, n))) for lo in range(0, n, batch_size)],
        num_workers=workers,
        collate_fn=collate_batch,  # type: ignore[arg-type]
        pin_memory=pin,
        worker_init_fn=worker_init_fn,
    )
    yield from closing_workers(loader)


def _array_batches(suite_set: SuiteSet, prepare: Preparation, batch_size: int) -> Iterator[Batch]:
    assert suite_set.array is not None and suite_set.rows is not None
    for lo in range(0, len(suite_set), batch_size):
        rows = suite_set.rows[lo : lo + batch_size]
        images = torch.from_numpy(np.ascontiguousarray(suite_set.array[rows])).permute(0, 3, 1, 2)
        if images.shape[-2:] != (prepare.image_size, prepare.image_size):
            images = torch.stack([prepare(image) for image in images])
        yield images.contiguous(), torch.from_numpy(suite_set.labels[lo : lo + batch_size])


# ------------------------------------------------------------------------------------------------ scoring


@dataclass
class Counts:
    """Correct top-1 / top-k predictions over a number of images, and which BN each image went through."""

    top1: int = 0
    top5: int = 0
    total: int = 0
    picked: dict[str, int] = field(default_factory=dict)

    def add(self, logits: Tensor, targets: Tensor, k: int) -> None:
        """Count one batch of restricted logits against targets (positions among the competing classes)."""
        top = logits.topk(k, dim=1).indices
        hits = top == targets[:, None]
        self.top1 += int(hits[:, 0].sum())
        self.top5 += int(hits.any(1).sum())
        self.total += int(targets.numel())

    def metrics(self) -> dict[str, float]:
        """``{"top1": .., "top5": ..}`` as fractions."""
        total = max(self.total, 1)
        return {"top1": self.top1 / total, "top5": self.top5 / total}


def _entropy(logits: Tensor) -> Tensor:
    logp = logits.float().log_softmax(1)
    return -(logp.exp() * logp).sum(1).mean()


@torch.no_grad()
def score_set(
    model: nn.Module,
    batches: Iterable[Batch],
    source: str,
    to_device: ToDevice,
    classes: ClassMap,
    route_sources: Sequence[str] = (),
) -> tuple[Counts, Counts | None]:
    """Top-1/top-5 counts through ``source``'s BN, and (with ``route_sources``) through the lowest-entropy BN.

    Logits are restricted to ``classes.outputs`` before the arg-max, so a 200-class suite is scored among its 200.
    """
    k = min(5, classes.num_classes)
    plain, routed = Counts(), (Counts() if route_sources else None)
    with eval_mode(model):
        for batch in batches:
            images, labels = to_device(batch)
            targets = classes.targets.to(labels.device)[labels]
            outputs = classes.outputs.to(images.device)
            with use_source(model, source):
                logits = model(images)[:, outputs]
            plain.add(logits, targets, k)
            if routed is not None:
                candidates = {source: logits}
                for name in route_sources:
                    if name not in candidates:
                        with use_source(model, name):
                            candidates[name] = model(images)[:, outputs]
                best = min(candidates, key=lambda name: float(_entropy(candidates[name])))
                routed.add(candidates[best], targets, k)
                routed.picked[best] = routed.picked.get(best, 0) + int(targets.numel())
    return plain, routed


# ------------------------------------------------------------------------------------------------ results


def _summary(
    suite: Suite, counts: Sequence[tuple[SuiteSet, Counts]], reference: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The metrics of one variant over a suite's sets."""
    total = Counts()
    for _, c in counts:
        total.top1, total.top5, total.total = total.top1 + c.top1, total.top5 + c.top5, total.total + c.total
        for name, n in c.picked.items():
            total.picked[name] = total.picked.get(name, 0) + n
    out: dict[str, Any] = {**total.metrics(), "num_images": total.total}
    if suite.classes.num_classes <= 5:  # top-5 among five or fewer classes is always right
        out["top5"] = None
    if total.picked:
        out["picked"] = {name: n / max(total.total, 1) for name, n in sorted(total.picked.items())}
    if suite.spec.kind not in CORRUPTION_KINDS:
        return out
    acc = {(s.corruption, s.severity): c.metrics()["top1"] for s, c in counts}
    top5 = {(s.corruption, s.severity): c.metrics()["top5"] for s, c in counts} if out["top5"] is not None else None
    return {**out, **corruption_metrics(suite.spec.kind, acc, top5, reference)}


def corruption_metrics(
    kind: str,
    acc: Mapping[tuple[Any, Any], float],
    top5: Mapping[tuple[Any, Any], float] | None,
    reference: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A ``-C`` suite's tables: accuracy per corruption and severity, means, and CE / mCE.

    ``top1``/``top5`` become means over the benchmark corruptions' sets (the extra four are reported apart, as the
    authors hold them out); ImageNet-C's CE is against AlexNet's published errors, a CIFAR suite's against
    ``reference`` (the same suite in another run's ``eval.json``), and mCE is given only when all 15 benchmark
    corruptions are complete.
    """
    names = list(dict.fromkeys(c for c, _ in acc))
    severities = sorted({s for _, s in acc})
    standard = [key for key in acc if key[0] in CORRUPTIONS]
    extra = [key for key in acc if key[0] in EXTRA_CORRUPTIONS]
    if not standard:
        raise SuiteError(f"{kind}: none of the 15 benchmark corruptions was evaluated")
    out: dict[str, Any] = {
        "top1": float(np.mean([acc[k] for k in standard])),
        "top5": float(np.mean([top5[k] for k in standard])) if top5 is not None else None,
        "corruptions": {c: {str(s): acc[(c, s)] for s in severities if (c, s) in acc} for c in names},
        "per_corruption_mean": {c: float(np.mean([acc[k] for k in acc if k[0] == c])) for c in names},
        "per_severity_mean": {str(s): float(np.mean([acc[k] for k in standard if k[1] == s])) for s in severities},
        "mean_acc": float(np.mean([acc[k] for k in standard])),
        "extra_mean_acc": float(np.mean([acc[k] for k in extra])) if extra else None,
        "ce": None,
        "mce": None,
        "mce_reference": None,
    }
    complete = [c for c in CORRUPTIONS if all((c, s) in acc for s in (1, 2, 3, 4, 5))]
    out["complete"] = len(complete) == len(CORRUPTIONS)  # the whole benchmark, 15 corruptions x 5 severities
    if kind == "imagenet-c":
        ce = imagenet_c_ce(acc)
        out["ce"] = ce or None
        out["mce_reference"] = "AlexNet (Hendrycks & Dietterich, ICLR 2019)"
        if len(complete) == len(CORRUPTIONS):
            out["mce"] = float(np.mean(list(ce.values())))
    elif reference is not None:
        ref_table = {(c, int(s)): float(v) for c, row in reference["table"].items() for s, v in row.items()}
        mine = {k: 1.0 - v for k, v in acc.items() if k[0] in CORRUPTIONS}
        used = [c for c in CORRUPTIONS if any(k[0] == c for k in mine)]
        try:
            ce = per_corruption_ce(mine, {k: 1.0 - v for k, v in ref_table.items()}, used, severities)
        except ValueError as err:
            raise SuiteError(f"--reference: {reference['path']}: {err}") from None
        out["ce"], out["mce_reference"] = ce, reference["path"]
        if len(complete) == len(CORRUPTIONS):
            out["mce"] = float(np.mean(list(ce.values())))
    return out


def evaluate_suite(
    model: nn.Module,
    suite: Suite,
    *,
    source: str,
    to_device: ToDevice,
    prepare: Preparation,
    batch_size: int,
    workers: int = 0,
    pin_memory: bool = False,
    bn_adapt: bool = False,
    bn_adapt_prior: float = 0.0,
    route_sources: Sequence[str] = (),
    reference: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Score ``suite`` (see the module docstring); returns its ``eval.json`` entry.

    Args:
        model: a converted model in eval mode.
        suite: from :func:`mbn.eval.suites.read_suite`.
        source: the BN source to score (and adapt) through.
        to_device: turns a uint8 batch into float images in [0, 1] on the model's device.
        prepare: the run's evaluation transform (``resize`` is taken from the suite).
        batch_size: images per forward.
        workers: DataLoader workers decoding image files.
        pin_memory: pin batches for asynchronous copies to a GPU.
        bn_adapt: also score with ``source``'s BN statistics re-estimated on each set (``bn_adapt`` entry).
        bn_adapt_prior: ``N`` of Schneider et al.'s ``N / (N + n)`` prior weight (0: full re-estimation).
        route_sources: also score through the lowest-entropy BN among these per batch (``bn_route_auto`` entry).
        reference: ``{"path": .., "table": {corruption: {severity: acc}}}``: CE / mCE of a CIFAR ``-C`` suite.
        progress: show a progress bar over the sets (only on a terminal).
    """
    from dataclasses import replace

    from tqdm.auto import tqdm

    from mbn.eval.bn_adapt import adapted_bn

    prepare = replace(prepare, cropped=suite.cropped)
    plain: list[tuple[SuiteSet, Counts]] = []
    routed: list[tuple[SuiteSet, Counts]] = []
    adapted: list[tuple[SuiteSet, Counts]] = []
    sets = tqdm(suite.sets, desc=suite.spec.key, leave=False, disable=None if progress else True)
    for suite_set in sets:

        def batches(s: SuiteSet = suite_set) -> Iterable[Batch]:
            return set_batches(s, prepare, batch_size, workers, pin_memory)

        counts, auto = score_set(model, batches(), source, to_device, suite.classes, route_sources)
        plain.append((suite_set, counts))
        if auto is not None:
            routed.append((suite_set, auto))
        if bn_adapt:
            with adapted_bn(model, batches(), source, to_device, prior=bn_adapt_prior) as n:
                if n < 2:
                    raise SuiteError(f"{suite.spec.name}: --bn-adapt needs batches of 2 or more images")
                counts, _ = score_set(model, batches(), source, to_device, suite.classes)
            adapted.append((suite_set, counts))
    entry: dict[str, Any] = {
        "kind": suite.spec.kind,
        "dir": str(suite.spec.root.resolve()),
        "bn": source,
        "num_classes": suite.classes.num_classes,
        "restricted": suite.classes.restricted,
        "notes": list(suite.notes),
        **_summary(suite, plain, reference),
        "bn_adapt": None,
        "bn_route_auto": None,
    }
    if adapted:
        entry["bn_adapt"] = {"prior": bn_adapt_prior, **_summary(suite, adapted, reference)}
    if routed:
        entry["bn_route_auto"] = {"sources": list(route_sources), **_summary(suite, routed, None)}
    return entry
