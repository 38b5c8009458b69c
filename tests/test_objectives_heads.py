"""The open training step: domain objectives (heads, soft targets), auxiliary heads, the rotation domain,
rotation-driven attacks, ``model.init_from`` and the validation pass before any data is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

import mbn
from mbn.checkpoint import load_checkpoint
from mbn.cli.train import main as train_main
from mbn.config import load_recipe
from mbn.domain import DomainContext
from mbn.objective import Objective
from mbn.train import build_trainer
from tests.nets import TinyNet
from tests.test_train import TINY

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"


def train(recipe: str, out: Path, *extra: str) -> int:
    return train_main([str(RECIPES / recipe), *TINY, f"trainer.out_dir={out}", *extra])


# ----------------------------------------------------------------------------------------------- objective


def test_objective_soft_targets_equal_hard_ones_when_one_hot():
    logits = torch.randn(8, 5)
    labels = torch.randint(0, 5, (8,))
    one_hot = torch.nn.functional.one_hot(labels, 5).float()
    obj = Objective(label_smoothing=0.1)
    torch.testing.assert_close(obj.loss(logits, one_hot), obj.loss(logits, labels))
    torch.testing.assert_close(obj.correct(logits, one_hot), obj.correct(logits, labels))


# ------------------------------------------------------------------------------------------------- heads


@pytest.mark.slow
def test_export_drops_heads_and_loads_into_fresh_torchvision_model():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    mbn.attach_heads(net, {"rotation": 4})
    mbn.convert_model(net, ("clean", "adv"))
    assert any(k.startswith("aux_heads.rotation.") for k in net.state_dict())
    with mbn.split_sources(net, {"clean": 4, "adv": 4}):  # give both sources statistics
        mbn.forward_heads(net, torch.rand(8, 3, 32, 32), ["classes", "rotation"])["rotation"].sum().backward()
    plain = mbn.export_model(net, "clean").eval()
    fresh = torchvision.models.resnet18(num_classes=10)
    assert set(plain.state_dict()) == set(fresh.state_dict())
    fresh.load_state_dict(plain.state_dict())
    x = torch.rand(4, 3, 32, 32)
    with mbn.use_source(net, "clean"), mbn.eval_mode(net):
        expected = net(x)
    torch.testing.assert_close(fresh.eval()(x), expected, rtol=0, atol=0)
    assert mbn.forward_heads(plain, x, ["classes"])["classes"].shape == (4, 10)  # no hook left behind


def test_heads_read_penultimate_features_in_one_forward():
    net = mbn.attach_heads(TinyNet(), {"rotation": 4, "jigsaw": 7})
    x = torch.rand(3, 3, 16, 16)
    out = mbn.forward_heads(net, x, ["classes", "rotation", "jigsaw"])
    features = net.body[:-1]((x - net.mean) / net.std)  # everything before the classifier
    torch.testing.assert_close(out["rotation"], net.aux_heads.rotation(features))
    torch.testing.assert_close(out["classes"], net(x))
    assert out["jigsaw"].shape == (3, 7)
    with pytest.raises(KeyError, match="unknown head"):
        mbn.forward_heads(net, x, ["colour"])


# --------------------------------------------------------------------------------------------- rotation


def test_rotation_targets_match_the_rotation_applied():
    images = torch.rand(32, 3, 8, 8)
    ctx = DomainContext(model=TinyNet(), bn="rot", generator=torch.Generator().manual_seed(0))
    rotated, k = mbn.create_domain("rotation").generate(images, torch.zeros(32, dtype=torch.long), ctx)
    assert k.dtype == torch.int64 and set(k.tolist()) == {0, 1, 2, 3}
    for i in range(32):
        back = torch.rot90(rotated[i], -int(k[i]), dims=(1, 2))
        assert torch.equal(back, images[i])
    assert not torch.equal(rotated, images)


def _attack(model: torch.nn.Module, batch, **params) -> torch.Tensor:
    images, labels = batch
    ctx = DomainContext(model=model, bn="adv", generator=torch.Generator().manual_seed(3), num_classes=10)
    return mbn.create_domain("pgd", eps=8, steps=3, step_size=2, **params).generate(images, labels, ctx)[0]


@pytest.fixture
def rotation_setup():
    torch.manual_seed(0)
    model = mbn.convert_model(mbn.attach_heads(TinyNet(), {"rotation": 4}), ("clean", "adv"))
    return model, (torch.rand(16, 3, 16, 16), torch.randint(0, 10, (16,)))


def test_rotation_weight_zero_is_the_plain_attack_bit_for_bit(rotation_setup):
    model, batch = rotation_setup
    plain = _attack(model, batch)
    assert torch.equal(_attack(model, batch, rotation_weight=0.0), plain)
    assert mbn.create_domain("pgd", rotation_weight=0.0).heads() == {}
    assert mbn.create_domain("pgd", rotation_weight=0.5).heads() == {"rotation": 4}


def test_rotation_weight_changes_the_perturbation(rotation_setup):
    model, batch = rotation_setup
    plain, rotated = _attack(model, batch), _attack(model, batch, rotation_weight=2.0)
    assert not torch.equal(plain, rotated)
    assert (rotated - batch[0]).abs().max() <= 8 / 255 and rotated.min() >= 0 and rotated.max() <= 1


# ----------------------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_domain_with_own_head_trains_and_logs_its_loss(tmp_path):
    from tests.runs import tensorboard_scalars

    run = tmp_path / "run"
    assert train("advprop_ssl.yaml", run, "trainer.max_steps=4") == 0
    scalars = tensorboard_scalars(run / "tb")
    assert {"loss/rot", "acc/rot", "loss/clean", "loss/adv"} <= set(scalars)
    assert len(scalars["loss/rot"]) == 4
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["sources"] == ["clean", "adv", "rot"] and ckpt["heads"] == {"rotation": 4}
    cfg = load_recipe(RECIPES / "advprop_ssl.yaml", TINY)
    torch.manual_seed(0)
    with build_trainer(cfg, tmp_path / "unused") as trainer:
        fresh = trainer.model.state_dict()
    trained = ckpt["model"]
    assert not torch.equal(trained["aux_heads.rotation.weight"], fresh["aux_heads.rotation.weight"])
    assert "rotation" in json.loads((run / "metrics.json").read_text())["heads"]
    assert "aux_heads.rotation.weight" in {  # the optimiser covers the head
        k for k in trained if k.startswith("aux_heads")
    }


@pytest.fixture
def soft_domains(scratch_registry):

    @mbn.register_domain("one_hot_test")
    class OneHot(mbn.Domain):
        def generate(self, images, labels, ctx):
            return images, torch.nn.functional.one_hot(labels, ctx.num_classes).float()

    @mbn.register_domain("mix_test")
    class Mix(mbn.Domain):
        def generate(self, images, labels, ctx):
            target = torch.nn.functional.one_hot(labels, ctx.num_classes).float()
            return 0.5 * (images + images.flip(0)), 0.5 * (target + target.flip(0))


@pytest.mark.slow
def test_soft_targets_train_like_hard_ones(tmp_path, soft_domains):
    hard = ["trainer.max_steps=3", "logging.tensorboard=false"]
    assert train("vanilla.yaml", tmp_path / "hard", *hard) == 0
    assert train("vanilla.yaml", tmp_path / "soft", *hard, "domains.clean.type=one_hot_test") == 0
    a, b = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt")["model"] for r in ("hard", "soft"))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert train("vanilla.yaml", tmp_path / "mix", *hard, "domains.mix.type=mix_test", "domains.mix.bn=clean") == 0
    metrics = json.loads((tmp_path / "mix" / "metrics.json").read_text())
    assert 0.0 <= metrics["train"]["mix"]["acc"] <= 1.0 and metrics["train"]["mix"]["loss"] > 0


def test_attack_maximises_the_trained_objective_with_label_smoothing(tmp_path):
    cfg = load_recipe(RECIPES / "advprop.yaml", [*TINY, "optim.label_smoothing=0.2"])
    with build_trainer(cfg, tmp_path / "run") as trainer:
        spec = next(s for s in trainer.step.specs if s.name == "adv")
        ctx = trainer.step.context(spec, trainer.step.position(0, 0), torch.Generator(), trainer.update.begin())
        assert ctx.objective == Objective(label_smoothing=0.2)
        assert trainer.step.objectives["clean"].label_smoothing == 0.2


@pytest.mark.slow
def test_init_from_loads_the_backbone_exactly(tmp_path, capsys):
    assert train("ssl_pretrain.yaml", tmp_path / "pre", "trainer.max_steps=3") == 0
    pre = load_checkpoint(tmp_path / "pre" / "checkpoints" / "last.pt")["model"]
    init = [f"model.init_from={tmp_path / 'pre'}", "trainer.progress=plain"]
    cfg = load_recipe(RECIPES / "advprop.yaml", [*TINY, *init])
    with build_trainer(cfg, tmp_path / "run") as trainer:
        model = trainer.model.state_dict()
    assert "loaded" in capsys.readouterr().out
    for key, value in model.items():
        if ".bns.adv." in key:  # a source the pre-training did not have starts from its main source
            torch.testing.assert_close(value, pre[key.replace(".bns.adv.", ".bns.clean.")], rtol=0, atol=0)
        elif key in pre:
            torch.testing.assert_close(value, pre[key], rtol=0, atol=0)
    assert not any(k.startswith("aux_heads") for k in model)  # advprop has no rotation head


def test_init_from_reports_heads_left_fresh(tmp_path, capsys):
    assert train("vanilla.yaml", tmp_path / "pre", "trainer.max_steps=1") == 0
    assert train("ssl_pretrain.yaml", tmp_path / "run", "trainer.max_steps=1", f"model.init_from={tmp_path / 'pre'}",
                 "trainer.progress=plain") == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "left fresh: aux_heads.rotation.weight (not in checkpoint)" in out
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["init_from"]["fresh"] == [
        "aux_heads.rotation.bias",
        "aux_heads.rotation.weight",
    ]


# ------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("recipe", "args", "expected"),
    [
        ("advprop.yaml", ["domains.adv.type=nope"], "key 'domains.adv.type': unknown domain type 'nope'"),
        ("vanilla.yaml", ["domains.clean.start=0.5"],
         "key 'domains': no domain is active for training fractions [0, 0.5)"),
        ("adv_finetune.yaml", ["domains.clean.start=0.9"], "no domain is active for training fractions [0.8, 0.9)"),
        ("advprop.yaml", ["domains.adv.weight=-1"], "key 'domains.adv.weight': expected a number >= 0"),
        ("advprop.yaml", ["model.name=cifar_resnet9"], "key 'model.name': unknown model 'cifar_resnet9'"),
        ("advprop.yaml", ["model.init_from=/nonexistent/run"], "key 'model.init_from'"),
        ("vanilla.yaml", ["trainer.log_every=0"], "key 'trainer.log_every': expected a number > 0"),
        ("vanilla.yaml", ["optim.momentum=-1"], "key 'optim.momentum'"),
        ("vanilla.yaml", ["optim.betas=[0.9]"], "key 'optim.betas'"),
        ("vanilla.yaml", ["data.name=cifar10", "data.root=/nonexistent"], "key 'data.root': cifar10 not found"),
    ],
)  # fmt: skip
def test_validation_errors_come_before_any_data_is_read(recipe, args, expected, tmp_path, capsys, monkeypatch):
    import mbn.train.build

    def no_data(*a, **k):
        raise AssertionError("data was read before the recipe was validated")

    monkeypatch.setattr(mbn.train.build, "build_data", no_data)
    # a missing data set must not hide the recipe error (except where the data path is the error)
    data = [] if any(a.startswith("data.") for a in args) else ["data.name=imagefolder", "data.root=/nonexistent"]
    code = train_main([str(RECIPES / recipe), *TINY, *data, f"trainer.out_dir={tmp_path / 'run'}", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and expected in err, err


def test_conflicting_head_sizes_are_a_recipe_error(tmp_path, capsys, scratch_registry):

    @mbn.register_domain("rot8_test")
    class Rot8(mbn.Domain):
        def heads(self):
            return {"rotation": 8}

        def generate(self, images, labels, ctx):
            return images, labels

    code = train("advprop_ssl.yaml", tmp_path / "run", "domains.r8.type=rot8_test")
    err = capsys.readouterr().err
    assert code == 2 and "key 'domains.r8': head 'rotation' with 8 outputs, but domain 'rot' asks for 4" in err
