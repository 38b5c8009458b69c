"""Top-5 accuracy (training logs, ``mbn-eval``), ``trainer.keep_best_k`` and ``mbn-avg-checkpoints``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import mbn
from mbn.averaging import AverageError, average_states
from mbn.checkpoint import load_checkpoint
from mbn.cli.avg_checkpoints import main as avg_main
from mbn.cli.eval import main as eval_main
from mbn.cli.train import main as train_main
from mbn.eval.accuracy import TopK, topk_accuracy, topk_hits
from mbn.eval.report import render_markdown
from mbn.train.checkpoints import KEPT_DIR, KeptCheckpoints, kept_name, read_ledger
from tests.runs import TINY, VANILLA, one_line_error, tensorboard_scalars

FAST = [*TINY, "logging.image_every=0", "logging.divergence_every=0"]


# ------------------------------------------------------------------------------------------------- top-5
def test_top5_counts_a_label_ranked_third_that_top1_misses():
    logits = torch.tensor(
        [
            [0.0, 9.0, 8.0, 7.0, 1.0, 2.0, 3.0, 0.5],  # label 3: third highest -> top-1 wrong, top-5 right
            [9.0, 8.0, 7.0, 6.0, 5.0, 0.0, 4.0, 3.0],  # label 5: the lowest -> both wrong
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],  # label 7: the highest -> both right
            [5.0, 6.0, 7.0, 8.0, 9.0, 0.0, 1.0, 2.0],  # label 0: fifth highest -> top-5 right
            [5.0, 6.0, 7.0, 8.0, 9.0, 0.0, 1.0, 2.0],  # label 7: sixth highest -> top-5 wrong
        ]
    )
    labels = torch.tensor([3, 5, 7, 0, 7])
    assert topk_hits(logits, labels) == (1, 3)

    class Fixed(nn.Module):  # a converted model whose BN (fresh statistics, eval mode) keeps the logits' order
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(x)

    model = mbn.convert_model(Fixed(), sources=("clean",))
    batches = [(logits[:2], labels[:2]), (logits[2:], labels[2:])]
    assert topk_accuracy(model, batches, "clean", lambda b: b) == TopK(top1=1 / 5, top5=3 / 5)


def test_top5_is_none_with_five_classes_or_fewer():
    logits = torch.randn(4, 5)
    assert topk_hits(logits, torch.tensor([0, 1, 2, 3]))[1] is None
    assert topk_hits(torch.randn(4, 6), torch.tensor([0, 1, 2, 3]))[1] is not None


def test_eval_report_shows_top5_beside_top1():
    text = render_markdown(
        {"sources": ["clean", "adv"], "clean_acc": 0.5, "clean_acc5": 0.9, "per_bn_acc": {"clean": 0.5, "adv": 0.4},
         "per_bn_acc5": {"clean": 0.9, "adv": 0.8}}
    )  # fmt: skip
    assert "| BN | accuracy | top-5 |" in text and "| clean (main) | 50.00 | 90.00 |" in text
    five_classes = render_markdown({"sources": ["clean"], "clean_acc": 0.5, "clean_acc5": None})
    assert "| BN | accuracy |" in five_classes and "top-5" not in five_classes


# ------------------------------------------------------------------------------------ keep the k best
def _ckpt(value: float) -> dict:
    return {"model": {"w": torch.full((2,), value)}, "config": {}, "sources": ["clean"]}


def test_kept_checkpoints_keep_exactly_the_best_k_and_resume_without_duplicates(tmp_path):
    kept = KeptCheckpoints(tmp_path / KEPT_DIR, k=2)
    metrics = {4: 0.30, 8: 0.50, 12: 0.40, 16: 0.40, 20: 0.45}
    for step, value in metrics.items():
        kept.offer(step, value, "acc_test/clean", _ckpt(value))
    # 16 ties 12 and comes later: it does not displace it; 20 (0.45) displaces 12 (0.40)
    assert [(e.step, e.metric) for e in kept.entries] == [(8, 0.50), (20, 0.45)]
    files = sorted(p.name for p in (tmp_path / KEPT_DIR).glob("step-*.pt"))
    assert files == [kept_name(8), kept_name(20)]
    assert load_checkpoint(tmp_path / KEPT_DIR / kept_name(20))["model"]["w"][0] == pytest.approx(0.45)
    metric, entries = read_ledger(tmp_path / KEPT_DIR)
    assert metric == "acc_test/clean" and entries == kept.entries

    # a run resumed at step 16: the entry of step 20 is dropped (step 20 is trained again), its file removed
    again = KeptCheckpoints(tmp_path / KEPT_DIR, k=2)
    again.resume(16)
    assert [e.step for e in again.entries] == [8]
    assert sorted(p.name for p in (tmp_path / KEPT_DIR).glob("step-*.pt")) == [kept_name(8)]
    for step in (20, 20, 24):  # step 20 offered twice (a second save at the same step): one entry
        again.offer(step, 0.45 if step == 20 else 0.60, "acc_test/clean", _ckpt(0.0))
    assert [(e.step, e.metric) for e in again.entries] == [(24, 0.60), (8, 0.50)]
    assert [e.step for e in read_ledger(tmp_path / KEPT_DIR)[1]] == [24, 8]
    assert sorted(p.name for p in (tmp_path / KEPT_DIR).glob("step-*.pt")) == [kept_name(8), kept_name(24)]


def test_a_resume_with_a_lower_k_trims_the_ranking(tmp_path):
    kept = KeptCheckpoints(tmp_path / KEPT_DIR, k=3)
    for step, value in ((1, 0.1), (2, 0.3), (3, 0.2)):
        kept.offer(step, value, "acc_test/clean", _ckpt(value))
    (tmp_path / KEPT_DIR / kept_name(99)).write_bytes(b"orphan")  # a kill between the ledger and a deletion
    lower = KeptCheckpoints(tmp_path / KEPT_DIR, k=1)
    lower.resume(3)
    assert [e.step for e in lower.entries] == [2]
    assert [p.name for p in (tmp_path / KEPT_DIR).glob("step-*.pt")] == [kept_name(2)]


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    with (run / "scalars.csv").open() as f:
        for row in csv.DictReader(f):
            out.setdefault(row["tag"], []).append((int(row["step"]), float(row["value"])))
    return out


@pytest.fixture(scope="module")
def kept_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run with EMA and keep_best_k=2: evaluated at steps 4 and 8, then resumed to 16 (12 and 16)."""
    run = tmp_path_factory.mktemp("kept") / "run"
    common = ["ema.decay=0.5", "ema.warmup=false", "trainer.keep_best_k=2", "trainer.epochs=4"]
    assert train_main([str(VANILLA), *FAST, *common, "trainer.max_steps=8", f"trainer.out_dir={run}"]) == 0
    assert [e.step for e in read_ledger(run / KEPT_DIR)[1]] in ([4, 8], [8, 4])
    assert train_main(["--resume", str(run), "trainer.max_steps=null"]) == 0
    return run


