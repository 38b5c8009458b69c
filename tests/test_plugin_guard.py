"""Domain plugins: they may read the model, not change it; load failures are one line; they draw reproducibly."""

from __future__ import annotations

import pytest
import torch

import mbn
from mbn.checkpoint import load_checkpoint
from tests.runs import VANILLA, one_line_error, train


def leaves_eval_mode(images, labels, ctx):
    ctx.model.eval()
    return images, labels


def leaves_a_module_in_eval_mode(images, labels, ctx):
    next(m for m in ctx.model.modules() if isinstance(m, torch.nn.Conv2d)).eval()
    return images, labels


def writes_a_parameter(images, labels, ctx):
    with torch.no_grad():
        next(ctx.model.parameters()).mul_(1.5)
    return images, labels


def updates_bn_statistics(images, labels, ctx):
    ctx.model(images)  # a train-mode forward: the running statistics of the active source move
    return images, labels


def writes_a_buffer(images, labels, ctx):
    next(b for b in ctx.model.buffers() if b.is_floating_point()).add_(1.0)
    return images, labels


CHANGES = {
    "eval_mode": (leaves_eval_mode, "left the model in eval mode after generate()"),
    "module_mode": (leaves_a_module_in_eval_mode, "left module 'net.conv1' in eval mode"),
    "parameter": (writes_a_parameter, "changed the model's parameter 'net.conv1.weight' in place"),
    "bn_forward": (updates_bn_statistics, "(BN statistics) during generate(); run its forwards in"),
    "buffer": (writes_a_buffer, "changed the model's buffer"),
}


@pytest.mark.parametrize("case", list(CHANGES))
def test_a_domain_that_changes_the_model_is_stopped_naming_it(case, tmp_path, capsys, scratch_registry):
    fn, expected = CHANGES[case]

    @mbn.register_domain("changes_model_test")
    class ChangesModel(mbn.Domain):
        def generate(self, images, labels, ctx):
            return fn(images, labels, ctx)

    run = tmp_path / "run"
    code = train(VANILLA, run, "trainer.max_steps=2", "domains.meddler.type=changes_model_test")
    assert code == 1
    err = one_line_error(capsys)
    assert "domain 'meddler'" in err and expected in err, err
    assert not (run / "checkpoints" / "last.pt").exists()


def test_a_domain_that_restores_what_it_changed_trains(tmp_path, scratch_registry):
    @mbn.register_domain("polite_test")
    class Polite(mbn.Domain):
        def generate(self, images, labels, ctx):
            with ctx.attack_mode("eval"):  # eval mode for its forwards, restored after
                ctx.model(images)
            with ctx.attack_mode("train"):  # batch statistics, running ones untouched
                ctx.model(images)
            return images.flip(3), labels

    assert train(VANILLA, tmp_path / "run", "trainer.max_steps=2", "domains.flip.type=polite_test") == 0


def test_a_domain_may_update_bn_statistics_when_it_asks(tmp_path, scratch_registry):
    @mbn.register_domain("stats_test")
    class Stats(mbn.Domain):
        def generate(self, images, labels, ctx):
            with ctx.attack_mode("train_update"):
                ctx.forward_heads(images, ("classes",))
            return images, labels

    run = tmp_path / "run"
    recipe = ["trainer.max_steps=2", "domains.stats.type=stats_test", "domains.stats.bn=side"]
    assert train(VANILLA, run, *recipe, "domains.stats.weight=0") == 0
    model = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    tracked = [v for k, v in model.items() if k.endswith("num_batches_tracked") and ".side." in k]
    assert tracked and all(int(v) == 4 for v in tracked)  # 2 steps: one attack forward and one training forward each


