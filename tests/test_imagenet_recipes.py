"""The published ImageNet recipes (ResNet-50 and EfficientNet-B0, AdvProp and vanilla) load as documented and train.

Each trains a few steps of its own network, optimiser, schedule and domains on a tiny streamed tree with a ``val/``
split (data sizes, batch, steps and precision shrunk for a CPU); the full runs need GPUs (docs/recipes.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mbn.config import domain_specs, load_recipe
from mbn.optim import timm_optimizer_name
from mbn.train.checkpoints import load_checkpoint
from tests.runs import REPO
from tests.test_export import make_tree

RECIPES = REPO / "recipes"


@pytest.mark.parametrize(
    ("recipe", "optimiser", "schedule", "domains"),
    [
        ("imagenet_resnet50_vanilla", "momentum", "multistep", {"clean": ("clean", "clean")}),
        ("imagenet_resnet50_advprop", "momentum", "multistep", {"clean": ("clean", "clean"), "adv": ("pgd", "adv")}),
        ("imagenet_effnet_b0_vanilla", "rmsproptf", "step", {"clean": ("autoaugment", "clean")}),
        ("imagenet_effnet_b0_advprop", "rmsproptf", "step", {"clean": ("autoaugment", "clean"), "adv": ("pgd", "adv")}),
    ],
)
def test_the_published_setups_are_what_the_recipes_say(recipe, optimiser, schedule, domains):
    cfg = load_recipe(RECIPES / f"{recipe}.yaml")
    assert (timm_optimizer_name(cfg.optim), cfg.schedule.name) == (optimiser, schedule)
    assert {s.name: (s.type, s.bn) for s in domain_specs(cfg)} == domains
    assert (cfg.data.test_split, cfg.data.augment, cfg.data.image_size) == ("val", "imagenet", 224)
    if "resnet50" in recipe:  # the port: 105 epochs, x0.1 at epochs 30, 60, 90, 100, SGD 0.1 (momentum, no Nesterov)
        assert cfg.trainer.epochs == 105 and cfg.optim.lr == 0.1 and cfg.optim.weight_decay == 1e-4
        assert cfg.optim.decay_norm_and_bias  # the port's SGD decays every parameter
        assert [round(m * 105, 6) for m in cfg.schedule.milestones] == [30, 60, 90, 100]
    else:  # EfficientNet: RMSpropTF eps 1e-3, x0.97 every 2.4 epochs, EMA 0.9999, drop-connect 0.2, 350 epochs
        assert cfg.optim.kwargs.eps == 0.001 and cfg.schedule.decay_epochs == 2.4 and cfg.schedule.gamma == 0.97
        assert not cfg.schedule.warmup_prefix  # TF's exponential_decay(global_step) counts from step 0
        assert cfg.ema.decay == 0.9999 and cfg.model.kwargs.drop_path_rate == 0.2 and cfg.trainer.epochs == 350
    pgd = [s for s in domain_specs(cfg) if s.type == "pgd"]
    if pgd:  # PGD1, eps 1 (0-255 units), step 1; B0 attacks the AutoAugment images
        assert (pgd[0].params["eps"], pgd[0].params["steps"], pgd[0].params["step_size"]) == (1, 1, 1)
        assert pgd[0].input == ("clean" if "effnet" in recipe else None)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tree(tmp_path_factory.mktemp("imagenet"), {"train": 6, "val": 3})


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe",
    [
        "imagenet_resnet50_vanilla",
        "imagenet_resnet50_advprop",
        "imagenet_effnet_b0_vanilla",
        "imagenet_effnet_b0_advprop",
    ],
)
def test_each_recipe_trains_a_few_steps_on_a_tiny_streamed_tree(recipe, tree, tmp_path):
    from mbn.cli.train import main as train_main

    run = tmp_path / "run"
    code = train_main([
        str(RECIPES / f"{recipe}.yaml"), f"data.root={tree}", "data.image_size=64", "data.batch_size=4",
        "data.eval_batch_size=9", "data.num_workers=0", "trainer.amp=none", "trainer.max_steps=2",
        "trainer.progress=none", "trainer.eval_every=1", "logging.image_every=0", "logging.divergence_every=0",
        f"trainer.out_dir={run}",
    ])  # fmt: skip
    assert code == 0
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["state"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["test_acc"]["clean"] <= 1
