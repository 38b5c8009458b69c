"""Training engine and ``mbn-train``: recipes, TensorBoard, resume, bad input, NaN and Ctrl-C handling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import mbn
from mbn.checkpoint import load_checkpoint
from mbn.cli.train import main as train_main
from mbn.config import load_recipe
from mbn.logger import DIAGNOSTICS, divergence_image_tag, divergence_tag
from tests.plugin_env import install_plugin
from tests.runs import TINY, train, weights

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (REPO / "recipes").glob("*.yaml") if not p.stem.endswith("base"))  # bases: no domains


#: Recipes made for real data and weights, brought down to the synthetic set (no download, 32x32, preloaded, fp32).
_SMALL = [
    "data.preload=true",
    "data.augment=cifar",
    "data.image_size=32",
    "trainer.amp=none",
    "trainer.channels_last=false",
]
SMOKE_EXTRA = {
    "finetune_advprop_effnet": ["model.pretrained=false", *_SMALL],
    **{f"imagenet_{net}_{kind}": [*_SMALL, f"model.name={model}"]  # their own network (drop-path kwargs)
       for net, model in (("resnet50", "torchvision.resnet50"), ("effnet_b0", "timm.tf_efficientnet_b0"))
       for kind in ("advprop", "vanilla")},
}  # fmt: skip


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_smoke_every_recipe_trains_on_synthetic(recipe, tmp_path):
    assert train(recipe, tmp_path / "run", "trainer.max_steps=2", *SMOKE_EXTRA.get(recipe.stem, [])) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 2
    assert set(metrics["test_acc"]) == {metrics["sources"][0]}
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


@pytest.mark.slow
def test_feature_tensorboard_has_per_domain_curves(tmp_path):
    """One sub-run per domain and per BN, each quantity under one tag: one chart per quantity, a line per domain."""
    from tests.runs import tensorboard_images, tensorboard_runs, tensorboard_scalars

    run = tmp_path / "run"
    assert (
        train(REPO / "recipes" / "advprop_autoaug.yaml", run, "trainer.max_steps=4", "trainer.eval_all_bns=true") == 0
    )
    runs = tensorboard_runs(run / "tb")
    domains, bns = ("clean", "autoaug", "adv"), ("clean", "autoaug", "adv")
    assert set(runs) == {"", *(f"domain={d}" for d in domains), *(f"bn={b}" for b in bns)}
    tags = {name: set(acc.Tags()["scalars"]) | set(acc.Tags()["images"]) for name, acc in runs.items()}
    assert tags[""] == {"loss/total", "lr", "throughput/total"}  # the total on its own chart
    for d in domains:
        expected = {"loss/per_domain", "train_acc/per_domain", "throughput/per_domain", "x_samples/images"}
        assert tags[f"domain={d}"] == expected | ({"x_samples/perturbation"} if d != "clean" else set())
    assert tags["bn=clean"] == {"test_acc/per_bn", "test_acc5/per_bn"}  # the main BN: no divergence to itself
    for b in ("autoaug", "adv"):
        divergence = {f"{DIAGNOSTICS}/bn_divergence_log10", f"{DIAGNOSTICS}/bn_divergence_per_layer"}
        assert tags[f"bn={b}"] == {"test_acc/per_bn", "test_acc5/per_bn"} | divergence
    scalars, images = tensorboard_scalars(run / "tb"), tensorboard_images(run / "tb")
    assert [step for step, _ in scalars["loss/adv"]] == [1, 2, 3, 4]
    assert {divergence_tag("autoaug"), divergence_tag("adv")} <= set(scalars)
    assert {divergence_image_tag("autoaug"), divergence_image_tag("adv")} <= images
    groups = sorted({tag.split("/")[0] for run_tags in tags.values() for tag in run_tags})
    assert groups[0] == "loss" and groups[-2:] == [DIAGNOSTICS, "x_samples"]  # what a reader looks for first


@pytest.mark.slow
def test_feature_resume_equals_uninterrupted(tmp_path):
    recipe = REPO / "recipes" / "advprop_autoaug.yaml"
    assert train(recipe, tmp_path / "full", "trainer.max_steps=7") == 0
    assert train(recipe, tmp_path / "part", "trainer.max_steps=3") == 0
    assert train_main(["--resume", str(tmp_path / "part"), "trainer.max_steps=7"]) == 0
    full, resumed = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in ("full", "part"))
    assert resumed["state"]["step"] == 7 and resumed["state"]["epoch"] == 1
    torch.testing.assert_close(resumed["model"], full["model"], rtol=0, atol=0)
    torch.testing.assert_close(resumed["optimizer"]["state"], full["optimizer"]["state"], rtol=0, atol=0)


@pytest.mark.slow
def test_feature_same_seed_same_weights(tmp_path):
    recipe = REPO / "recipes" / "advprop.yaml"
    for name in ("a", "b"):
        assert train(recipe, tmp_path / name, "trainer.max_steps=3") == 0
    torch.testing.assert_close(weights(tmp_path / "a"), weights(tmp_path / "b"), rtol=0, atol=0)
    assert train(recipe, tmp_path / "c", "trainer.max_steps=3", "trainer.seed=1") == 0
    assert not torch.equal(weights(tmp_path / "a")["net.fc.weight"], weights(tmp_path / "c")["net.fc.weight"])


@pytest.mark.slow
def test_feature_split_batch_equals_separate_forwards(tmp_path):
    recipe = REPO / "recipes" / "advprop.yaml"
    assert train(recipe, tmp_path / "split", "trainer.max_steps=2", "trainer.split_batch=true") == 0
    assert train(recipe, tmp_path / "sep", "trainer.max_steps=2", "trainer.split_batch=false") == 0
    torch.testing.assert_close(weights(tmp_path / "split"), weights(tmp_path / "sep"), rtol=1e-5, atol=1e-6)


def test_feature_shared_bn_mixes_domains(tmp_path):
    cfg = load_recipe(REPO / "recipes" / "advtrain.yaml", TINY)
    assert [s.bn for s in mbn.config.domain_specs(cfg)] == ["clean", "clean"]
    assert train(REPO / "recipes" / "advtrain.yaml", tmp_path / "r", "trainer.max_steps=1") == 0
    assert load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")["sources"] == ["clean"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["missing.yaml"], "missing.yaml: recipe file not found"),
        (["RECIPE", "trainer.epoch=3"], "key 'trainer.epoch': Key 'epoch' not in 'TrainerCfg'"),
        (["RECIPE", "trainer.epochs=many"], "key 'trainer.epochs': Value 'many'"),
        (["RECIPE", "data.name=mnist"], "key 'data.name': expected one of"),
        (["RECIPE", "optim.lr=-1"], "key 'optim.lr': expected a number > 0, got -1"),
        (["RECIPE", "domains.adv.epz=4"], "key 'domains.adv': domain 'pgd': unknown parameter 'epz'"),
        (["RECIPE", "domains.adv.type=pgdd"], "key 'domains.adv.type': unknown domain type 'pgdd'"),
        (["RECIPE", "domains.adv.input=nope"], "key 'domains.adv.input': unknown domain 'nope'"),
        (["RECIPE", "domains.adv.input=adv"], "input cycle adv -> adv"),
        (["RECIPE", "domains.adv.eps=-1"], "key 'domains.adv'"),
        (["RECIPE", "model.name=resnet1000"], "key 'model.name'"),
        (["RECIPE", "trainer.device=cuda:7"], "key 'trainer.device'"),
        (["RECIPE", "data.name=imagefolder", "data.root=/nonexistent"], "key 'data.root'"),
        (["RECIPE", "trainer.max_steps=0"], "key 'trainer.max_steps'"),
        (["RECIPE", "oops"], "override 'oops': expected dotted.key=value"),
        (["RECIPE", "ema=0.9"], "key 'ema': a section, not a value (set ema.<name>=...), got '0.9'"),
        (["RECIPE", "optim=1"], "key 'optim': a section, not a value"),
    ],
)
def test_exception_bad_input_one_line_exit_2(args, expected, tmp_path, capsys):
    args = [str(REPO / "recipes" / "advprop.yaml") if a == "RECIPE" else a for a in args]
    code = train_main([args[0], *TINY, f"trainer.out_dir={tmp_path / 'run'}", *args[1:]])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert expected in err, err
    assert "Traceback" not in err


@pytest.mark.slow
def test_exception_bad_input_no_traceback_in_subprocess(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mbn.cli.train", str(REPO / "recipes" / "vanilla.yaml"), "trainer.epoch=3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "mbn-train: error: key 'trainer.epoch': Key 'epoch' not in 'TrainerCfg'. Did you mean: 'epochs'?"
    ]


def test_exception_existing_run_is_not_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(REPO / "recipes" / "vanilla.yaml", run, "trainer.max_steps=1") == 0
    before = (run / "checkpoints" / "last.pt").read_bytes()
    assert train(REPO / "recipes" / "vanilla.yaml", run, "trainer.max_steps=2") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run / "checkpoints" / "last.pt").read_bytes() == before


def test_exception_resume_missing_run(tmp_path, capsys):
    assert train_main(["--resume", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err


@pytest.fixture
def test_domains(scratch_registry):
    """Register fault-injecting domains for one test."""

    @mbn.register_domain("nan_after_test")
    class NanAfter(mbn.Domain):
        def __init__(self, after: int = 3) -> None:
            self.after = after

        def generate(self, images, labels, ctx):
            return (images * float("nan") if ctx.step >= self.after else images), labels

    @mbn.register_domain("sigint_at_test")
    class SigintAt(mbn.Domain):
        def __init__(self, at: int = 2) -> None:
            self.at = at

        def generate(self, images, labels, ctx):
            if ctx.step == self.at:
                os.kill(os.getpid(), signal.SIGINT)
            return images, labels


def test_exception_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys, test_domains):
    run = tmp_path / "run"
    code = train(
        REPO / "recipes" / "vanilla.yaml",
        run,
        "domains.bad.type=nan_after_test",
        "domains.bad.after=3",
        "domains.bad.bn=clean",
        "trainer.checkpoint_every_steps=1",
        "trainer.max_steps=8",
    )
    err = capsys.readouterr().err.strip()
    assert code == 1
    # the domain spoils step 4 (its ctx.step 3: steps done before it); logs and checkpoints count steps from 1
    assert "non-finite images in domain 'bad' at step 4 (its generate() returned NaN/inf); last good checkpoint " in err
    assert "(step 3) kept at" in err, err
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["state"]["step"] == 3
    assert all(torch.isfinite(v.float()).all() for v in ckpt["model"].values())


@pytest.fixture
def sigint_as_in_a_terminal() -> Iterator[None]:
    """Python's own SIGINT handler, whatever the caller's: under a background runner SIGINT arrives ignored, mbn
    rightly keeps it ignored, and the Ctrl-C this test sends would be dropped."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_feature_ctrl_c_saves_checkpoint_and_resumes(tmp_path, capsys, test_domains, sigint_as_in_a_terminal):
    run = tmp_path / "run"
    stop = ["domains.stop.type=sigint_at_test", "domains.stop.at=2", "domains.stop.bn=clean"]
    assert train(REPO / "recipes" / "vanilla.yaml", run, *stop, "trainer.max_steps=6") == 130
    assert "resume with: mbn-train --resume" in capsys.readouterr().err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"] == 3
    assert train_main(["--resume", str(run)]) == 0  # resumes at step 3: the domain's step 2 is behind it
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"] == 6


