"""WebDataset tar shards (data.name=webdataset): make_shards, same images as the tree, ranks x workers, resume."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from mbn.checkpoint import load_checkpoint
from mbn.cli.train import main as train_main
from mbn.config import DataCfg, RecipeError
from mbn.data import build_data, load_test_split
from mbn.data.files import decode_image_file
from mbn.data.make_shards import main as make_shards
from mbn.data.shards import ShardReader, ShardSet, load_shard_set, per_rank_samples
from mbn.errors import one_line
from mbn.plan import check_dataset_present
from tests.runs import TINY

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog", "frog")


def make_tree(root: Path, classes=CLASSES, per_class: int = 7, size: tuple[int, int] = (40, 36)) -> Path:
    """A tiny ImageFolder tree: JPEGs and PNGs of random pixels, ``per_class`` of each class in train and test."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(array).save(root / split / c / f"{i:03d}.{'jpg' if i % 2 else 'png'}")
    return root


def shards_of(tmp_path: Path, shard_size: int = 5, **tree) -> tuple[str, str]:
    """Shards of a fresh tree: the (data.root, data.test_root) patterns make_shards prints."""
    tree_root = make_tree(tmp_path / "tree", **tree)
    assert make_shards([str(tree_root), str(tmp_path / "shards"), "--shard-size", str(shard_size)]) == 0
    index = {s: json.loads((tmp_path / "shards" / f"{s}.index.json").read_text()) for s in ("train", "test")}
    last = {s: len(index[s]["shards"]) - 1 for s in index}
    return tuple(str(tmp_path / "shards" / f"{s}-{{000000..{last[s]:06d}}}.tar") for s in ("train", "test"))  # type: ignore[return-value]


def data_cfg(root: str, test_root: str | None, **overrides):
    base = {"name": "webdataset", "root": root, "test_root": test_root, "batch_size": 4, "eval_batch_size": 5,
            "num_workers": 0, "image_size": 32, "augment": "imagenet"}  # fmt: skip
    return OmegaConf.merge(OmegaConf.structured(DataCfg), {**base, **overrides})


def shard_samples(pattern: str) -> list[tuple[bytes, int]]:
    shards = load_shard_set(pattern, "data.root")
    reader = ShardReader(shards, None)
    out = []
    for s in range(len(shards.paths)):
        out += [(data, label) for _, _, data, label in reader.read_shard(s, lambda i: True)]
    return out  # type: ignore[return-value]


def test_shards_hold_the_trees_images_and_labels(tmp_path, capsys):
    train, test = shards_of(tmp_path)
    printed = capsys.readouterr().out
    assert f"data.root={train}" in printed and f"data.test_root={test}" in printed
    tree = tmp_path / "tree"
    for split, pattern in (("train", train), ("test", test)):
        files = sorted((p.read_bytes(), CLASSES.index(p.parent.name)) for p in (tree / split).rglob("*.*"))
        stored = shard_samples(pattern)
        assert sorted(stored) == files  # the original bytes, as-is, with their labels
        for data, label in stored[:6]:
            path = next(p for p in (tree / split / CLASSES[label]).iterdir() if p.read_bytes() == data)
            pixels = decode_image_file("x", torch.frombuffer(bytearray(data), dtype=torch.uint8))
            assert torch.equal(pixels, decode_image_file(str(path)))
        labels = [label for _, label in stored]
        assert labels != sorted(labels)  # written shuffled, not class by class
    assert json.loads((tmp_path / "shards" / "train.index.json").read_text())["classes"] == list(CLASSES)


def test_the_webdataset_package_reads_the_shards(tmp_path):
    import webdataset as wds

    train, _ = shards_of(tmp_path)
    samples = list(wds.WebDataset(train, shardshuffle=False))
    assert len(samples) == 21
    assert sorted(int(s["cls"]) for s in samples) == sorted([0] * 7 + [1] * 7 + [2] * 7)
    assert all(("jpg" in s) != ("png" in s) for s in samples)


