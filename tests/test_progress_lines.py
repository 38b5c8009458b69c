"""Plain progress lines fit a 100-column terminal and still say what a reader looks for: each domain's loss."""

from __future__ import annotations

import pytest

from mbn.progress import LINE_WIDTH, accuracy_line, fit_line, step_line
from tests.runs import REPO, train


def test_a_step_line_names_each_domain_loss_the_rate_and_the_speed():
    line = step_line(0, 40, {"clean": 2.0412, "autoaug": 2.1, "adv": 2.2991}, 0.1, 812.3)
    assert line == "epoch 0 step 40: loss clean 2.041 autoaug 2.1 adv 2.299 | lr 0.1 | 812 img/s"


def test_a_test_line_lists_every_bn_and_the_ema():
    line = accuracy_line(390, {"clean": 0.4312, "adv": 0.3921}, {"clean": 0.4401, "adv": 0.4012})
    assert line == "step 390: test acc clean 0.4312 adv 0.3921, EMA clean 0.4401 adv 0.4012"
    assert accuracy_line(390, {"clean": 0.5}, {}) == "step 390: test acc clean 0.5"


@pytest.mark.parametrize("count", [1, 3, 5, 8, 30])
def test_long_domain_names_are_shortened_distinctly_to_fit(count):
    losses = {f"autoaugment_variant_{i}": 2.302585 + i for i in range(count)}
    line = step_line(12, 40000, losses, 0.00125, 8123.3)
    assert len(line) <= LINE_WIDTH, line
    assert line.startswith("epoch 12 step 40000: loss ")
    if count <= 5:  # what fits keeps every domain, each told apart from the others
        shown = line.split(": loss ", 1)[1].split(" | ")[0].split()
        names = shown[0::2]
        assert len(names) == count and len(set(names)) == count, line
        assert [float(v) for v in shown[1::2]] == pytest.approx([2.303 + i for i in range(count)], abs=5e-4)
    else:
        assert len(line) == LINE_WIDTH or "…" not in line


def test_names_that_fit_are_never_shortened():
    assert fit_line("h", [("", {"adversarial": 1.0, "clean": 2.0})], ["x"]) == "h adversarial 1 clean 2 | x"


def test_the_names_of_a_long_line_are_cut_at_the_end_when_that_keeps_them_apart():
    losses = {f"{name}_domain_with_a_long_name": 1.0 for name in ("alpha", "beta", "gamma", "delta", "omega")}
    line = step_line(0, 1, losses, 0.1, 10.0)
    assert len(line) <= LINE_WIDTH
    shown = line.split(": loss ", 1)[1].split(" | ")[0].split()[0::2]
    assert all(full.startswith(cut) for cut, full in zip(shown, losses, strict=True)), line


@pytest.mark.slow
def test_every_plain_line_of_a_three_bn_run_fits_100_columns(tmp_path, capsys):
    run = tmp_path / "run"
    recipe = REPO / "recipes" / "advprop_autoaug.yaml"
    assert train(recipe, run, "trainer.max_steps=4", "trainer.progress=plain", "ema.decay=0.9") == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    steps = [line for line in lines if " loss " in line]
    assert len(steps) == 4 and all("clean" in s and "autoaug" in s and "adv" in s for s in steps)
    assert any(": test acc clean" in line and "EMA clean" in line for line in lines)
    progress = [line for line in lines if not line.startswith("mbn-train:")]  # those name paths, however long
    assert len(progress) >= 6 and max(len(line) for line in progress) <= LINE_WIDTH, max(progress, key=len)
