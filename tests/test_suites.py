"""``mbn-eval --suite``: the published robustness suites in their authors' layouts, class matching, mCE, BN adaptation.

Fixtures are small suites written in each published layout inside the tests; the model is a 2-step AdvProp run
on the synthetic shapes (class names ``disk``, ``ring``, ...), so every expected number is computed by hand from
the same model's logits.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import mbn
from mbn.cli.eval import main as eval_main
from mbn.cli.train import main as train_main
from mbn.config import RecipeError, load_recipe
from mbn.eval.bn_adapt import adapted_bn
from mbn.eval.classes import CIFAR10_CLASSES, imagenet_subset, imagenet_synsets, match_classes
from mbn.eval.corruptions import CORRUPTIONS
from mbn.eval.loading import load_run
from mbn.eval.metrics import ALEXNET_ERRORS
from mbn.eval.report import paper_table
from mbn.eval.suite_eval import Preparation, corruption_metrics, evaluate_suite, score_set, set_batches
from mbn.eval.suites import SuiteError, SuiteSpec, read_suite

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def suites_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("suites")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, suites_root: Path) -> Path:
    """A 2-step AdvProp run (clean + adv BNs) whose recipe names one suite in ``eval.suites``."""
    out = tmp_path_factory.mktemp("suite-run") / "run"
    code = train_main(
        [
            str(REPO / "recipes" / "advprop.yaml"),
            "data.name=synthetic",
            "data.synthetic_train_size=64",
            "data.synthetic_test_size=40",
            "data.batch_size=16",
            "data.num_workers=0",
            "model.name=cifar_resnet8",
            "model.width=8",
            "trainer.max_steps=2",
            "trainer.progress=none",
            "logging.tensorboard=false",
            f"trainer.out_dir={out}",
            f"eval.suites.cifar10-c:recipe={suites_root / 'recipe-c'}",
        ]
    )
    assert code == 0
    return out


@pytest.fixture(scope="module")
def loaded(run_dir: Path):
    return load_run(run_dir, "cpu")


def run_eval(run: Path, out: Path, *flags: str) -> int:
    return eval_main([str(run), "--out", str(out), *flags])


def read(out: Path) -> dict:
    return json.loads((out / "eval.json").read_text())


def write_cifar_c(root: Path, sets: dict[str, list[np.ndarray]], labels: np.ndarray, classes=None) -> Path:
    """``root/<corruption>.npy`` (five severities stacked) and ``root/labels.npy``, as the published arrays."""
    root.mkdir(parents=True, exist_ok=True)
    for name, severities in sets.items():
        np.save(root / f"{name}.npy", np.concatenate(severities))
    np.save(root / "labels.npy", np.tile(labels, 5))
    if classes is not None:
        (root / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
    return root


def write_tree(root: Path, images: np.ndarray, labels: np.ndarray, classes, names=None) -> Path:
    """``root/<class>/<i>.png`` (lossless, so the pixels are the arrays')."""
    from PIL import Image

    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / (names[label] if names else classes[label])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    return root


@torch.no_grad()
def logits_of(model: nn.Module, images: np.ndarray, source: str = "clean") -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with mbn.eval_mode(model), mbn.use_source(model, source):
        return model(x)


# ------------------------------------------------------------------------------------------ CIFAR-10-C arrays


def test_cifar_c_identity_suite_gives_exactly_the_clean_accuracy(run_dir, loaded, tmp_path):
    x, y = loaded.test.images, loaded.test.labels
    suite = write_cifar_c(tmp_path / "c10c", {"fog": [x] * 5, "contrast": [x] * 5}, y, loaded.stats.class_names)
    assert run_eval(run_dir, tmp_path / "out", "--suite", f"cifar10-c={suite}") == 0
    result = read(tmp_path / "out")
    entry = result["suites"]["cifar10-c"]
    clean = result["clean_acc"]
    assert entry["kind"] == "cifar10-c" and entry["bn"] == "clean" and entry["num_classes"] == 10
    assert entry["num_images"] == 2 * 5 * len(y)
    assert all(acc == clean for row in entry["corruptions"].values() for acc in row.values())
    assert entry["mean_acc"] == pytest.approx(clean) and entry["top1"] == pytest.approx(clean)
    top5 = logits_of(loaded.model, x).topk(5, 1).indices
    expected_top5 = float((top5 == torch.from_numpy(y)[:, None]).any(1).float().mean())
    assert entry["top5"] == pytest.approx(expected_top5)
    assert entry["mce"] is None and entry["bn_adapt"] is None and entry["bn_route_auto"] is None
    assert any("gaussian_noise" in note for note in entry["notes"])  # the other 13 are named as missing
    markdown = (tmp_path / "out" / "eval.md").read_text()
    assert "## Robustness suites" in markdown and "| C10-C |" in markdown

    # --limit takes the same seeded positions as the clean subset, in every set
    assert run_eval(run_dir, tmp_path / "lim", "--suite", f"cifar10-c={suite}", "--limit", "16") == 0
    limited = read(tmp_path / "lim")
    assert limited["suites"]["cifar10-c"]["num_images"] == 2 * 5 * 16
    assert limited["suites"]["cifar10-c"]["corruptions"]["fog"]["3"] == limited["clean_acc"]


def test_cifar_c_labels_follow_cifar_order_by_name(tmp_path):
    """Without classes.txt, label i is CIFAR-10's class i, matched by name whatever the model's output order."""
    model_classes = tuple(reversed(CIFAR10_CLASSES))
    images = np.zeros((10, 8, 8, 3), np.uint8)
    root = write_cifar_c(tmp_path / "c", {"snow": [images] * 5}, np.arange(10))
    suite = read_suite(SuiteSpec.parse(f"cifar10-c={root}"), model_classes)
    assert suite.classes.targets.tolist() == list(range(9, -1, -1))  # label i -> output 9 - i
    assert [(s.corruption, s.severity) for s in suite.sets] == [("snow", s) for s in (1, 2, 3, 4, 5)]
    assert isinstance(suite.sets[0].array, np.memmap)  # memory-mapped, never read whole
    assert suite.sets[2].rows.tolist() == list(range(20, 30))  # severity 3 is the third block


def test_reference_run_gives_cifar_ce(run_dir, loaded, tmp_path):
    x, y = loaded.test.images, loaded.test.labels
    darker = np.clip(x.astype(int) - 40, 0, 255).astype(np.uint8)
    suite = write_cifar_c(tmp_path / "c", {"fog": [x, darker] * 2 + [x]}, y, loaded.stats.class_names)
    assert run_eval(run_dir, tmp_path / "a", "--suite", f"cifar10-c={suite}") == 0
    assert run_eval(run_dir, tmp_path / "b", "--suite", f"cifar10-c={suite}", "--reference", str(tmp_path / "a")) == 0
    entry = read(tmp_path / "b")["suites"]["cifar10-c"]
    assert entry["ce"] == {"fog": 1.0}  # against itself
    assert entry["mce"] is None  # 1 of the 15 benchmark corruptions: no mCE
    assert entry["mce_reference"] == str((tmp_path / "a" / "eval.json").resolve())


# ------------------------------------------------------------------------------------------ ImageNet-C tree


def test_imagenet_c_tree_identity_and_alexnet_ce(run_dir, loaded, tmp_path):
    x, y = loaded.test.images, loaded.test.labels
    names = loaded.stats.class_names
    root = tmp_path / "imagenet-c"
    for corruption in ("fog", "blur/zoom_blur"):  # the release's blur.tar keeps its corruptions under blur/
        for severity in range(1, 6):
            write_tree(root / corruption / str(severity), x, y, names)
    (root / "README.txt").write_text("not a corruption folder")
    assert run_eval(run_dir, tmp_path / "out", "--suite", f"imagenet-c={root}", "--workers", "2") == 0
    result = read(tmp_path / "out")
    entry = result["suites"]["imagenet-c"]
    clean = result["clean_acc"]
    assert all(acc == clean for row in entry["corruptions"].values() for acc in row.values())
    assert entry["ce"] == pytest.approx({"fog": (1 - clean) / 0.819324, "zoom_blur": (1 - clean) / 0.798360})
    assert entry["mce"] is None and entry["mce_reference"].startswith("AlexNet")


def test_mce_against_alexnet_matches_a_hand_computation():
    rng = np.random.default_rng(0)
    acc = {(c, s): float(rng.uniform(0.2, 0.9)) for c in CORRUPTIONS for s in range(1, 6)}
    top5 = dict.fromkeys(acc, 1.0)
    out = corruption_metrics("imagenet-c", acc, top5)
    published = [0.886428, 0.894468, 0.922640, 0.819880, 0.826268, 0.785948, 0.798360, 0.866816, 0.826572,
                 0.819324, 0.564592, 0.853204, 0.646056, 0.717840, 0.606500]  # fmt: skip
    by_hand = [np.mean([1 - acc[(c, s)] for s in range(1, 6)]) / e for c, e in zip(CORRUPTIONS, published, strict=True)]
    assert list(ALEXNET_ERRORS) == list(CORRUPTIONS)
    assert out["mce"] == pytest.approx(float(np.mean(by_hand)), rel=1e-12)
    assert out["mean_acc"] == pytest.approx(float(np.mean(list(acc.values()))))
    assert out["per_severity_mean"]["2"] == pytest.approx(float(np.mean([acc[(c, 2)] for c in CORRUPTIONS])))
    # an extra corruption is reported apart and does not move the benchmark mean
    with_extra = corruption_metrics(
        "imagenet-c", {**acc, ("speckle_noise", 1): 0.0}, {**top5, ("speckle_noise", 1): 0.0}
    )
    assert with_extra["mean_acc"] == out["mean_acc"] and with_extra["extra_mean_acc"] == 0.0


# ------------------------------------------------------------------------------------------ class subsets


def test_folder_subset_is_scored_among_its_classes(run_dir, loaded, tmp_path):
    x, y = loaded.test.images, loaded.test.labels
    names = loaded.stats.class_names
    keep_classes = [1, 4, 7]
    keep = np.isin(y, keep_classes)
    root = write_tree(tmp_path / "subset", x[keep], y[keep], names)
    assert run_eval(run_dir, tmp_path / "out", "--suite", f"folder:three={root}") == 0
    entry = read(tmp_path / "out")["suites"]["three"]
    assert entry["kind"] == "folder" and entry["restricted"] and entry["num_classes"] == 3
    logits = logits_of(loaded.model, x[keep])[:, keep_classes]
    target = torch.as_tensor([keep_classes.index(int(c)) for c in y[keep]])
    assert entry["top1"] == pytest.approx(float((logits.argmax(1) == target).float().mean()))
    assert entry["top5"] is None  # among 3 classes, top-5 would always be right


class Linear1k(nn.Module):
    """8x8 images -> 1000 logits, with a BN to convert."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3 * 8 * 8, 1000)
        self.bn = nn.BatchNorm1d(1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x.flatten(1)))


def test_imagenet_a_logits_are_restricted_to_its_200_classes(tmp_path):
    subset = imagenet_subset("imagenet-a")
    assert len(subset) == 200 and set(subset) <= set(imagenet_synsets())
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(12) % 3
    root = write_tree(tmp_path / "imagenet-a", images, labels, None, names=[subset[5], subset[50], subset[150]])
    model = mbn.convert_model(Linear1k(), sources=("clean",)).eval()
    suite = read_suite(SuiteSpec.parse(f"imagenet-a={root}"), imagenet_synsets())
    assert suite.classes.restricted and suite.classes.num_classes == 200
    entry = evaluate_suite(
        model, suite, source="clean", to_device=lambda b: (b[0].float() / 255, b[1]), prepare=Preparation(8),
        batch_size=5,
    )  # fmt: skip
    index = {w: i for i, w in enumerate(imagenet_synsets())}
    restricted = logits_of(model, images)[:, [index[w] for w in subset]]
    target = torch.as_tensor([[5, 50, 150][label] for label in labels])
    assert entry["top1"] == pytest.approx(float((restricted.argmax(1) == target).float().mean()))
    top5 = (restricted.topk(5, 1).indices == target[:, None]).any(1).float().mean()
    assert entry["top5"] == pytest.approx(float(top5))
    # the same images among all 1000 classes (a folder suite over every class) score differently
    unrestricted = logits_of(model, images).argmax(1)
    assert not torch.equal(unrestricted, torch.as_tensor([index[subset[t]] for t in target.tolist()]))


def test_model_without_the_suite_classes_is_refused_naming_them():
    subset = imagenet_subset("imagenet-r")
    with pytest.raises(ValueError, match=r"lacks 1 of the suite's classes \(" + subset[3]):
        match_classes("--suite imagenet-r", subset[:5], [w for w in imagenet_synsets() if w != subset[3]],
                      restrict_to=subset)  # fmt: skip
    with pytest.raises(ValueError, match="no class in common"):
        match_classes("--suite imagenet-r", subset[:5], CIFAR10_CLASSES, restrict_to=subset)


def test_imagenet_v2_folders_are_class_indices(tmp_path):
    images = np.zeros((2, 8, 8, 3), np.uint8)
    root = write_tree(tmp_path / "v2", images, np.array([0, 1]), None, names=["0", "999"])
    suite = read_suite(SuiteSpec.parse(f"imagenet-v2={root}"), imagenet_synsets())
    assert suite.classes.targets.tolist() == [0, 999] and not suite.classes.restricted
    (root / "1000").mkdir()
    (root / "1000" / "a.png").write_bytes((root / "0" / "0000.png").read_bytes())
    with pytest.raises(SuiteError, match="not a class index 0-999"):
        read_suite(SuiteSpec.parse(f"imagenet-v2={root}"), imagenet_synsets())


# ------------------------------------------------------------------------------------------ BN adaptation


class Brightness(nn.Module):
    """Predicts class 0 when an image is brighter than the BN's running mean, class 1 when darker."""

    def __init__(self) -> None:
        super().__init__()
        self.gray = nn.Conv2d(3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(1, affine=False)
        nn.init.constant_(self.gray.weight, 1 / 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.bn(self.gray(x)).mean((2, 3))
        return torch.cat([z, -z], 1)


def brightness_batches(shift: float, n: int = 64, batch: int = 16):
    rng = np.random.default_rng(1)
    labels = np.arange(n) % 2
    level = np.where(labels == 0, 0.6, 0.4) + shift
    images = level[:, None, None, None] + rng.normal(0, 0.02, (n, 3, 4, 4))
    x, y = torch.as_tensor(images, dtype=torch.float32), torch.as_tensor(labels)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def test_bn_adapt_restores_accuracy_on_a_shifted_set_and_restores_the_model():
    model = mbn.convert_model(Brightness(), sources=("clean", "adv"))
    for bn in (model.bn.bns["clean"], model.bn.bns["adv"]):
        bn.running_mean.fill_(0.5)
        bn.running_var.fill_(0.01)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = match_classes("t", ["a", "b"], ["a", "b"])
    identity = lambda b: b  # noqa: E731

    def acc(batches) -> float:
        counts, _ = score_set(model, batches, "clean", identity, classes)
        return counts.top1 / counts.total

    assert acc(brightness_batches(0.0)) == 1.0
    shifted = brightness_batches(0.3)
    assert acc(shifted) == 0.5  # everything looks bright: all class 0
    with adapted_bn(model, shifted, "clean", identity) as n:
        assert n == 64
        assert float(model.bn.bns["clean"].running_mean) == pytest.approx(0.8, abs=0.01)
        assert acc(shifted) == 1.0
        assert float(model.bn.bns["adv"].running_mean) == 0.5  # other sources untouched
    with adapted_bn(model, shifted, "clean", identity, prior=1e6):  # a strong prior keeps the training statistics
        assert acc(shifted) == 0.5
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bn_adapt_cli_never_touches_the_checkpoint(run_dir, loaded, tmp_path):
    x, y = loaded.test.images, loaded.test.labels
    shifted = np.clip(x.astype(np.float32) * 0.5 + 100, 0, 255).astype(np.uint8)
    suite = write_cifar_c(tmp_path / "c", {"contrast": [shifted] * 5}, y, loaded.stats.class_names)
    checkpoint = run_dir / "checkpoints" / "last.pt"
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    flags = ("--suite", f"cifar10-c={suite}", "--bn-adapt", "--bn-route", "auto")
    assert run_eval(run_dir, tmp_path / "out", *flags) == 0
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == digest
    entry = read(tmp_path / "out")["suites"]["cifar10-c"]
    adapted, routed = entry["bn_adapt"], entry["bn_route_auto"]
    assert adapted["prior"] == 0.0 and adapted["num_images"] == entry["num_images"]
    assert routed["sources"] == ["clean", "adv"] and sum(routed["picked"].values()) == pytest.approx(1.0)
    assert set(routed["picked"]) <= {"clean", "adv"}
    # the same suite scored again (no adaptation) gives the same number: the model was restored in-process too
    assert run_eval(run_dir, tmp_path / "again", "--suite", f"cifar10-c={suite}") == 0
    assert read(tmp_path / "again")["suites"]["cifar10-c"]["top1"] == entry["top1"]


# ------------------------------------------------------------------------------------------ options, recipe, writer


def test_bn_option_routes_every_number_and_writes_apart(run_dir, loaded, tmp_path, capsys):
    x, y = loaded.test.images, loaded.test.labels
    suite = write_cifar_c(tmp_path / "c", {"fog": [x] * 5}, y, loaded.stats.class_names)
    assert eval_main([str(run_dir), "--bn", "adv", "--per-bn", "--suite", f"cifar10-c={suite}"]) == 0
    result = json.loads((run_dir / "bn-adv" / "eval.json").read_text())
    assert result["bn"] == "adv" and result["suites"]["cifar10-c"]["bn"] == "adv"
    assert result["clean_acc"] == result["per_bn_acc"]["adv"] == result["suites"]["cifar10-c"]["top1"]
    capsys.readouterr()
    assert eval_main([str(run_dir), "--bn", "nope", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err == "mbn-eval: error: --bn: the run has no BN 'nope'; its BNs: clean, adv\n"


def test_recipe_suites_section(run_dir, loaded, suites_root, tmp_path):
    x, y = loaded.test.images, loaded.test.labels
    write_cifar_c(suites_root / "recipe-c", {"fog": [x] * 5}, y, loaded.stats.class_names)
    assert run_eval(run_dir, tmp_path / "out", "--suites") == 0
    assert list(read(tmp_path / "out")["suites"]) == ["recipe"]
    with pytest.raises(RecipeError, match=r"key 'eval\.suites\.imagenet-q': unknown suite 'imagenet-q'"):
        load_recipe(REPO / "recipes" / "vanilla.yaml", ["eval.suites.imagenet-q=/data"])


def test_write_suite_round_trips_with_the_generated_corruptions(run_dir, tmp_path, capsys):
    cache, suite = tmp_path / "cache", tmp_path / "written"
    common = ("--limit", "16", "--corruption-types", "fog", "contrast", "--cache-dir", str(cache))
    assert eval_main([str(run_dir), "--write-suite", str(suite), *common]) == 0
    assert sorted(p.name for p in suite.iterdir()) == ["classes.txt", "contrast.npy", "fog.npy", "labels.npy"]
    assert np.load(suite / "fog.npy").shape == (80, 32, 32, 3)
    # mbn's own corruptions and the written suite, read back in the published layout, score the same
    flags = ("--corruptions", "--suite", f"cifar10-c={suite}")
    assert run_eval(run_dir, tmp_path / "out", *common, *flags) == 0
    result = read(tmp_path / "out")
    assert result["suites"]["cifar10-c"]["corruptions"] == result["corruptions"]["accuracy"]
    capsys.readouterr()
    assert eval_main([str(run_dir), "--write-suite", str(suite), *common]) == 2  # never written into
    assert "exists and is not an empty folder" in capsys.readouterr().err


def _bad_suites(root: Path, x: np.ndarray, y: np.ndarray, names) -> dict[str, tuple[str, str]]:
    """case -> (--suite value, expected words of the one-line error)."""
    write_cifar_c(root / "short", {"fog": [x] * 5}, y, names)
    np.save(root / "short" / "fog.npy", np.concatenate([x] * 5)[:-5])
    write_cifar_c(root / "outside", {"fog": [x] * 5}, y + 10, names)
    write_cifar_c(root / "float", {"fog": [x.astype(np.float32)] * 5}, y, names)
    (root / "nolabels").mkdir()
    np.save(root / "nolabels" / "fog.npy", np.concatenate([x] * 5))
    write_tree(root / "foreign", x[:2], np.array([0, 1]), None, names=["n01440764", "n01443537"])
    (root / "empty" / "cls").mkdir(parents=True)
    (root / "flat").mkdir()
    (root / "flat" / "a.png").write_bytes(b"")
    write_tree(root / "loop", x[:2], np.array([0, 1]), names)
    (root / "loop" / names[0] / "again").symlink_to("..")
    write_tree(root / "one", x[:2], np.array([3, 3]), names)
    write_cifar_c(root / "npz", {"fog": [x] * 5}, y, names)
    np.savez(root / "npz" / "fog.npy", x)
    (root / "npz" / "fog.npy.npz").replace(root / "npz" / "fog.npy")
    write_cifar_c(root / "latin1", {"fog": [x] * 5}, y)
    (root / "latin1" / "classes.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    write_cifar_c(root / "flat0", {"fog": [np.zeros((len(y), 0, 0, 3), np.uint8)] * 5}, y, names)
    write_tree(root / "broken", x[:3], np.array([0, 1, 2]), names)
    (root / "broken" / names[1] / "0001.png").write_bytes(b"not an image")
    return {
        "missing": (f"cifar10-c={root / 'nope'}", "does not exist"),
        "short": (f"cifar10-c={root / 'short'}", "images but"),
        "outside": (f"cifar10-c={root / 'outside'}", "outside the suite's 10 classes"),
        "float": (f"cifar10-c={root / 'float'}", "must be uint8"),
        "nolabels": (f"cifar10-c={root / 'nolabels'}", "labels.npy not found"),
        "foreign": (f"folder={root / 'foreign'}", "no class in common"),
        "empty": (f"imagenet-sketch={root / 'empty'}", "no images"),
        "flat": (f"imagenet-r={root / 'flat'}", "no class folders"),
        "kind": (f"imagenet-q={root}", "unknown suite 'imagenet-q'"),
        "broken": (f"folder={root / 'broken'}", f"cannot decode image {root / 'broken' / names[1] / '0001.png'}"),
        "syntax": (str(root), "expected KIND=DIR"),
        "twice": ("folder=a", "named twice"),
        "loop": (f"folder={root / 'loop'}", "symlink loop"),
        "one class": (f"folder={root / 'one'}", "holds one of the model's classes"),
        "npz": (f"cifar10-c={root / 'npz'}", "is not a .npy array"),
        "latin1": (f"cifar10-c={root / 'latin1'}", "as UTF-8 text"),
        "zero size": (f"cifar10-c={root / 'flat0'}", "must be uint8 (N, H, W, 3)"),
        "label": (f"folder:caf\xe9={root}", "must be letters, digits"),
    }


def test_bad_suites_are_one_line_errors_and_keep_eval_json(run_dir, loaded, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_eval(run_dir, out) == 0
    good = (out / "eval.json").read_bytes()
    cases = _bad_suites(tmp_path, loaded.test.images, loaded.test.labels, loaded.stats.class_names)
    for case, (value, words) in cases.items():
        capsys.readouterr()
        extra = ("--suite", "folder=b") if case == "twice" else ("--workers", "1") if case == "broken" else ()
        assert run_eval(run_dir, out, "--suite", value, *extra) == 2, case
        err = capsys.readouterr().err
        assert err.startswith("mbn-eval: error: ") and err.count("\n") == 1, (case, err)
        assert words in err, (case, err)
        assert (out / "eval.json").read_bytes() == good, case
    suite = f"cifar10-c={tmp_path / 'npz'}"
    options = {
        "--bn-adapt: applies to the published suites": ("--bn-adapt",),
        "--bn-adapt-prior: only used with --bn-adapt": ("--suite", suite, "--bn-adapt-prior", "4"),
        "--batch-size: --bn-adapt estimates statistics per batch": (
            "--suite", f"folder={tmp_path / 'foreign'}", "--bn-adapt", "--batch-size", "1"),
        "--reference: used by --corruptions and the CIFAR -C suites": ("--suite", f"folder={tmp_path}",
                                                                        "--reference", str(out)),
        "--write-suite: writes a suite and stops": ("--write-suite", str(tmp_path / "new"), "--suite", suite),
        "--write-suite: cannot create": ("--write-suite", str(out / "eval.json" / "sub")),
    }  # fmt: skip
    for words, flags in options.items():
        capsys.readouterr()
        assert run_eval(run_dir, out, *flags) == 2, words
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
        assert (out / "eval.json").read_bytes() == good, words


def test_paper_table_one_row_per_model():
    entry = {"kind": "imagenet-c", "top1": 0.4, "mce": 0.65, "bn_adapt": {"top1": 0.5, "mce": 0.55}}
    in_a = {"kind": "imagenet-a", "top1": 0.03}
    rows = {
        "vanilla": {"clean_acc": 0.76, "suites": {"imagenet-c": entry, "imagenet-a": in_a}},
        "advprop": {"clean_acc": 0.77, "suites": {"imagenet-a": {"kind": "imagenet-a", "top1": 0.05}}},
    }
    lines = paper_table(rows)
    assert lines[0] == "| model | clean | IN-C mCE | IN-C mCE + BN adapt | IN-A |"
    assert lines[2] == "| vanilla | 76.00 | 65.00 | 55.00 | 3.00 |"
    assert lines[3] == "| advprop | 77.00 | - | - | 5.00 |"
    # a partial ImageNet-C has no mCE: its column stays empty rather than showing an accuracy
    rows["advprop"]["suites"]["imagenet-c"] = {"kind": "imagenet-c", "top1": 0.45, "mce": None, "complete": False}
    assert paper_table(rows)[3] == "| advprop | 77.00 | - | - | 5.00 |"
    rows["advprop"]["suites"]["imagenet-a"]["complete"] = False
    assert paper_table(rows)[3].endswith("| 5.00 (partial) |")


def test_imagenet_c_files_are_not_cropped_twice():
    """ImageNet-C's files are already 224/256 centre crops: a 224-px model (crop 0.875) sees them unchanged, a
    64-px one sees all of the file shrunk, never a second centre crop."""
    from torchvision.transforms.v2 import functional as TF

    image = torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8)
    assert torch.equal(Preparation(224, 0.875, cropped=224 / 256)(image), image)
    shrunk = Preparation(64, 0.875, cropped=224 / 256)(image)
    assert torch.equal(shrunk, TF.resize(image, 64, antialias=True))
    assert not torch.equal(Preparation(64, 0.875)(image), shrunk)  # an uncropped source is cropped as usual


@pytest.mark.parametrize(
    "kind", ["cifar10-c", "cifar100-c", "imagenet-c", "imagenet-a", "imagenet-r", "imagenet-sketch", "imagenet-v2",
             "stylized-imagenet", "folder"],
)  # fmt: skip
def test_every_published_layout_loads(kind, tmp_path):
    """A few images per class in each layout as its authors ship it; listed, matched and streamed batch by batch."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 12, 10, 3), dtype=np.uint8)
    labels = np.arange(6) % 3
    synsets = imagenet_synsets()
    subset = imagenet_subset("imagenet-r" if kind == "imagenet-r" else "imagenet-a")
    model_classes, expected = synsets, [synsets[7], synsets[8], synsets[9]]
    root = tmp_path / kind
    if kind in ("cifar10-c", "cifar100-c"):
        from mbn.eval.classes import CIFAR100_CLASSES

        model_classes = CIFAR10_CLASSES if kind == "cifar10-c" else CIFAR100_CLASSES
        expected = list(model_classes[:3])
        write_cifar_c(root, {"gaussian_noise": [images] * 5, "speckle_noise": [images] * 5}, labels)
    elif kind == "imagenet-c":
        for corruption in ("gaussian_noise", "extra/speckle_noise"):
            for severity in range(1, 6):
                write_tree(root / corruption / str(severity), images, labels, None, names=expected)
    elif kind in ("imagenet-a", "imagenet-r"):
        expected = [subset[0], subset[1], subset[2]]
        write_tree(root, images, labels, None, names=expected)
    elif kind == "imagenet-v2":
        write_tree(root, images, labels, None, names=["7", "8", "9"])
    elif kind == "folder":
        model_classes, expected = ("x", "y", "z"), ["x", "y", "z"]
        write_tree(root, images, labels, model_classes)
    else:  # sketch, stylized: wnid folders
        write_tree(root, images, labels, None, names=expected)
    suite = read_suite(SuiteSpec.parse(f"{kind}={root}"), model_classes)
    index = {name: i for i, name in enumerate(model_classes)}
    outputs = suite.classes.outputs.tolist()
    named = [model_classes[outputs[t]] for t in suite.classes.targets.tolist()]  # suite label -> model class
    assert named[: len(expected)] == expected
    if kind in ("cifar10-c", "cifar100-c", "imagenet-c"):
        corruptions = {(s.corruption, s.severity) for s in suite.sets}
        assert corruptions == {(c, v) for c in ("gaussian_noise", "speckle_noise") for v in range(1, 6)}
    else:
        assert len(suite.sets) == 1
    batches = list(set_batches(suite.sets[0], Preparation(8), batch_size=4))
    assert [tuple(b[0].shape) for b in batches] == [(4, 3, 8, 8), (2, 3, 8, 8)]
    got = sorted(index[expected[int(t)]] for b in batches for t in b[1])
    assert got == sorted(index[expected[int(label)]] for label in labels)