def test_no_sample_twice_across_two_ranks_and_two_workers(tmp_path):
    """24 classes of one image: a label names its sample. 8 shards of 3, 2 ranks: 12 samples a rank, batches of 4."""
    classes = tuple(f"c{i:02d}" for i in range(24))
    train, test = shards_of(tmp_path, shard_size=3, classes=classes, per_class=1)
    assert per_rank_samples([3] * 8, 2) == 12
    seen, lengths = [], []
    for rank in (0, 1):
        bundle = build_data(data_cfg(train, test, num_workers=2), seed=3, device="cpu", rank=rank, world_size=2)
        batches = list(bundle.train.epoch_batches(1))
        lengths.append(len(batches))
        assert len(batches) == len(bundle.train) == 3
        seen += [label for _, y in batches for label in y.tolist()]
    assert lengths[0] == lengths[1]
    assert len(seen) == len(set(seen)) == 24  # 2 ranks x 3 batches x 4: every sample once, none twice


def test_uneven_shards_drop_the_remainder_equally_on_every_rank(tmp_path):
    classes = tuple(f"c{i:02d}" for i in range(23))  # shards of 3, 3, ..., 3, 2: the smallest rank gets 9 + 2
    train, test = shards_of(tmp_path, shard_size=3, classes=classes, per_class=1)
    assert per_rank_samples([3] * 7 + [2], 2) == 11
    for epoch in (0, 1, 2):
        seen = []
        for rank in (0, 1):
            bundle = build_data(data_cfg(train, test, batch_size=2), seed=0, device="cpu", rank=rank, world_size=2)
            batches = list(bundle.train.epoch_batches(epoch))
            assert len(batches) == 5  # 11 // 2 on both ranks
            seen += [label for _, y in batches for label in y.tolist()]
        assert len(seen) == len(set(seen)) == 20


def test_batches_do_not_depend_on_workers_and_differ_between_epochs(tmp_path):
    train, test = shards_of(tmp_path)
    bundles = [
        build_data(data_cfg(train, test, num_workers=w, augment="imagenet"), seed=0, device="cpu") for w in (0, 2)
    ]
    serial, parallel = (list(b.train.epoch_batches(0)) for b in bundles)
    assert len(serial) == len(parallel) == 5
    for (x0, y0), (x1, y1) in zip(serial, parallel, strict=True):
        assert x0.shape == (4, 3, 32, 32) and x0.dtype == torch.uint8
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    other = list(bundles[0].train.epoch_batches(1))
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(serial, other, strict=True))