def test_a_domain_drawing_from_numpy_and_python_global_generators_is_reproducible_and_resumes(
    tmp_path, scratch_registry
):
    import random

    import numpy as np

    from mbn.cli.train import main as train_main
    from tests.runs import weights

    @mbn.register_domain("global_rng_test")
    class GlobalRng(mbn.Domain):  # as augmentation libraries do: numpy's and Python's global generators
        def generate(self, images, labels, ctx):
            noise = torch.from_numpy(np.random.rand(*images.shape).astype("float32")) * random.random() * 0.1
            return (images + noise).clamp(0, 1), labels

    recipe = ["domains.noisy.type=global_rng_test", "logging.image_every=0"]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert train(VANILLA, a, "trainer.max_steps=4", *recipe) == 0
    np.random.seed(123)  # whatever the process drew before does not matter
    random.seed(123)
    assert train(VANILLA, b, "trainer.max_steps=4", *recipe) == 0
    assert train(VANILLA, c, "trainer.max_steps=2", *recipe) == 0
    np.random.rand(7)
    assert train_main(["--resume", str(c), "trainer.max_steps=4"]) == 0
    for other in (b, c):
        for key, value in weights(a).items():
            assert torch.equal(value, weights(other)[key]), (other.name, key)


# ------------------------------------------------------------------------------ plugins that fail to load
BROKEN = """
import mbn

if __name__ == "mbn_broken_plugin.raising":
    raise RuntimeError("boom at import")


class RaisesInInit(mbn.Domain):
    def __init__(self) -> None:
        raise RuntimeError("boom in the constructor")

    def generate(self, images, labels, ctx):
        return images, labels


class RaisesInHeads(mbn.Domain):
    def heads(self):
        raise LookupError("boom in heads")

    def generate(self, images, labels, ctx):
        return images, labels


class InterruptsInInit(mbn.Domain):
    def __init__(self) -> None:
        raise KeyboardInterrupt

    def generate(self, images, labels, ctx):
        return images, labels
"""
BROKEN_ENTRY_POINTS = """[mbn.domains]
no_module = mbn_missing_module_xyz:Domain
raises_at_import = mbn_broken_plugin.raising:RaisesInInit
no_attribute = mbn_broken_plugin.domains:Missing
raises_in_init = mbn_broken_plugin.domains:RaisesInInit
raises_in_heads = mbn_broken_plugin.domains:RaisesInHeads
interrupts_in_init = mbn_broken_plugin.domains:InterruptsInInit
"""


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    package = site / "mbn_broken_plugin"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "domains.py").write_text(BROKEN)
    (package / "raising.py").write_text(BROKEN)
    info = site / "mbn_broken_plugin-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mbn-broken-plugin\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(BROKEN_ENTRY_POINTS)
    return site


def _train(site, out, *overrides):
    import os
    import subprocess
    import sys

    from tests.runs import TINY

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-m", "mbn.cli.train", str(VANILLA), *TINY, f"trainer.out_dir={out}", *overrides]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("plugin", "expected"),
    [
        ("no_module", "of domain type 'no_module' failed to load: ModuleNotFoundError: No module named"),
        ("raises_at_import", "failed to load: RuntimeError: boom at import"),
        ("no_attribute", "entry point mbn_broken_plugin.domains:Missing (mbn-broken-plugin) of domain type"),
        ("raises_in_init", "its constructor raised RuntimeError: boom in the constructor"),
        ("raises_in_heads", "its heads() raised LookupError: boom in heads"),
        ("interrupts_in_init", "its constructor raised KeyboardInterrupt"),
    ],
)
def test_a_plugin_failing_to_load_is_one_line_naming_the_domain_key(plugin, expected, broken_site, tmp_path):
    result = _train(broken_site, tmp_path / "run", "trainer.max_steps=1", f"domains.extra.type={plugin}")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("mbn-train: error: key 'domains.extra"), lines[0]
    assert expected in lines[0], lines[0]


def test_broken_plugins_the_recipe_does_not_use_do_not_stop_the_run(broken_site, tmp_path):
    result = _train(broken_site, tmp_path / "run", "trainer.max_steps=1")
    assert result.returncode == 0, result.stderr


def test_a_domain_raising_keyboard_interrupt_is_its_failure_not_a_signal(tmp_path, capsys, scratch_registry):
    @mbn.register_domain("interrupts_test")
    class Interrupts(mbn.Domain):
        def generate(self, images, labels, ctx):
            raise KeyboardInterrupt

    code = train(VANILLA, tmp_path / "run", "trainer.max_steps=2", "domains.odd.type=interrupts_test")
    assert code == 1  # not 130: no signal was sent
    err = one_line_error(capsys)
    assert "domain 'odd' (type 'interrupts_test') failed at step 1: KeyboardInterrupt" in err, err