def test_training_logs_top5_per_bn_and_for_the_ema(kept_run):
    scalars = _scalars(kept_run)
    for tag in ("acc5_test/clean", "acc5_test_ema/clean"):
        assert [step for step, _ in scalars[tag]] == [4, 8, 12, 16], tag
        assert all(0.0 <= v <= 1.0 for _, v in scalars[tag])
    for (_, top1), (_, top5) in zip(scalars["acc_test/clean"], scalars["acc5_test/clean"], strict=True):
        assert top5 >= top1
    board = tensorboard_scalars(kept_run / "tb")  # TensorBoard: test_acc5/per_bn(_ema) in the tb/bn=clean sub-run
    for tag in ("acc5_test/clean", "acc5_test_ema/clean"):
        assert [step for step, _ in board[tag]] == [4, 8, 12, 16]
        assert [v for _, v in board[tag]] == pytest.approx([v for _, v in scalars[tag]])
    assert (kept_run / "tb" / "bn=clean").is_dir()


def test_keep_best_k_keeps_the_two_best_ema_accuracies_across_the_resume(kept_run):
    evaluated = _scalars(kept_run)["acc_test_ema/clean"]  # the EMA's main-BN accuracy ranks (ema.decay > 0)
    best = sorted(evaluated, key=lambda sv: (-sv[1], sv[0]))[:2]
    metric, entries = read_ledger(kept_run / KEPT_DIR)
    assert metric == "acc_test_ema/clean"
    assert [(e.step, e.metric) for e in entries] == best
    assert sorted(p.name for p in (kept_run / KEPT_DIR).glob("step-*.pt")) == sorted(kept_name(s) for s, _ in best)
    for entry in entries:  # each kept file holds the weights of its step
        assert load_checkpoint(kept_run / KEPT_DIR / entry.file)["state"]["step"] == entry.step


