"""WebDataset tar shards (``data.name=webdataset``): streamed, split across ranks and workers, resumable mid-epoch.

A shard is a tar file whose members come in samples: ``<key>.jpg`` (or ``.jpeg``, ``.png``, any format
torchvision's ImageFolder lists) and ``<key>.cls`` (the class index as decimal text), as timm and the
``webdataset`` package read them; ``python -m mbn.data.make_shards`` writes them from an ImageFolder tree.
``data.root`` is the brace pattern of the training shards (``/data/train-{000000..001023}.tar``), ``data.test_root``
that of the evaluation shards.

Sizes: the number of samples of every shard (the schedule needs the steps per epoch before training) and the class
names come from the JSON index beside the shards (``<prefix>.index.json``, e.g. ``train.index.json`` for
``train-{...}.tar``; :func:`index_path`). Without one, or for a shard whose size on disk differs from the index's,
the shards' tar headers (and their tiny ``.cls`` members) are scanned once, and a warning says so.

An epoch (``trainer.seed``, ``epoch``):

* the shards are permuted (:func:`mbn.data.loaders.epoch_permutation` of the shard count); rank ``r`` of ``W`` takes
  shards ``r, r + W, ...`` of that order, so no sample is read by two ranks;
* every rank trains on the same number of samples, ``Q`` = the sum of the ``len(shards) // W`` smallest shards (the
  fewest a rank can be dealt), in ``Q // batch_size`` batches: DDP's ranks step together. A rank dealt more drops
  the rest of its stream that epoch, as a drop-last does;
* the rank's stream (its shards in order, each read sequentially) is cut into windows of about
  :data:`SHUFFLE_WINDOW` samples (whole batches), and each window's samples are permuted (seeded by seed, epoch, rank,
  window): a batch mixes samples from across its window, so batches differ from epoch to epoch;
* DataLoader worker ``w`` of ``K`` builds batches ``w, w + K, ...``: it reads the headers of its rank's shards and
  the bytes of its own samples only (a seek over the others), so every image is read and decoded once, and the
  batches do not depend on ``data.num_workers``;
* each sample's crop and flip are seeded by ``(seed, epoch, its index in the whole set)``, as for a streamed tree.

Resume is exact mid-epoch: batch ``b`` is defined by ``(seed, epoch, rank, world size)`` alone, so
``epoch_batches(epoch, start_batch)`` skips whole shards by their counts and, inside a shard, the samples of the
trained batches by their headers, without decoding them.

A damaged shard stops the run with one line naming the shard file and member: an image that cannot be decoded, a
sample without its ``.cls`` or image, a ``.cls`` that is not a class index, a truncated tar, fewer samples than the
index says.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mbn.config import RecipeError
from mbn.data.arrays import ArraySplit
from mbn.data.files import DEFAULT_MAX_IMAGE_PIXELS, decode_image_file, image_header_size, max_image_file_bytes
from mbn.data.loaders import ResumableBatches, closing_workers, collate_batch, epoch_permutation, worker_init_fn
from mbn.data.streamed import EncodedBatch, StreamingImageFolder
from mbn.errors import first_line

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]
#: Samples a window of the rank's stream holds (rounded up to whole batches); its samples are permuted.
SHUFFLE_WINDOW = 4096
#: Image members a sample may have (torchvision's ImageFolder extensions).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff")
#: The ``format`` entry of a shard index (``<prefix>.index.json``).
INDEX_FORMAT = "mbn-shards"
#: One read sample: (index in the whole set, "shard member name" for messages, image bytes or None, label).
Sample = tuple[int, str, bytes | None, int]
#: The members of one sample: (extension, header).
Group = list[tuple[str, "Member"]]


def member_key(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a member name as webdataset groups them (the key ends at the basename's first dot)."""
    base = name.rpartition("/")[2]
    if "." not in base:
        return None
    stem, _, ext = base.partition(".")
    if not stem:
        return None  # ".jpg": no key
    return name[: len(name) - len(base)] + stem, ext.lower()


