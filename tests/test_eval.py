"""``mbn-eval`` and :mod:`mbn.eval.robustness` / :mod:`mbn.eval.report`: schema, merge, mCE, attacks, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import mbn
from mbn import extras
from mbn.checkpoint import load_checkpoint
from mbn.cli.eval import main as eval_main
from mbn.cli.train import main as train_main
from mbn.data import subset_indices
from mbn.eval.accuracy import accuracy
from mbn.eval.corruptions import CORRUPTIONS, SEVERITIES
from mbn.eval.evaluate import SCHEMA_KEYS
from mbn.eval.report import render_markdown
from mbn.eval.robustness import (
    RoutedModel,
    autoattack_accuracy,
    corruption_dataset_id,
    corruption_summary,
    default_corruption_cache,
    default_step_size,
    robust_accuracy,
    robustness_sweep,
)
from mbn.extras import TORCHATTACKS
from mbn.fileio import atomic_torch_save
from mbn.norm import MultiSourceBatchNorm
from mbn.synthetic import generate_synthetic

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step AdvProp run (clean + adv BNs) of a tiny ResNet-8 on the synthetic set."""
    out = tmp_path_factory.mktemp("eval") / "run"
    code = train_main(
        [
            str(REPO / "recipes" / "advprop.yaml"),
            "data.name=synthetic",
            "data.synthetic_train_size=64",
            "data.synthetic_test_size=32",
            "data.batch_size=16",
            "data.num_workers=0",
            "model.name=cifar_resnet8",
            "model.width=8",
            "trainer.max_steps=2",
            "trainer.progress=none",
            "logging.tensorboard=false",
            f"trainer.out_dir={out}",
        ]
    )
    assert code == 0
    return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One corruption cache for the module, so each set is generated once."""
    return tmp_path_factory.mktemp("corruption_cache")


def run_eval(run: Path, out: Path, cache: Path, *flags: str) -> int:
    return eval_main([str(run), "--out", str(out), "--cache-dir", str(cache), *flags])


def read(out: Path) -> dict:
    return json.loads((out / "eval.json").read_text())


# ------------------------------------------------------------------------------------------------ CLI


@pytest.mark.slow
def test_all_writes_every_schema_key_and_plot(run_dir, cache_dir, tmp_path):
    assert run_eval(run_dir, tmp_path, cache_dir, "--all", "--limit", "16") == 0
    result = read(tmp_path)
    assert list(result) == list(SCHEMA_KEYS)
    assert result["checkpoint"] == str((run_dir / "checkpoints" / "last.pt").resolve())
    assert result["run_dir"] == str(run_dir.resolve())
    assert (result["limit"], result["num_images"], result["sources"]) == (16, 16, ["clean", "adv"])
    assert 0.0 <= result["clean_acc"] <= 1.0
    assert set(result["per_bn_acc"]) == {"clean", "adv"}
    assert result["per_bn_acc"]["clean"] == result["clean_acc"]

    corr = result["corruptions"]
    assert set(corr) == {"accuracy", "mean_acc", "per_corruption_mean", "ce", "mce", "reference", "skipped"}
    assert list(corr["accuracy"]) == list(CORRUPTIONS) and corr["skipped"] == {}  # frost too, with the extra
    assert all(list(row) == [str(s) for s in SEVERITIES] for row in corr["accuracy"].values())
    values = [v for row in corr["accuracy"].values() for v in row.values()]
    assert all(0.0 <= v <= 1.0 for v in values)
    torch.testing.assert_close(corr["mean_acc"], float(np.mean(values)))
    torch.testing.assert_close(
        corr["per_corruption_mean"]["fog"], float(np.mean(list(corr["accuracy"]["fog"].values())))
    )
    assert corr["ce"] is None and corr["mce"] is None and corr["reference"] is None

    adv = result["adversarial"]
    assert (adv["steps"], adv["bn"], adv["autoattack"]) == (10, "clean", None)  # the run's `eval` section defaults
    assert list(adv["linf"]) == ["1", "2", "4", "8"] and list(adv["l2"]) == ["0.25", "0.5", "1"]
    assert all(acc <= result["clean_acc"] for acc in [*adv["linf"].values(), *adv["l2"].values()])

    div = result["divergence"]
    assert list(div) == ["adv"]
    layers = [name for name, m in _loaded_model(run_dir).named_modules() if isinstance(m, MultiSourceBatchNorm)]
    assert list(div["adv"]) == layers and all(v >= 0 for v in div["adv"].values())

    for name in ("robust_acc_vs_eps.png", "corruption_acc.png", "bn_divergence.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC, name
    markdown = (tmp_path / "eval.md").read_text()
    assert "| clean (main) |" in markdown and "| jpeg_compression |" in markdown and "| L-inf | 8/255 |" in markdown
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temporaries

    # --limit takes the fixed seeded subset of data.test_limit (a class-sorted folder's first N are one class)
    (cached,) = cache_dir.glob("synthetic-32px-first16-s0-*/labels.npy")
    _, test_labels = generate_synthetic(32, 32, seed=1)
    np.testing.assert_array_equal(np.load(cached), test_labels[subset_indices(32, 16)])


def _loaded_model(run: Path) -> nn.Module:
    from mbn.eval.loading import load_run

    return load_run(run, "cpu").model


def test_default_is_clean_and_per_bn_into_the_run_directory(run_dir, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("eval.*", "*.png"))
    assert eval_main([str(run), "--limit", "8"]) == 0
    result = read(run)
    assert set(result["per_bn_acc"]) == {"clean", "adv"}
    assert result["corruptions"] is None and result["adversarial"] is None and result["divergence"] is None
    assert not list(run.glob("*.png"))  # no plot for sections that were not run


def test_reference_to_itself_gives_mce_one(run_dir, cache_dir, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    flags = ("--corruptions", "--limit", "16", "--corruption-types", "fog", "contrast", "--severities", "1", "5")
    assert run_eval(run_dir, first, cache_dir, *flags) == 0
    assert read(first)["corruptions"]["mce"] is None
    # a run directory (or any directory) holding an eval.json is a valid reference
    assert run_eval(run_dir, second, cache_dir, *flags, "--reference", str(first)) == 0
    corr = read(second)["corruptions"]
    assert corr["mce"] == 1.0
    assert corr["ce"] == {"fog": 1.0, "contrast": 1.0}
    assert corr["reference"] == str((first / "eval.json").resolve())
    assert list(corr["accuracy"]["fog"]) == ["1", "5"]
    assert "| CE |" in (second / "eval.md").read_text()


FROST_SKIPPED = (
    "mbn-eval: note: skipping the frost corruption (its textures come with the 'imagecorruptions' package, which is "
    'not installed: pip install "mbn-advprop[robustness]"); corruption results are over 14 of 15 corruptions'
)


@pytest.fixture
def base_install(monkeypatch):
    """imagecorruptions (the robustness extra's frost textures) cannot be found, as on a plain install."""
    real = extras.importlib.util.find_spec

    def find_spec(name, *args):
        return None if name.split(".")[0] == "imagecorruptions" else real(name, *args)

    monkeypatch.setattr(extras.importlib.util, "find_spec", find_spec)


@pytest.mark.slow
def test_all_on_a_base_install_skips_frost_said_and_labelled(base_install, run_dir, cache_dir, tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    common = ("--limit", "8", "--pgd-steps", "1", "--linf-eps", "1", "--l2-eps", "0.5")
    assert run_eval(run_dir, first, cache_dir, "--all", *common) == 0
    out, err = capsys.readouterr()
    assert [line for line in err.splitlines() if "frost" in line] == [FROST_SKIPPED]  # one line: what, why, how
    corr = read(first)["corruptions"]
    evaluated = [name for name in CORRUPTIONS if name != "frost"]
    assert list(corr["accuracy"]) == evaluated and "frost" not in corr["per_corruption_mean"]
    assert list(corr["skipped"]) == ["frost"] and 'pip install "mbn-advprop[robustness]"' in corr["skipped"]["frost"]
    values = [v for row in corr["accuracy"].values() for v in row.values()]
    assert len(values) == 14 * 5
    torch.testing.assert_close(corr["mean_acc"], float(np.mean(values)))
    assert f"corruption mean {corr['mean_acc']:.4f} (14 of 15 corruptions, frost skipped)" in out
    markdown = (first / "eval.md").read_text()
    assert "Mean accuracy over 14 of 15 corruptions x 5 severities: **" in markdown
    assert "| frost | - | - | - | - | - | skipped |" in markdown
    assert f"Skipped: frost, {corr['skipped']['frost']}; the means above leave it out." in markdown
    assert (first / "corruption_acc.png").read_bytes()[:8] == PNG_MAGIC
    assert read(first)["adversarial"] is not None and read(first)["divergence"] is not None  # the rest of --all

    # mCE against a reference is over the same 14
    assert run_eval(run_dir, second, cache_dir, "--corruptions", "--limit", "8", "--reference", str(first)) == 0
    out, err = capsys.readouterr()
    assert [line for line in err.splitlines() if "frost" in line] == [FROST_SKIPPED]
    corr = read(second)["corruptions"]
    assert corr["mce"] == 1.0 and list(corr["ce"]) == evaluated and list(corr["skipped"]) == ["frost"]
    assert "mCE 1.0000 (14 of 15 corruptions, frost skipped)" in out
    assert "mCE over 14 of 15 corruptions relative to `" in (second / "eval.md").read_text()


def test_frost_asked_for_by_name_on_a_base_install_is_one_line(base_install, run_dir, cache_dir, tmp_path, capsys):
    from mbn.eval.evaluate import EvalOptions, evaluate_run
    from mbn.extras import MissingExtraError

    expected = (
        "mbn-eval: error: the frost corruption (its textures) needs the 'imagecorruptions' package: "
        'pip install "mbn-advprop[robustness]"'
    )
    for names in (["frost"], ["fog", "frost"]):
        flags = ("--corruptions", "--limit", "8", "--severities", "1", "--corruption-types", *names)
        assert run_eval(run_dir, tmp_path, cache_dir, *flags) == 2
        assert capsys.readouterr().err.strip() == expected
        assert not (tmp_path / "eval.json").exists()  # refused before any section was computed
    # the library keeps the whole suite unless asked to skip (the paper harness's tables are of all 15)
    options = EvalOptions(sections={"clean", "corruptions"}, limit=8, cache_dir=cache_dir, progress=False)
    with pytest.raises(MissingExtraError, match="frost corruption"):
        evaluate_run(run_dir, options)


def test_reference_errors_exit_2(run_dir, cache_dir, tmp_path, capsys):
    ref = tmp_path / "ref"
    assert run_eval(run_dir, ref, cache_dir, "--corruptions", "--limit", "8", "--corruption-types", "fog") == 0
    capsys.readouterr()
    cases = [
        ("--limit", "16", "--corruption-types", "fog", "--reference", str(ref)),  # other image count
        ("--limit", "8", "--corruption-types", "contrast", "--reference", str(ref)),  # missing corruption
        ("--limit", "8", "--corruption-types", "fog", "--reference", str(tmp_path / "none")),  # no such file
    ]
    for extra in cases:
        assert run_eval(run_dir, tmp_path / "out", cache_dir, "--corruptions", *extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("mbn-eval: error: --reference") and err.count("\n") == 1, err


@pytest.mark.slow
def test_merge_keeps_sections_not_recomputed(run_dir, cache_dir, tmp_path, capsys):
    common = ("--limit", "8", "--pgd-steps", "2")
    assert run_eval(run_dir, tmp_path, cache_dir, *common, "--adversarial", "--linf-eps", "2", "--l2-eps", "0.5") == 0
    first = read(tmp_path)
    assert first["per_bn_acc"] is None and first["divergence"] is None

    assert run_eval(run_dir, tmp_path, cache_dir, *common, "--per-bn", "--divergence") == 0
    second = read(tmp_path)
    assert second["adversarial"] == first["adversarial"]
    assert second["per_bn_acc"] is not None and second["divergence"] is not None
    assert (tmp_path / "robust_acc_vs_eps.png").is_file()  # the report covers merged sections too

    # a new radius is added to the earlier sweep (same steps and BN); the earlier radius is kept
    assert run_eval(run_dir, tmp_path, cache_dir, *common, "--adversarial", "--linf-eps", "4", "--l2-eps", "1") == 0
    third = read(tmp_path)
    assert list(third["adversarial"]["linf"]) == ["2", "4"] and list(third["adversarial"]["l2"]) == ["0.5", "1"]
    assert third["per_bn_acc"] == second["per_bn_acc"] and third["divergence"] == second["divergence"]

    # another image subset must not mix with the earlier numbers
    capsys.readouterr()
    assert run_eval(run_dir, tmp_path, cache_dir, "--limit", "16") == 0
    fourth = read(tmp_path)
    assert fourth["adversarial"] is None and fourth["divergence"] is None and fourth["num_images"] == 16
    assert "replacing it" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing", "not_a_run", "garbage"])
def test_bad_path_exits_2_with_one_line(case, tmp_path, capsys):
    path = tmp_path / "nothing"
    if case == "not_a_run":
        path.mkdir()
    elif case == "garbage":
        path = tmp_path / "last.pt"
        path.write_bytes(b"not a checkpoint")
    assert eval_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mbn-eval: error: ") and err.count("\n") == 1 and str(path) in err, err
    assert not (tmp_path / "eval.json").exists()


def test_incompatible_checkpoint_exits_2_with_one_line(run_dir, tmp_path, capsys):
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    ckpt["config"]["model"]["width"] = 16  # the weights are for width 8
    path = tmp_path / "checkpoints" / "last.pt"
    atomic_torch_save(ckpt, path)
    assert eval_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mbn-eval: error: ") and err.count("\n") == 1 and "does not match" in err, err
    assert not (tmp_path / "eval.json").exists()


def _image_tree(root: Path, per_class: dict[str, int]) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for cls in ("ant", "bee"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")


def test_evaluation_reads_only_the_test_split(tmp_path, monkeypatch, capsys):
    """Checkpoints carry classes and normalisation: mbn-eval runs on a moved test-only tree via --data-root."""
    monkeypatch.setenv("MBN_CACHE_DIR", str(tmp_path / "decoded"))
    tree, run = tmp_path / "tree", tmp_path / "run"
    _image_tree(tree, {"train": 8, "test": 4})
    argv = [str(REPO / "recipes" / "vanilla.yaml"), "data.name=imagefolder", f"data.root={tree}", "data.image_size=16"]
    argv += ["data.batch_size=8", "data.num_workers=0", "model.name=cifar_resnet8", "model.width=8"]
    argv += ["trainer.max_steps=2", "trainer.progress=none", "logging.tensorboard=false", f"trainer.out_dir={run}"]
    assert train_main(argv) == 0
    stored = load_checkpoint(run / "checkpoints" / "last.pt")["data"]
    assert stored["class_names"] == ["ant", "bee"] and stored["image_size"] == 16
    assert eval_main([str(run), "--out", str(tmp_path / "a")]) == 0
    expected = read(tmp_path / "a")["clean_acc"]

    # A checkpoint from before mbn stored the statistics loads the training data for them: same numbers.
    legacy = load_checkpoint(run / "checkpoints" / "last.pt")
    del legacy["data"]
    atomic_torch_save(legacy, tmp_path / "legacy" / "checkpoints" / "last.pt")
    model, old_model = _loaded_model(run), _loaded_model(tmp_path / "legacy")
    torch.testing.assert_close(model.mean, old_model.mean, rtol=0, atol=0)
    torch.testing.assert_close(model.std, old_model.std, rtol=0, atol=0)

    moved = tmp_path / "moved"
    shutil.copytree(tree / "test", moved / "test")
    shutil.rmtree(tree)
    shutil.rmtree(tmp_path / "decoded")  # no cached arrays either: the test images are decoded from `moved`
    capsys.readouterr()
    assert eval_main([str(run), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.root" in err and str(tree) in err, err
    assert eval_main([str(run), "--out", str(tmp_path / "b"), "--data-root", str(moved)]) == 0
    assert read(tmp_path / "b")["clean_acc"] == expected
    assert not (moved / "train").exists()


@pytest.mark.parametrize(
    ("flags", "what"),
    [
        (("--limit", "0"), "--limit"),
        (("--linf-eps", "-1"), "--linf-eps"),
        (("--severities", "6"), "--severities"),
        (("--device", "cuda:0" if not torch.cuda.is_available() else "nonsense"), "--device"),
    ],
)
def test_bad_option_values_exit_2(run_dir, flags, what, tmp_path, capsys):
    assert eval_main([str(run_dir), "--out", str(tmp_path), "--all", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mbn-eval: error: {what}") and err.count("\n") == 1, err


# ------------------------------------------------------------------------------------ robustness units


class Brightness(nn.Module):
    """Class 1 iff the mean pixel (after a BN with identity statistics) exceeds 0.5, else class 0.

    Classes 2 and 3 are never predicted; they exist because AutoAttack's targeted DLR loss needs 4 classes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.bn(x).mean(dim=(1, 2, 3))
        never = torch.full_like(m, -1.0)
        return 20 * torch.stack([0.5 - m, m - 0.5, never, never], 1)


@pytest.fixture
def brightness() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A perfectly accurate model with a known margin (0.2 in mean brightness) and its data in two batches."""
    model = mbn.convert_model(Brightness(), sources=("clean", "adv")).eval()
    # the adv BN subtracts 1, so through it every image looks dark: accuracy 0.5
    model.bn.bns["adv"].running_mean.fill_(1.0)
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(16) % 2
    images = (0.3 + 0.4 * labels.view(-1, 1, 1, 1) + 0.05 * (torch.rand(16, 3, 8, 8, generator=gen) - 0.5)).float()
    return model, [(images[:8], labels[:8]), (images[8:], labels[8:])]


def identity(batch):
    return batch


def test_robust_accuracy_known_margins(brightness):
    model, batches = brightness
    assert accuracy(model, batches, "clean", identity) == 1.0
    # L-inf: the mean moves by at most eps; the margin is 0.2 (+- noise 0.025)
    for eps, expected in ((1 / 255, 1.0), (0.1, 1.0), (0.25, 0.0)):
        assert robust_accuracy(model, batches, "clean", identity, norm="linf", eps=eps, steps=5) == expected, eps
    # L2 over 3*8*8 pixels: the mean moves by at most eps / sqrt(192) (1.0 -> 0.072; 4.0 -> 0.29)
    for eps, expected in ((1.0, 1.0), (4.0, 0.0)):
        assert robust_accuracy(model, batches, "clean", identity, norm="l2", eps=eps, steps=5) == expected, eps


def test_sweep_keys_and_units(brightness):
    model, batches = brightness
    # 0-255 units: 25/255 = 0.098 keeps every image, 64/255 = 0.25 flips every image
    out = robustness_sweep(model, batches, "clean", identity, linf_eps=[0, 25, 64], l2_eps=[1.0, 4.0], steps=5)
    assert out == {"linf": {"0": 1.0, "25": 1.0, "64": 0.0}, "l2": {"1": 1.0, "4": 0.0}}


def test_attack_and_prediction_use_the_chosen_bn_in_eval_mode(brightness):
    model, batches = brightness
    seen: list[tuple[str, bool]] = []
    model.bn.register_forward_pre_hook(lambda m, _: seen.append((m.active, m.training)))
    model.train()
    assert robust_accuracy(model, batches, "adv", identity, norm="linf", eps=0.01, steps=3) == 0.5
    assert seen and set(seen) == {("adv", False)}
    assert model.training and model.bn.active == "clean"  # mode and routing restored
    assert robust_accuracy(model, batches, "adv", identity, norm="linf", eps=0.0, steps=1) == accuracy(
        model, batches, "adv", identity
    )


def test_routed_model_for_torchattacks(brightness):
    model, batches = brightness
    images = batches[0][0]
    routed = RoutedModel(model, "adv").eval()
    with torch.no_grad(), mbn.use_source(model, "adv"):
        expected = model(images)
    torch.testing.assert_close(routed(images), expected)
    assert model.bn.active == "clean"
    with pytest.raises(ValueError, match="unknown source"):
        RoutedModel(model, "nope")


def test_autoattack_accuracy_beyond_the_margin(brightness):
    pytest.importorskip("torchattacks", reason=f"AutoAttack: {TORCHATTACKS}")
    model, batches = brightness
    # eps 0.3 > margin 0.2: APGD-CE alone breaks every image. (Images that survive run all four attacks,
    # Square's 5000 queries included: minutes on CPU, so the robust side is left to the PGD tests.)
    assert autoattack_accuracy(model, batches[:1], "clean", identity, eps=0.3, num_classes=4, seed=0) == 0.0
    assert model.bn.active == "clean" and not model.training


def test_default_step_size_and_bad_arguments(brightness):
    torch.testing.assert_close(default_step_size(8 / 255, 10), 2.5 * 8 / 255 / 10)
    model, batches = brightness
    with pytest.raises(ValueError, match="norm"):
        robust_accuracy(model, batches, "clean", identity, norm="l1", eps=0.1, steps=1)
    with pytest.raises(ValueError, match="steps"):
        robust_accuracy(model, batches, "clean", identity, norm="linf", eps=0.1, steps=0)
    with pytest.raises(ValueError, match="num_classes"):
        autoattack_accuracy(model, batches, "clean", identity, eps=0.1, num_classes=3)


# ------------------------------------------------------------------------------ corruption summary units


def test_corruption_summary_ce_against_a_reference():
    acc = {("fog", 1): 0.8, ("fog", 2): 0.6, ("snow", 1): 0.9, ("snow", 2): 0.5}
    ref = {("fog", 1): 0.6, ("fog", 2): 0.4, ("snow", 1): 0.9, ("snow", 2): 0.5}
    out = corruption_summary(acc, ["fog", "snow"], [1, 2], reference=ref, reference_path="ref.json")
    assert out["accuracy"] == {"fog": {"1": 0.8, "2": 0.6}, "snow": {"1": 0.9, "2": 0.5}}
    torch.testing.assert_close(out["mean_acc"], 0.7)
    torch.testing.assert_close(out["ce"]["fog"], (0.2 + 0.4) / (0.4 + 0.6))
    torch.testing.assert_close(out["ce"]["snow"], 1.0)
    torch.testing.assert_close(out["mce"], (0.6 + 1.0) / 2)
    assert out["reference"] == "ref.json"
    assert "| fog | 80.00 | 60.00 | 70.00 | 60.00 |" in render_markdown({"corruptions": out, "sources": ["clean"]})


def test_corruption_cache_key_and_default_location(monkeypatch, tmp_path):
    a = np.zeros((4, 32, 32, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0, 0] = 1
    assert corruption_dataset_id("cifar10", a, 4) == corruption_dataset_id("cifar10", a.copy(), 4)
    assert corruption_dataset_id("cifar10", a, 4) != corruption_dataset_id("cifar10", b, 4)
    assert corruption_dataset_id("cifar10", a, None).startswith("cifar10-32px-all-s0-")
    monkeypatch.setenv("MBN_CACHE_DIR", str(tmp_path))
    assert default_corruption_cache() == tmp_path / "corruptions"
