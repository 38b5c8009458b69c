"""Throughput accounting (``mbn.meter.TrainClock``): only windows that trained images are timed."""

from __future__ import annotations

import json
import time

import pytest
import torch

from mbn.checkpoint import load_checkpoint
from mbn.cli.train import main as train_main
from mbn.meter import TrainClock
from tests.runs import REPO, train


def test_a_window_without_steps_is_not_timed():
    clock = TrainClock(torch.device("cpu"))
    for _ in range(2):  # warm-up window, then a timed one
        clock.start()
        clock.count({"clean": 8, "adv": 8})
        time.sleep(0.01)
        clock.stop()
    clock.start()  # reopened after an evaluation, closed for a checkpoint with no step between
    time.sleep(0.2)
    clock.stop()
    state = clock.state_dict()
    assert state["timed_images"] == {"clean": 8, "adv": 8} and state["images"] == {"clean": 16, "adv": 16}
    assert state["timed_time"] < 0.15 < state["train_time"]  # the empty window's time is training time only
    rates = clock.throughput()
    assert rates["throughput/images_per_s"] == sum(state["timed_images"].values()) / state["timed_time"] > 0
    assert rates["throughput/clean"] == rates["throughput/adv"] > 0


def test_a_checkpoint_holding_only_empty_windows_falls_back_to_the_warm_up():
    clock = TrainClock(torch.device("cpu"))
    clock.load_state_dict({"train_time": 1.0, "images": {"clean": 64}, "timed_time": 0.007, "timed_images": {}})
    clock.start()
    clock.count({"clean": 16})
    clock.stop()
    assert clock.throughput()["throughput/images_per_s"] > 0


@pytest.mark.slow
def test_metrics_report_a_throughput_in_a_fresh_and_a_resumed_run(tmp_path):
    run = tmp_path / "run"
    recipe = REPO / "recipes" / "advprop.yaml"
    for args in ([], ["--resume", str(run), "trainer.max_steps=6", "trainer.log_every=100"]):
        if args:
            assert train_main(args) == 0
        else:
            assert train(recipe, run, "trainer.max_steps=4", "trainer.log_every=100") == 0
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["images_per_s"] > 0, metrics
        assert set(metrics["images_per_s_by_domain"]) == {"clean", "adv"}
        assert all(v > 0 for v in metrics["images_per_s_by_domain"].values())
    clock = load_checkpoint(run / "checkpoints" / "last.pt")["clock"]
    assert bool(clock["timed_images"]) == (clock["timed_time"] > 0)  # no time without images carried on