def expand_pattern(pattern: str, key: str) -> list[str]:
    """The shard files of a brace pattern (webdataset's ``braceexpand``), every one present.

    Raises:
        RecipeError: a malformed pattern, no file matching it, or a missing shard, naming ``key``.
    """
    from braceexpand import braceexpand

    try:
        paths = list(itertools.islice(braceexpand(str(pattern)), MAX_SHARDS + 1))
    except Exception as err:  # UnbalancedBracesError and the like
        raise RecipeError(f"key '{key}': malformed shard pattern {pattern!r} ({first_line(err)})") from None
    if len(paths) > MAX_SHARDS:
        raise RecipeError(f"key '{key}': the shard pattern {pattern} names over {MAX_SHARDS:,} files (a typo?)")
    missing = [p for p in paths if not os.path.isfile(p)]
    if len(missing) == len(paths):
        raise RecipeError(f"key '{key}': no file matches the shard pattern {pattern} (first: {paths[0]})")
    if missing:
        raise RecipeError(f"key '{key}': shard {missing[0]} of {pattern} is missing ({len(missing)} of {len(paths)})")
    return paths


def index_path(pattern: str, first_shard: str) -> Path:
    """The JSON index of a pattern: ``<prefix>.index.json`` beside the first shard (``train-{...}.tar``: ``train``)."""
    base = os.path.basename(pattern)
    head = base.split("{", 1)[0] if "{" in base else re.sub(r"-\d+$", "", base.removesuffix(".tar"))
    return Path(first_shard).parent / f"{head.rstrip('-_.') or 'shards'}.index.json"


def check_shards_present(data: Any) -> None:
    """``data.root`` and ``data.test_root`` name shard patterns whose files exist (nothing is read)."""
    if not getattr(data, "test_root", None):
        raise RecipeError(
            "key 'data.test_root': webdataset needs the evaluation shards' brace pattern "
            "(e.g. /data/test-{000000..000009}.tar; python -m mbn.data.make_shards prints it)"
        )
    expand_pattern(str(data.root), "data.root")
    expand_pattern(str(data.test_root), "data.test_root")