def test_a_slow_domain_shows_at_the_first_step_and_long_windows_get_a_heartbeat(
    tmp_path, capsys, scratch_registry, monkeypatch
):
    import time

    import mbn.train.hooks

    @mbn.register_domain("slow_test")
    class Slow(mbn.Domain):
        def generate(self, images, labels, ctx):
            time.sleep(0.3)
            return images, labels

    monkeypatch.setattr(mbn.train.hooks, "HEARTBEAT_S", 0.2)
    run = tmp_path / "run"
    assert train(VANILLA, run, "trainer.max_steps=3", "trainer.log_every=100", "trainer.progress=plain",
                 "domains.slow.type=slow_test") == 0  # fmt: skip
    out = capsys.readouterr().out
    first = next(line for line in out.splitlines() if line.startswith("step 1: "))
    seconds = dict(part.rsplit(" ", 2)[:2] for part in first.split("generate: ")[1].split(";")[0].split(", "))
    assert float(seconds["slow"]) >= 0.3 and float(seconds["clean"]) < 0.3, first
    assert "epoch 0 step 2: still training (3 steps planned)" in out, out
    assert len(out.splitlines()) < 10  # a heartbeat per step here (0.2 s), not a flood


def test_a_train_mode_attack_through_sync_batchnorm_leaves_the_statistics_and_passes_the_guard(tmp_path, monkeypatch):
    """SyncBatchNorm's own forward writes its buffers; ``attack_bn: train`` must leave them (and the guard) alone."""
    import torch.distributed as dist
    from torch.nn.modules.batchnorm import _BatchNorm

    from mbn.convert import convert_sync_batchnorm
    from mbn.domain import DomainContext
    from mbn.domain_checks import ModelGuard
    from tests.nets import TinyNet

    # SyncBatchNorm refuses CPU input; BatchNorm's forward writes the running statistics just as it does
    monkeypatch.setattr(torch.nn.SyncBatchNorm, "forward", _BatchNorm.forward)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        net = convert_sync_batchnorm(mbn.convert_model(TinyNet(), ("clean", "adv"))).train()
        before = {k: v.clone() for k, v in net.state_dict().items()}

        class Attack(mbn.Domain):
            def generate(self, images, labels, ctx):
                with ctx.attack_mode("train"), mbn.use_source(ctx.model, "adv"):
                    ctx.model(images)
                return images.clone(), labels

        x, y = torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)
        ModelGuard(net).generate(Attack(), "adv", "pgd", x, y, DomainContext(model=net, bn="adv"), 1)
        for key, value in net.state_dict().items():
            assert torch.equal(value, before[key]), key
    finally:
        dist.destroy_process_group()


def test_keyboard_interrupt_under_pythons_own_handler_is_the_users(monkeypatch):
    """In a script (Python's default SIGINT handler in place) a Ctrl-C during generate stays a KeyboardInterrupt."""
    import signal

    from mbn.domain import DomainContext
    from mbn.domain_checks import ModelGuard
    from mbn.errors import DomainError
    from tests.nets import TinyNet

    class Interrupted(mbn.Domain):
        def generate(self, images, labels, ctx):
            raise KeyboardInterrupt

    net = mbn.convert_model(TinyNet(), ("clean",))
    x, y = torch.rand(2, 3, 8, 8), torch.zeros(2, dtype=torch.long)
    guard, ctx = ModelGuard(net), DomainContext(model=net, bn="clean")
    monkeypatch.setattr(signal, "getsignal", lambda sig: signal.default_int_handler)
    with pytest.raises(KeyboardInterrupt):
        guard.generate(Interrupted(), "odd", "x", x, y, ctx, 1)
    monkeypatch.setattr(signal, "getsignal", lambda sig: signal.SIG_IGN)  # mbn's own handling or ignored
    with pytest.raises(DomainError, match="KeyboardInterrupt"):
        guard.generate(Interrupted(), "odd", "x", x, y, ctx, 1)