@pytest.mark.slow
def test_feature_entry_point_domain_trains_from_recipe(tmp_path):
    site = install_plugin(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "mbn.cli.train", str(REPO / "recipes" / "vanilla.yaml"), *TINY,
           "domains.inv.type=invert", "domains.inv.strength=0.5", f"trainer.out_dir={tmp_path / 'run'}",
           "trainer.max_steps=2"]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["sources"] == ["clean", "inv"]
    assert metrics["train"]["inv"]["loss"] is not None


def test_a_recipe_builds_on_a_shipped_one_by_name(tmp_path, monkeypatch):
    from mbn.config import RecipeError

    monkeypatch.chdir(tmp_path)  # a pip user's folder: no recipes/ beside it
    (tmp_path / "mine.yaml").write_text("base: advprop\noptim:\n  lr: 0.01\n")
    cfg = load_recipe(tmp_path / "mine.yaml")
    shipped = load_recipe(REPO / "recipes" / "advprop.yaml")
    assert cfg.optim.lr == 0.01 and list(cfg.domains) == list(shipped.domains) == ["clean", "adv"]
    (tmp_path / "mine2.yaml").write_text("base: advprop.yaml\n")
    assert list(load_recipe(tmp_path / "mine2.yaml").domains) == ["clean", "adv"]
    (tmp_path / "advprop.yaml").write_text("base: base.yaml\n")  # a file beside the recipe comes first
    for mine in ("mine.yaml", "mine2.yaml"):  # with or without .yaml
        with pytest.raises(RecipeError, match=r"advprop\.yaml: key .base.: base\.yaml is neither"):
            load_recipe(tmp_path / mine)
    own = tmp_path / "own"  # a local advprop.yaml may extend the shipped advprop
    own.mkdir()
    (own / "advprop.yaml").write_text("base: advprop\noptim:\n  lr: 0.02\n")
    cfg = load_recipe(own / "advprop.yaml")
    assert cfg.optim.lr == 0.02 and list(cfg.domains) == ["clean", "adv"]
    (tmp_path / "other.yaml").write_text("base: no_such_recipe\n")
    with pytest.raises(RecipeError, match="key 'base': no_such_recipe is neither a file beside it nor a shipped"):
        load_recipe(tmp_path / "other.yaml")