@dataclass
class ShardSet:
    """The shards of one pattern: paths, sample counts, class names, and whether the counts were scanned."""

    paths: list[str]
    counts: list[int]
    classes: list[str]
    key: str  # the recipe key naming the pattern, for messages
    scanned: bool = False

    def __post_init__(self) -> None:
        #: index in the whole set of every shard's first sample
        self.offsets = [0, *np.cumsum(self.counts)[:-1].tolist()]

    def __len__(self) -> int:
        return int(sum(self.counts))

    def fingerprints(self, image_size: int) -> tuple[str, str]:
        """(shard names and counts, the same plus the first 64 KiB of up to 64 shards): checked on resume."""
        digest = hashlib.sha1(f"webdataset|{len(self)}|{image_size}".encode())
        for path, count in zip(self.paths, self.counts, strict=True):
            digest.update(f"|{os.path.basename(path)}:{count}".encode("utf-8", "surrogateescape"))
        listing = digest.hexdigest()[:20]
        for path in self.paths[:: max(1, len(self.paths) // 64)][:64]:
            with open(path, "rb") as f:
                digest.update(f.read(2**16))
        return listing, digest.hexdigest()[:20]


def load_shard_set(pattern: str, key: str, classes: Sequence[str] | None = None) -> ShardSet:
    """The shards of ``pattern`` with their counts (from the index; scanned where it is absent or stale).

    Args:
        pattern: a brace pattern.
        key: the recipe key naming it.
        classes: the class names (evaluation shards take the training set's); else the index's, else ``0..K-1``.
    """
    paths = expand_pattern(pattern, key)
    where = index_path(pattern, paths[0])
    index: dict[str, Any] = {}
    if where.is_file():
        try:
            index = json.loads(where.read_text())
            entries = {str(e["name"]): e for e in index["shards"]}
            for e in entries.values():
                if not isinstance(e["samples"], int) or not isinstance(e["bytes"], int) or e["samples"] < 0:
                    raise ValueError(f"shard {e['name']}: samples and bytes must be counts")
            classes_given = index.get("classes", [])
            if not isinstance(classes_given, list) or len(set(map(str, classes_given))) != len(classes_given):
                raise ValueError("classes must be a list of distinct names")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise RecipeError(f"key '{key}': cannot read the shard index {where} ({first_line(err)})") from None
    else:
        entries = {}
    counts: list[int] = []
    stale: list[str] = []
    labels_seen = -1
    for path in paths:
        entry = entries.get(os.path.basename(path))
        if entry is not None and int(entry.get("bytes", -1)) == os.path.getsize(path):
            counts.append(int(entry["samples"]))
            continue
        stale.append(path)
        count, top = scan_shard(path, key)
        counts.append(count)
        labels_seen = max(labels_seen, top)
    if stale:
        why = "no index" if not entries else "shards absent from it or of another size"
        log.warning("%s: counted the samples of %d shard(s) by scanning their tar headers (%s at %s)",
                    key, len(stale), why, where)  # fmt: skip
    names = list(classes) if classes is not None else [str(c) for c in index.get("classes", [])]
    if classes is None and not names:
        if len(stale) < len(paths):  # an index without classes: every shard's labels are needed
            labels_seen = max(scan_shard(p, key)[1] for p in paths)
        if labels_seen >= MAX_SCANNED_CLASSES:
            raise RecipeError(
                f"key '{key}': a .cls of {labels_seen} implies over {MAX_SCANNED_CLASSES:,} classes and no index names "
                "them (a typo'd label?); write the shards with python -m mbn.data.make_shards"
            )
        names = [str(i) for i in range(labels_seen + 1)]
    if sum(counts) == 0:
        raise RecipeError(f"key '{key}': the shards of {pattern} hold no samples")
    return ShardSet(paths, counts, names, key, scanned=bool(stale))


def scan_shard(path: str, key: str) -> tuple[int, int]:
    """``(samples, largest label)`` of a shard, from its headers and ``.cls`` members (no image is read)."""
    reader = ShardReader(ShardSet([path], [-1], [], key), None)
    count, top = 0, -1
    for _, _, _, label in reader.read_shard(0, lambda i: True, images=False):
        count, top = count + 1, max(top, label)
    return count, top


class Member(NamedTuple):
    """A regular file of a tar: its name, where its data starts and its size in bytes."""

    name: str
    offset: int
    size: int


_ZERO_BLOCK = bytes(512)
#: The most of a pax header or GNU long name read (a name, a size: a few hundred bytes in practice).
MAX_EXTENDED_HEADER = 1 << 16
#: The largest ``.cls`` member read (a class index as decimal text).
MAX_LABEL_BYTES = 32
#: The most classes a shard set's labels may imply without an index naming them (a typo'd label is not a class).
MAX_SCANNED_CLASSES = 100_000
#: The most shards a pattern may name (ImageNet-21k in 1,000-image shards is about 14,000).
MAX_SHARDS = 1_000_000


def tar_members(f: BinaryIO, path: str, fail: Callable[[str, str, str], RecipeError]) -> Iterator[Member]:
    """The regular files of an uncompressed tar, from its headers alone (a seek over every member's data).

    ``tarfile`` parses a header in about 90 us, which a worker pays for every sample of its rank's shards (it skips
    the others' samples by their headers); this reads the fields needed (name, size, type; ustar prefixes, GNU long
    names and pax ``path``/``size`` records) in a few. Each header's checksum is checked.

    Raises:
        RecipeError: a damaged header or a truncated member, named by ``fail(path, member, what)``.
    """
    end = os.fstat(f.fileno()).st_size
    offset, last, long_name, long_size = 0, "(the first)", "", -1
    while True:
        f.seek(offset)
        block = f.read(512)
        if block == _ZERO_BLOCK:
            return  # the end-of-archive block
        if not block:  # every tar writer ends with zero blocks: a file cut between two members
            raise fail(path, last, "truncated (the file ends after it, without the end-of-archive blocks)")
        if offset == 0 and block[:2] == b"\x1f\x8b":
            raise fail(path, last, "a gzip-compressed tar; mbn reads uncompressed shards (make_shards writes them)")
        if len(block) < 512:
            raise fail(path, last, f"truncated (a partial header follows it at byte {offset})")
        try:
            valid = _number(block[148:156]) == sum(block) - sum(block[148:156]) + 256
            size, kind = _number(block[124:136]), block[156:157]
        except ValueError:
            valid = False
        if not valid:
            raise fail(path, last, f"not a tar header after it (bad checksum at byte {offset})")
        name = block[:100].split(b"\0", 1)[0]
        if block[257:262] == b"ustar" and block[345] != 0:
            name = block[345:500].split(b"\0", 1)[0] + b"/" + name
        data = offset + 512
        size = long_size if long_size >= 0 and kind not in (b"x", b"L") else size
        offset = data + -(-size // 512) * 512
        text = long_name or name.decode("utf-8", "surrogateescape")
        if data + size > end:
            raise fail(path, text, f"truncated (ends at byte {data + size} of a {end}-byte file)")
        if kind in (b"x", b"L"):  # a pax header or GNU long name: for the next member
            f.seek(data)
            extended = f.read(min(size, MAX_EXTENDED_HEADER))
            try:
                long_name, long_size = _extended(extended, kind)
            except ValueError as err:
                raise fail(path, last, f"a bad pax header after it ({first_line(err)})") from None
            continue
        long_name, long_size, last = "", -1, text
        if kind in (b"0", b"\0", b"7"):
            yield Member(text, data, size)


def _number(field: bytes) -> int:
    """A header's numeric field: octal text, or base-256 when its first bit is set."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _extended(data: bytes, kind: bytes) -> tuple[str, int]:
    """The name and size a GNU long name (``L``) or pax header (``x``) gives the next member (``""``, -1: none)."""
    if kind == b"L":
        return data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape"), -1
    name, size = "", -1
    for record in data.decode("utf-8", "surrogateescape").split("\n"):
        field = record.partition(" ")[2]
        if field.startswith("path="):
            name = field[5:]
        elif field.startswith("size="):
            size = int(field[5:])  # a ValueError: named by the caller
            if size < 0:
                raise ValueError(f"negative size {size}")
    return name, size


def read_member(f: BinaryIO, member: Member) -> bytes:
    """A member's bytes (:func:`tar_members` checked that they lie within the file)."""
    f.seek(member.offset)
    return f.read(member.size)


class ShardReader:
    """Reads samples of a :class:`ShardSet` (in a worker) and turns them into batches with ``pipeline``'s transforms.

    ``pipeline`` is a :class:`~mbn.data.streamed.StreamingImageFolder` without files: its ``draw`` and ``transform``
    (crops, flips, checks) apply to shard samples too; ``None`` when only counting.
    """

    def __init__(self, shards: ShardSet, pipeline: StreamingImageFolder | None, decode_on_device: bool = False) -> None:
        self.shards, self.pipeline, self.decode_on_device = shards, pipeline, decode_on_device
        self.max_pixels = pipeline.max_image_pixels if pipeline is not None else DEFAULT_MAX_IMAGE_PIXELS

    def fail(self, path: str, member: str, what: str) -> RecipeError:
        """The one-line error naming a shard file and member."""
        return RecipeError(f"key '{self.shards.key}': shard {path} member {member}: {what}")

    def read_shard(self, shard: int, want: Callable[[int], bool], images: bool = True) -> Iterator[Sample]:
        """The samples ``i`` of shard ``shard`` with ``want(i)``, in tar order; the others' bytes are skipped."""
        path, position, key = self.shards.paths[shard], -1, ""
        group: Group = []
        try:
            with open(path, "rb") as f:
                for member in tar_members(f, path, self.fail):
                    parts = member_key(member.name)
                    if parts is None:
                        raise self.fail(path, member.name, "no key or no extension (expected <key>.jpg and <key>.cls)")
                    if parts[0] != key:
                        if group and want(position):
                            yield self.sample(f, path, shard, position, group, images)
                        key, group, position = parts[0], [], position + 1
                    group.append((parts[1], member))
                if group and want(position):
                    yield self.sample(f, path, shard, position, group, images)
        except OSError as err:
            raise RecipeError(f"key '{self.shards.key}': cannot read shard {path} ({first_line(err)})") from None
        expected = self.shards.counts[shard]
        if expected >= 0 and position + 1 != expected:
            last = group[-1][1].name if group else "(none)"
            raise self.fail(path, last, f"the shard ends after {position + 1} samples, its index says {expected}")

    def sample(self, f: BinaryIO, path: str, shard: int, position: int, group: Group, images: bool) -> Sample:
        """One sample's label and (with ``images``) image bytes."""
        members = dict(group)
        image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        if image is None:
            raise self.fail(path, group[0][1].name, "a sample without an image member (.jpg, .jpeg, .png, ...)")
        if "cls" not in members:
            raise self.fail(path, image.name, f"no {member_key(image.name)[0]}.cls beside it")  # type: ignore[index]
        label_member = members["cls"]
        if label_member.size > MAX_LABEL_BYTES:
            raise self.fail(path, label_member.name, f"{label_member.size} bytes, not a class index")
        text = read_member(f, label_member)
        try:
            digits = text.decode("ascii").strip()
            if not digits.isdigit():
                raise ValueError(digits)
            label = int(digits)
        except (UnicodeDecodeError, ValueError):
            raise self.fail(path, label_member.name, f"not a class index ({text[:20]!r})") from None
        classes = len(self.shards.classes)
        if label < 0 or (classes and label >= classes):
            raise self.fail(path, label_member.name, f"class {label} outside the {classes} classes 0..{classes - 1}")
        if image.size > max_image_file_bytes(self.max_pixels):
            raise self.fail(path, image.name, f"{image.size} bytes, over the image size data.max_image_pixels allows")
        data = read_member(f, image) if images else None
        if data is not None and not data:
            raise self.fail(path, image.name, "an empty member, not an image")
        return int(self.shards.offsets[shard]) + position, f"{path} member {image.name}", data, label

    def read_batches(self, shards: Sequence[int], batches: Sequence[np.ndarray], epoch: int | None) -> Iterator[Any]:
        """``batches`` (positions in the stream of ``shards`` read in order), in order, read once each."""
        where = {int(p): (k, j) for k, row in enumerate(batches) for j, p in enumerate(row)}
        wanted = np.sort(np.fromiter(where, dtype=np.int64, count=len(where)))
        slots: list[list[Sample | None]] = [[None] * len(row) for row in batches]
        missing, done, base = [len(row) for row in batches], 0, 0
        for shard in shards:
            lo, base = base, base + self.shards.counts[shard]
            if done == len(batches):
                break
            first = int(np.searchsorted(wanted, lo))
            if first == len(wanted) or wanted[first] >= base:
                continue  # none of this worker's samples: never opened
            for sample in self.read_shard(shard, functools.partial(_wanted, where, lo)):
                k, j = where[lo + self._position(sample, shard)]
                slots[k][j] = sample
                missing[k] -= 1
                while done < len(batches) and missing[done] == 0:
                    yield self.batch(slots[done], epoch)  # type: ignore[arg-type]
                    slots[done], done = [], done + 1

    def _position(self, sample: Sample, shard: int) -> int:
        return sample[0] - int(self.shards.offsets[shard])

    def batch(self, samples: Sequence[Sample], epoch: int | None) -> Batch | EncodedBatch:
        """Decoded and transformed ``(uint8 N3SS, labels)``, or (``decode_on_device``) read and drawn only."""
        assert self.pipeline is not None
        with self.named():
            names = self.pipeline.paths = _Names()  # type: ignore[assignment]  # StreamingImageFolder.draw names them
            images, files, drawn = [], [], []
            for index, name, data, _ in samples:
                assert data is not None
                names[index] = name
                if self.decode_on_device:
                    w, h = image_header_size(name, data, self.max_pixels)
                    files.append(data)
                    drawn.append(self.pipeline.draw(index, epoch, (h, w)))
                    continue
                image = decode_image_file(name, torch.frombuffer(bytearray(data), dtype=torch.uint8), self.max_pixels)
                h, w = image.shape[-2:]
                images.append(self.pipeline.transform(image, self.pipeline.draw(index, epoch, (int(h), int(w)))))
            labels = torch.as_tensor([s[3] for s in samples], dtype=torch.int64)
        if self.decode_on_device:
            return EncodedBatch(files, [s[1] for s in samples], drawn, labels)
        return torch.stack(images), labels

    @contextmanager
    def named(self) -> Iterator[None]:
        """Image errors (worded for ``data.root``) name this set's key (``data.test_root``)."""
        try:
            yield
        except RecipeError as err:
            if self.shards.key == "data.root":
                raise
            raise RecipeError(str(err).replace("key 'data.root'", f"key '{self.shards.key}'", 1)) from None


def _wanted(where: dict[int, Any], lo: int, i: int) -> bool:
    return lo + i in where


class _Names(dict):
    """Sample index -> "shard member name", read by ``StreamingImageFolder.draw`` as its ``paths``."""


class ShardBatches(IterableDataset):
    """The batches of one pass (an epoch of a rank, or the evaluation set) as a DataLoader's iterable dataset.

    Worker ``w`` of ``K`` yields batches ``w, w + K, ...``; the DataLoader takes them round-robin, in order.
    """

    def __init__(self, reader: ShardReader, shards: Sequence[int], batches: Sequence[np.ndarray], epoch: int | None):
        self.reader, self.shards, self.batches, self.epoch = reader, list(shards), list(batches), epoch

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        own = self.batches[worker::workers]
        yield from self.reader.read_batches(self.shards, own, self.epoch)


def _loader(dataset: ShardBatches, num_workers: int, pin_memory: bool) -> Iterator[Any]:
    loader = DataLoader(
        dataset,
        batch_size=None,  # the dataset yields whole batches
        num_workers=min(num_workers, len(dataset.batches)),
        collate_fn=collate_batch,  # type: ignore[arg-type]
        pin_memory=pin_memory,
        worker_init_fn=worker_init_fn,
    )
    yield from closing_workers(loader)


def per_rank_samples(counts: Sequence[int], world_size: int, key: str = "data.root") -> int:
    """The samples every rank trains on per epoch: the sum of the ``len(counts) // world_size`` smallest shards."""
    dealt = len(counts) // world_size
    if dealt == 0:
        raise RecipeError(
            f"key '{key}': {len(counts)} shard(s) for {world_size} processes; every process needs at least one "
            "(write smaller shards: python -m mbn.data.make_shards --shard-size)"
        )
    return int(sum(sorted(counts)[:dealt]))


class ShardTrainLoader(ResumableBatches):
    """Training batches of tar shards: ``len`` and ``epoch_batches(epoch, start_batch)`` (see the module docstring).

    Args:
        reader: the training shards and their transforms.
        batch_size: images per batch (per rank).
        seed: seeds the shard order, the windows' permutations and (through the pipeline) the crops.
        num_workers: DataLoader workers; the batches do not depend on it.
        pin_memory: pin batches (not with ``device``).
        device: decode on this device (``data.decode=device``); ``None``: the workers decode.
    """

    def __init__(
        self,
        reader: ShardReader,
        batch_size: int,
        *,
        seed: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | None = None,
    ) -> None:
        per_rank = per_rank_samples(reader.shards.counts, world_size, reader.shards.key)
        super().__init__(per_rank * world_size, batch_size, seed, rank=rank, world_size=world_size)
        self.reader, self.num_workers, self.device = reader, num_workers, device
        self.pin_memory = pin_memory and device is None
        self.window = -(-SHUFFLE_WINDOW // batch_size) * batch_size

    def epoch_plan(self, epoch: int) -> tuple[list[int], np.ndarray]:
        """This rank's shards for ``epoch`` (in reading order) and its batches, shape (len, batch_size).

        Entries are positions in the rank's stream (its shards' samples in order); each window of the stream is
        permuted.
        """
        order = epoch_permutation(len(self.reader.shards.counts), self.seed, epoch).tolist()
        shards = order[self.rank :: self.world_size]
        total = len(self) * self.batch_size
        positions = np.arange(total, dtype=np.int64)
        for number, lo in enumerate(range(0, total, self.window)):
            hi = min(lo + self.window, total)
            key = np.random.SeedSequence([self.seed, epoch, self.rank, number])
            positions[lo:hi] = lo + np.random.default_rng(key).permutation(hi - lo)
        return shards, positions.reshape(len(self), self.batch_size)

    def epoch_batches(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches ``start_batch..`` of ``epoch``; the samples of earlier batches are skipped undecoded."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch: expected 0..{len(self)}, got {start_batch}")
        shards, batches = self.epoch_plan(epoch)
        if start_batch == len(self):
            return
        dataset = ShardBatches(self.reader, shards, list(batches[start_batch:]), epoch)
        for batch in _loader(dataset, self.num_workers, self.pin_memory):
            if self.device is not None:
                assert self.reader.pipeline is not None
                batch = self.reader.pipeline.decode_batch(batch, self.device)
            yield batch


class ShardEvalLoader:
    """Evaluation batches of tar shards in their order (resized and centre-cropped), decoded in workers."""

    def __init__(self, reader: ShardReader, batch_size: int, num_workers: int, pin_memory: bool, limit: int | None):
        self.reader, self.batch_size = reader, batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.total = len(reader.shards) if limit is None else min(int(limit), len(reader.shards))

    def __len__(self) -> int:
        return -(-self.total // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        positions = np.arange(self.total, dtype=np.int64)
        batches = [positions[lo : lo + self.batch_size] for lo in range(0, self.total, self.batch_size)]
        dataset = ShardBatches(self.reader, range(len(self.reader.shards.counts)), batches, None)
        yield from _loader(dataset, self.num_workers, self.pin_memory)


@dataclass
class ShardLoaders:
    """What :func:`mbn.data.bundle.build_data` needs of a webdataset: loaders, class names, fingerprints."""

    train: ShardTrainLoader
    test: ShardEvalLoader
    classes: list[str]
    fingerprints: tuple[str, str]


def _pipeline(cfg: Any, seed: int, train: bool) -> StreamingImageFolder:
    return StreamingImageFolder(
        [], int(cfg.image_size), train=train, augment=cfg.augment, seed=seed, crop_fraction=cfg.crop_fraction,
        crop_padding=cfg.crop_padding, hflip=cfg.hflip, min_image_side=cfg.min_image_side,
        max_image_pixels=int(getattr(cfg, "max_image_pixels", None) or DEFAULT_MAX_IMAGE_PIXELS),
    )  # fmt: skip


def test_reader(cfg: Any, classes: Sequence[str]) -> ShardReader:
    """The evaluation shards of ``data.test_root``, labelled by ``classes``."""
    check_shards_present(cfg)
    return ShardReader(load_shard_set(str(cfg.test_root), "data.test_root", classes), _pipeline(cfg, 0, False))


def build_shard_loaders(
    cfg: Any, *, seed: int, device: torch.device, rank: int = 0, world_size: int = 1
) -> ShardLoaders:
    """Training and evaluation loaders of ``data.root`` / ``data.test_root``.

    Raises:
        RecipeError: missing shards or ``data.test_root``, ``data.train_limit`` (write fewer shards instead), fewer
            shards than processes, or a batch larger than a rank's samples.
    """
    if int(getattr(cfg, "aug_repeats", 0) or 0) > 1:
        raise RecipeError("key 'data.aug_repeats': repeated augmentation is not supported for webdataset shards")
    if getattr(cfg, "train_limit", None) is not None:
        raise RecipeError(
            "key 'data.train_limit': not supported for webdataset shards; name fewer shards in data.root instead"
        )
    check_shards_present(cfg)
    train_set = load_shard_set(str(cfg.root), "data.root")
    on_device = getattr(cfg, "decode", "workers") == "device"
    reader = ShardReader(train_set, _pipeline(cfg, seed, True), decode_on_device=on_device)
    pin = device.type == "cuda"
    train = ShardTrainLoader(
        reader, int(cfg.batch_size), seed=seed, num_workers=int(cfg.num_workers), pin_memory=pin, rank=rank,
        world_size=world_size, device=device if on_device else None,
    )  # fmt: skip
    if len(train) == 0:
        per = per_rank_samples(train_set.counts, world_size)
        raise RecipeError(
            f"key 'data.batch_size': {cfg.batch_size} exceeds the {per} training samples each of {world_size} "
            "process(es) is dealt per epoch"
        )
    test = ShardEvalLoader(
        test_reader(cfg, train_set.classes), int(cfg.eval_batch_size), int(cfg.num_workers), pin, cfg.test_limit
    )
    return ShardLoaders(train, test, train_set.classes, train_set.fingerprints(int(cfg.image_size)))


def load_shard_test_split(cfg: Any, classes: Sequence[str]) -> ArraySplit:
    """The evaluation shards decoded with their evaluation transform, as arrays (``mbn-eval``)."""
    loader = ShardEvalLoader(test_reader(cfg, classes), int(cfg.eval_batch_size), int(cfg.num_workers), False,
                             cfg.test_limit)  # fmt: skip
    batches = list(loader)
    images = torch.cat([b[0] for b in batches]).permute(0, 2, 3, 1).contiguous().numpy()
    return ArraySplit(images, np.concatenate([b[1].numpy() for b in batches]))