def test_averaging_gives_the_mean_of_the_kept_weights_and_evaluates(kept_run, tmp_path, capsys):
    out = tmp_path / "avg" / "averaged.pt"
    assert avg_main([str(kept_run), "-o", str(out)]) == 0
    assert "averaged over 2 checkpoints" in capsys.readouterr().out
    averaged = load_checkpoint(out)
    kept = [load_checkpoint(kept_run / KEPT_DIR / e.file) for e in read_ledger(kept_run / KEPT_DIR)[1]]
    newest = max(kept, key=lambda c: c["state"]["step"])
    for entry in ("model", "ema"):
        for key, value in averaged[entry].items():
            if value.is_floating_point():
                mean = sum(c[entry][key].double() for c in kept) / len(kept)
                torch.testing.assert_close(value, mean.to(value.dtype))
            else:  # num_batches_tracked: the newest checkpoint's
                assert torch.equal(value, newest[entry][key])
    assert "optimizer" not in averaged and averaged["averaged"]["steps"] == [e["state"]["step"] for e in kept]

    report = tmp_path / "report"
    assert eval_main([str(out), "--out", str(report)]) == 0
    result = json.loads((report / "eval.json").read_text())
    assert 0.0 <= result["clean_acc"] <= result["clean_acc5"] <= 1.0  # synthetic data: 10 classes
    assert result["per_bn_acc5"]["clean"] == result["clean_acc5"]
    assert "top-5" in (report / "eval.md").read_text()

    from mbn.export import read_trained

    assert read_trained(out).checkpoint == out  # mbn-export reads it too

    assert avg_main([str(kept_run), "--k", "1", "-o", str(tmp_path / "one.pt")]) == 0
    best = load_checkpoint(kept_run / KEPT_DIR / read_ledger(kept_run / KEPT_DIR)[1][0].file)
    torch.testing.assert_close(load_checkpoint(tmp_path / "one.pt")["model"], best["model"])


def test_avg_checkpoints_errors_are_one_line(kept_run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert avg_main([str(empty)]) == 2
    assert "no kept checkpoints" in (err := one_line_error(capsys)) and "trainer.keep_best_k" in err
    assert avg_main([str(kept_run), "--k", "3", "-o", str(tmp_path / "x.pt")]) == 2
    assert "--k 3 but only 2 checkpoints are kept" in one_line_error(capsys)

    other = tmp_path / "other"
    kept = KeptCheckpoints(other / KEPT_DIR, k=2)
    kept.offer(1, 0.5, "acc_test/clean", _ckpt(0.5))
    wide = _ckpt(0.2) | {"model": {"w": torch.zeros(3)}}
    kept.offer(2, 0.4, "acc_test/clean", wide)
    assert avg_main([str(other)]) == 2
    assert "checkpoints of different models" in one_line_error(capsys)
    with pytest.raises(AverageError, match="different models"):
        average_states([{"w": torch.zeros(2)}, {"v": torch.zeros(2)}], ["a", "b"], newest=1)
