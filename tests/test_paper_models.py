"""The paper's models and weights: timm tags, the weights' own normalisation, offline failures, BN-free networks."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

import mbn.train.build
from mbn.checkpoint import load_checkpoint
from mbn.cli.train import main as train_main
from mbn.config import ModelCfg
from mbn.models import ModelConfigError, check_model_config, weights_normalisation
from tests.runs import TINY

REPO = Path(__file__).resolve().parents[1]
ADVPROP_B0 = "timm.tf_efficientnet_b0.ap_in1k"  # the paper's released AdvProp weights, as timm tags them


@pytest.mark.parametrize("name", [ADVPROP_B0, "timm.tf_efficientnet_b0", "timm.resnet50.a1_in1k"])
def test_timm_names_with_and_without_tags_are_accepted(name):
    check_model_config(ModelCfg(name=name))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("timm.tf_efficientnet_b0.no_such_tag", "has no weights tagged 'no_such_tag'; tags: ["),
        ("timm.not_a_network.ap_in1k", "unknown timm model 'timm.not_a_network'"),
    ],
)
def test_bad_timm_names_are_named(name, message):
    with pytest.raises(ModelConfigError, match=message.replace("[", r"\[")):
        check_model_config(ModelCfg(name=name))


def test_weights_normalisation_comes_from_the_weights_metadata():
    assert weights_normalisation(ModelCfg(name=ADVPROP_B0, pretrained=True)) == ((0.5,) * 3, (0.5,) * 3)
    mean, std = weights_normalisation(ModelCfg(name="torchvision.resnet18", pretrained=True))
    torch.testing.assert_close(torch.tensor(mean), torch.tensor([0.485, 0.456, 0.406]))
    torch.testing.assert_close(torch.tensor(std), torch.tensor([0.229, 0.224, 0.225]))
    assert weights_normalisation(ModelCfg(name=ADVPROP_B0, pretrained=False)) is None


def run(tmp_path: Path, *extra: str) -> int:
    recipe = REPO / "recipes" / "advprop.yaml"
    return train_main([str(recipe), *TINY, f"trainer.out_dir={tmp_path / 'run'}", "trainer.max_steps=2", *extra])


@pytest.mark.slow
def test_advprop_efficientnet_trains_with_two_bns(tmp_path):
    assert run(tmp_path, f"model.name={ADVPROP_B0}") == 0
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert any(".bns.adv." in key for key in ckpt["model"])
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 2


def test_pretrained_normalisation_is_used_and_stored(tmp_path, monkeypatch):
    """Pretrained weights' statistics replace the data set's (no download: the weights themselves are faked)."""
    monkeypatch.setattr(mbn.train.build, "weights_normalisation", lambda cfg: ((0.5,) * 3, (0.5,) * 3))
    assert run(tmp_path) == 0
    data = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["data"]
    assert data["mean"] == [0.5] * 3 and data["std"] == [0.5] * 3


def test_recipe_normalisation_overrides_the_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(mbn.train.build, "weights_normalisation", lambda cfg: ((0.5,) * 3, (0.5,) * 3))
    assert run(tmp_path, "data.mean=[0.4,0.4,0.4]", "data.std=[0.2,0.2,0.2]") == 0
    data = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["data"]
    assert data["mean"] == [0.4] * 3 and data["std"] == [0.2] * 3


def test_offline_missing_weights_fail_fast_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    tic = time.monotonic()
    assert run(tmp_path, f"model.name={ADVPROP_B0}", "model.pretrained=true") == 2
    assert time.monotonic() - tic < 60  # no minute of retries
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "key 'model.pretrained'" in err and f"'{ADVPROP_B0}'" in err and "cannot be reached" in err


@pytest.mark.parametrize("name", ["timm.convnext_atto", "torchvision.vit_b_16"])
def test_a_network_without_batchnorm_is_refused_in_one_line(tmp_path, capsys, name):
    assert run(tmp_path, f"model.name={name}") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"key 'model.name': {name}:" in err and "has no BatchNorm layer" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["data.mean=[0.5,0.5,0.5]"], "keys 'data.mean' and 'data.std': set both"),
        (["domains.adv.bn=keys"], "key 'domains': BN sources ['clean', 'keys']: invalid source name 'keys'"),
    ],
)
def test_normalisation_and_source_errors_name_their_keys(tmp_path, capsys, extra, message):
    assert run(tmp_path, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