def test_resume_mid_epoch_gives_the_remaining_batches(tmp_path):
    """epoch_batches(epoch, k) is batches k.. of the epoch exactly: the trained samples are skipped, not decoded."""
    train, test = shards_of(tmp_path)
    bundle = build_data(data_cfg(train, test, num_workers=2, augment="imagenet"), seed=1, device="cpu")
    full = list(bundle.train.epoch_batches(2))
    for start in (1, 3, 5):
        rest = list(bundle.train.epoch_batches(2, start))
        assert len(rest) == len(full) - start
        for (x0, y0), (x1, y1) in zip(full[start:], rest, strict=True):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_device_decoding_gives_the_workers_batches(tmp_path):
    train, test = shards_of(tmp_path)
    cfgs = [data_cfg(train, test, augment="imagenet", num_workers=1, decode=d) for d in ("workers", "device")]
    workers, device = (list(build_data(c, seed=0, device="cpu").train.epoch_batches(0)) for c in cfgs)
    for (x0, y0), (x1, y1) in zip(workers, device, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_the_index_is_optional(tmp_path, caplog):
    train, test = shards_of(tmp_path)
    with_index = build_data(data_cfg(train, test), seed=0, device="cpu")
    for split in ("train", "test"):
        (tmp_path / "shards" / f"{split}.index.json").unlink()
    scanned = build_data(data_cfg(train, test), seed=0, device="cpu")
    assert "scanning their tar headers" in caplog.text
    assert len(scanned.train) == len(with_index.train) and scanned.class_names == ["0", "1", "2"]
    assert scanned.fingerprint() == with_index.fingerprint()
    for (x0, y0), (x1, y1) in zip(with_index.train.epoch_batches(0), scanned.train.epoch_batches(0), strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_evaluation_reads_the_test_shards(tmp_path):
    train, test = shards_of(tmp_path)
    cfg = data_cfg(train, test, augment="imagenet", num_workers=2)
    bundle = build_data(cfg, seed=0, device="cpu")
    batches = list(bundle.test)
    assert len(batches) == len(bundle.test) == 5 and batches[-1][0].shape == (1, 3, 32, 32)
    split = load_test_split(cfg, bundle.stats)  # what mbn-eval reads
    images = torch.cat([b[0] for b in batches]).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(split.images, images)
    assert np.array_equal(split.labels, torch.cat([b[1] for b in batches]).numpy())


def write_shard(path: Path, samples: list[dict[str, bytes]]) -> Path:
    import webdataset as wds

    with open(path, "wb") as f:
        writer = wds.TarWriter(f)
        for sample in samples:
            writer.write(sample)
        writer.close()
    return path


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("bad", "member", "message"),
    [
        ({"__key__": "b", "jpg": b"\xff\xd8 not a jpeg", "cls": b"1"}, "b.jpg", "cannot decode image"),
        ({"__key__": "b", "png": None}, "b.png", "no b.cls beside it"),
        ({"__key__": "b", "png": None, "cls": b"one"}, "b.cls", "not a class index"),
        ({"__key__": "b", "png": None, "cls": b"7"}, "b.cls", "outside the 3 classes"),
        ({"__key__": "b", "cls": b"1"}, "b.cls", "without an image member"),
        ({"__key__": "b", "png": None, "cls": b"1_0"}, "b.cls", "not a class index"),
        ({"__key__": "b", "png": None, "cls": b"1" * 40}, "b.cls", "40 bytes, not a class index"),
    ],
    ids=["corrupt-jpeg", "missing-cls", "non-integer-cls", "unknown-class", "missing-image", "underscore", "huge-cls"],
)
def test_bad_members_are_named_in_one_line(tmp_path, bad, member, message):
    train, test = shards_of(tmp_path)
    good = {"png": png_bytes(), "cls": b"0"}
    bad = {k: (png_bytes() if v is None else v) for k, v in bad.items()}
    shard = write_shard(
        tmp_path / "shards" / "train-000002.tar", [{"__key__": "a", **good}, bad, {"__key__": "c", **good}]
    )
    with pytest.raises(RecipeError) as err:  # a scan finds some (the index is stale), a worker the others
        bundle = build_data(data_cfg(train, test, num_workers=1, batch_size=2), seed=0, device="cpu")
        list(bundle.train.epoch_batches(0))
    line = one_line(err.value)
    assert f"{shard} member {member}" in line and message in line, line
    assert "\n" not in line


def test_a_truncated_shard_is_named_in_one_line(tmp_path):
    train, test = shards_of(tmp_path)
    shard = tmp_path / "shards" / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:9000])
    with pytest.raises(RecipeError) as err:  # the index's size no longer matches: the shard is scanned, found short
        build_data(data_cfg(train, test), seed=0, device="cpu")
    line = one_line(err.value)
    assert f"shard {shard} member " in line and "truncated" in line, line
    reader = ShardReader(ShardSet([str(shard)], [5], list(CLASSES), "data.root"), None)
    with pytest.raises(RecipeError, match="truncated"):  # read without the index: the same line
        list(reader.read_shard(0, lambda i: True))


def test_a_shard_cut_between_two_members_is_named(tmp_path):
    """No partial member, but no end-of-archive blocks either: still a truncated tar, found without an index."""
    import tarfile

    train, test = shards_of(tmp_path)
    (tmp_path / "shards" / "train.index.json").unlink()
    shard = tmp_path / "shards" / "train-000003.tar"
    with tarfile.open(shard) as tar:
        cut = tar.getmembers()[4].offset  # the header of the third sample's first member
    shard.write_bytes(shard.read_bytes()[:cut])
    with pytest.raises(RecipeError) as err:
        build_data(data_cfg(train, test), seed=0, device="cpu")
    line = one_line(err.value)
    assert f"shard {shard} member " in line and "truncated (the file ends after it" in line, line


def test_missing_shards_and_test_root_are_named(tmp_path):
    train, test = shards_of(tmp_path)
    with pytest.raises(RecipeError, match=r"key 'data.test_root': webdataset needs"):
        check_dataset_present(data_cfg(train, None))
    with pytest.raises(RecipeError, match=r"key 'data.root': no file matches the shard pattern"):
        check_dataset_present(data_cfg(str(tmp_path / "nowhere-{0..3}.tar"), test))
    with pytest.raises(RecipeError, match=r"shard .*train-000005\.tar of .* is missing"):
        check_dataset_present(data_cfg(train.replace("000004", "000007"), test))
    with pytest.raises(RecipeError, match=r"key 'data.root': 5 shard"):
        build_data(data_cfg(train, test), seed=0, device="cpu", world_size=6)


def test_make_shards_errors_are_one_line(tmp_path, capsys):
    assert make_shards([str(tmp_path / "absent"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a directory" in err
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    assert make_shards([str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no valid file for the classes cat" in err, err
    assert not list((tmp_path / "out").glob("*.tar"))


def test_make_shards_finds_a_val_split(tmp_path, capsys):
    tree = make_tree(tmp_path / "tree", per_class=2)
    (tree / "test").rename(tree / "val")
    assert make_shards([str(tree), str(tmp_path / "out"), "--shard-size", "4"]) == 0
    out = capsys.readouterr().out
    assert f"val: data.test_root={tmp_path / 'out'}/val-{{000000..000001}}.tar" in out, out
    assert json.loads((tmp_path / "out" / "val.index.json").read_text())["samples"] == 6


def train_shards(train: str, test: str, out: Path, *extra: str) -> int:
    return train_main(
        [str(REPO / "recipes" / "advprop.yaml"), *TINY, "data.name=webdataset", f"data.root={train}",
         f"data.test_root={test}", "data.batch_size=4", "data.num_workers=1", "data.image_size=32",
         f"trainer.out_dir={out}", *extra]
    )  # fmt: skip


def test_training_and_evaluating_on_shards(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MBN_CACHE_DIR", str(tmp_path / "cache"))
    train, test = shards_of(tmp_path)
    assert train_shards(train, test, tmp_path / "run", "data.augment=imagenet", "trainer.max_steps=3") == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 3
    assert not (tmp_path / "cache").exists()
    from mbn.cli.eval import main as eval_main

    assert eval_main([str(tmp_path / "run")]) == 0  # mbn-eval reads the data.test_root shards
    assert "clean 0." in capsys.readouterr().out


def test_a_bad_member_stops_training_with_one_line(tmp_path, capsys):
    train, test = shards_of(tmp_path)
    shard = write_shard(tmp_path / "shards" / "train-000000.tar", [{"__key__": "z", "jpg": b"garbage", "cls": b"0"}])
    assert train_shards(train, test, tmp_path / "run", "trainer.epochs=1", "data.augment=imagenet") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{shard} member z.jpg" in err, err


@pytest.mark.slow
def test_a_run_on_shards_resumes_bit_identically(tmp_path):
    """Stopped after 3 steps of a 5-step epoch, resumed: the same weights as a run that never stopped."""
    train, test = shards_of(tmp_path)
    extra = ("data.augment=imagenet",)
    assert train_shards(train, test, tmp_path / "full", *extra, "trainer.max_steps=7") == 0
    assert train_shards(train, test, tmp_path / "part", *extra, "trainer.max_steps=3") == 0
    assert train_main(["--resume", str(tmp_path / "part"), "trainer.max_steps=7"]) == 0
    full, resumed = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in ("full", "part"))
    assert resumed["state"]["step"] == 7 and resumed["state"]["epoch"] == 1
    torch.testing.assert_close(resumed["model"], full["model"], rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["USTAR_FORMAT", "GNU_FORMAT", "PAX_FORMAT"])
def test_tar_headers_are_read_as_tarfile_reads_them(tmp_path, fmt):
    """Long names (ustar prefix, GNU long name, pax path), directories and links: the regular files, in order."""
    import tarfile

    from mbn.data.shards import read_member, tar_members

    path = tmp_path / "a.tar"
    with tarfile.open(path, "w", format=getattr(tarfile, fmt)) as tar:
        folder = tarfile.TarInfo("d" * 90 + "/" + "e" * 60)
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for i, name in enumerate(["0001.jpg", "0001.cls", f"{'d' * 90}/{'e' * 60}/0002.png", "x" * 120 + ".cls"]):
            if fmt == "USTAR_FORMAT" and len(name) > 100 and "/" not in name:
                continue  # ustar cannot hold a 124-character name without a folder
            data = bytes([i]) * (700 * i + 3)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "0001.jpg"
        tar.addfile(link)
    with tarfile.open(path) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    with open(path, "rb") as f:
        members = list(tar_members(f, str(path), lambda *a: RecipeError(str(a))))
        assert [(m.name, read_member(f, m)) for m in members] == expected


def _tar_with(path: Path, members: list[tuple[str, bytes, dict[str, str] | None]]) -> Path:
    """A tar of (name, bytes, pax headers) members, written by tarfile (pax format)."""
    import tarfile

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, pax in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if pax:
                info.pax_headers = pax
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_member_without_a_key_and_a_bad_pax_header_are_one_line(tmp_path):
    keyless = _tar_with(tmp_path / "keyless.tar", [(".png", png_bytes(), None), (".cls", b"0", None)])
    with pytest.raises(RecipeError) as err:
        load_shard_set(str(keyless), "data.root")
    assert f"shard {keyless} member .png: no key or no extension" in one_line(err.value)
    pax = tmp_path / "pax.tar"
    _tar_with(pax, [("a.png", png_bytes(), {"comment": "x"}), ("a.cls", b"0", None)])
    raw = bytearray(pax.read_bytes())
    at = raw.find(b" comment=x")  # the pax record "NN comment=x": make it a size that is not a number
    raw[at + 1 : at + 10] = b"size=abcd"
    pax.write_bytes(bytes(raw))
    with pytest.raises(RecipeError) as err:
        load_shard_set(str(pax), "data.root")
    line = one_line(err.value)
    assert f"shard {pax} member" in line and ("bad pax header" in line or "bad checksum" in line), line


def test_one_shard_finds_its_index_and_make_shards_never_mixes_runs(tmp_path, capsys):
    tree = make_tree(tmp_path / "tree")
    assert make_shards([str(tree), str(tmp_path / "one"), "--shard-size", "1000"]) == 0
    printed = capsys.readouterr().out
    single = str(tmp_path / "one" / "train-000000.tar")
    assert f"data.root={single}" in printed
    shards = load_shard_set(single, "data.root")
    assert shards.classes == list(CLASSES) and not shards.scanned  # the index of train-000000.tar is train.index.json
    assert make_shards([str(tree), str(tmp_path / "one"), "--shard-size", "5"]) == 2  # old shards would stay
    assert "already holds shards (test-000000.tar" in capsys.readouterr().err
    assert make_shards([str(tree), str(tree / "shards")]) == 2
    assert "is inside the tree" in capsys.readouterr().err


def test_a_typo_label_without_an_index_is_refused_not_a_million_classes(tmp_path):
    shard = write_shard(tmp_path / "t-000000.tar", [{"__key__": "a", "png": png_bytes(), "cls": b"3000000"}])
    with pytest.raises(RecipeError, match="implies over 100,000 classes"):
        load_shard_set(str(shard), "data.root")
    with pytest.raises(RecipeError, match="names over 1,000,000 files"):
        load_shard_set(str(tmp_path / "t-{0000000..9999999}.tar"), "data.root")
