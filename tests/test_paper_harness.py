"""The paper experiment harness ``benchmarks/paper/run.py``: commands, resume, aggregation, mCE and the report."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _load_harness():
    spec = importlib.util.spec_from_file_location("paper_run", REPO / "benchmarks" / "paper" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["paper_run"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


run = _load_harness()
CORRUPTIONS = ("fog", "contrast")


def evaluation(clean: float, corr: dict[str, list[float]], linf: dict[str, float], limit: int = 100) -> dict:
    """A hand-made eval.json (schema of mbn-eval) with accuracies per corruption for severities 1, 2."""
    table = {c: {str(s + 1): a for s, a in enumerate(accs)} for c, accs in corr.items()}
    values = [a for accs in corr.values() for a in accs]
    return {
        "limit": limit,
        "num_images": limit,
        "clean_acc": clean,
        "corruptions": {"accuracy": table, "mean_acc": sum(values) / len(values)},
        "adversarial": {"steps": 5, "bn": "clean", "linf": linf, "l2": {}, "autoattack": None},
    }


def job(config: str, seed: int, tmp: Path, clean: float, train_time: float, corr=None, linf=None):
    j = run.Job(config, seed, tmp / f"{config}-s{seed}", tmp / "logs" / f"{config}-s{seed}.log", [], None, "done")
    j.metrics = {"train_time_s": train_time, "wall_time_s": train_time + 1, "images_per_s": 10.0, "steps": 4}
    j.evaluation = evaluation(
        clean, corr or {c: [0.5, 0.5] for c in CORRUPTIONS}, linf or {"1": 0.3, "4": 0.1, "8": 0.0}
    )
    return j


# ------------------------------------------------------------------------------------------- arithmetic


def test_mean_std_uses_sample_std():
    mean, std = run.mean_std([0.5, 0.7, 0.9])
    torch.testing.assert_close(mean, 0.7)
    torch.testing.assert_close(std, 0.2)  # sqrt(((-.2)^2 + 0 + .2^2) / (3 - 1))
    assert run.mean_std([0.4]) == (0.4, None)
    assert run.mean_std([]) == (None, None)


def test_mce_against_reference_is_mean_of_summed_error_ratios():
    ref = evaluation(0.9, {"fog": [0.8, 0.8], "contrast": [0.8, 0.8]}, {})  # errors 0.2, 0.2
    ev = evaluation(0.9, {"fog": [0.9, 0.8], "contrast": [0.6, 0.6]}, {})  # errors 0.1+0.2, 0.4+0.4
    # CE_fog = 0.3 / 0.4 = 0.75, CE_contrast = 0.8 / 0.4 = 2.0 -> mCE 1.375
    torch.testing.assert_close(run.mce_vs(ev, ref), 1.375)
    torch.testing.assert_close(run.mce_vs(ref, ref), 1.0)


def test_summary_cells_and_verdicts_on_hand_made_runs(tmp_path):
    jobs = [
        job("vanilla", 0, tmp_path, 0.60, 100.0),
        job("vanilla", 1, tmp_path, 0.62, 120.0),
        job("advprop_pgd1", 0, tmp_path, 0.63, 300.0, corr={c: [0.75, 0.75] for c in CORRUPTIONS}),
        job("advprop_pgd1", 1, tmp_path, 0.67, 300.0, corr={c: [0.5, 0.5] for c in CORRUPTIONS}),
        job("advtrain", 0, tmp_path, 0.55, 250.0, linf={"1": 0.5, "4": 0.25, "8": 0.1}),
    ]
    report = run.build_report(jobs, "smoke", run.SCALES["smoke"], 100, "python benchmarks/paper/run.py --scale smoke")
    s = report["summary"]
    assert list(s) == ["vanilla", "advprop_pgd1", "advtrain"]
    assert list(s["vanilla"]) == list(run.METRICS)
    torch.testing.assert_close(s["vanilla"]["clean_acc"]["mean"], 0.61)
    torch.testing.assert_close(s["vanilla"]["clean_acc"]["std"], 0.02**0.5 / 10)  # sample std of .60, .62
    torch.testing.assert_close(s["advprop_pgd1"]["clean_acc"]["mean"], 0.65)
    # mCE per seed vs the same seed's vanilla (error 0.5 everywhere): 0.25/0.5 = 0.5, then 1.0
    torch.testing.assert_close(s["advprop_pgd1"]["mce"]["values"], [0.5, 1.0])
    torch.testing.assert_close(s["vanilla"]["mce"]["values"], [1.0, 1.0])
    torch.testing.assert_close(s["advprop_pgd1"]["cost_ratio"]["values"], [3.0, 2.5])
    torch.testing.assert_close(s["advtrain"]["pgd_linf_4"]["mean"], 0.25)
    assert s["advtrain"]["clean_acc"]["n"] == 1 and s["advtrain"]["clean_acc"]["std"] is None

    assert run.format_cell(s["advprop_pgd1"]["clean_acc"], "clean_acc", 2) == "65.00 ± 2.83"
    assert run.format_cell(s["advprop_pgd1"]["cost_ratio"], "cost_ratio", 2) == "2.75x ± 0.35"
    assert run.format_cell(s["advtrain"]["clean_acc"], "clean_acc", 2) == "55.00 (n=1)"
    assert run.format_cell(s["advtrain"]["clean_acc"], "clean_acc", 1) == "55.00"

    # difference of means +4.00 points; noise = the larger seed std (2.83 of advprop vs 1.41 of vanilla)
    lines = report["verdicts"]
    # then the same-seed differences: clean +3, +5; mCE 50 - 100 = -50 and 100 - 100 = 0 (not a win)
    assert (
        "advprop_pgd1 vs vanilla clean acc: +4.00 (seed std 2.83; better, beyond seed noise); "
        "same seed: +3.00, +5.00, better in 2/2" in lines
    )
    assert (
        "advprop_pgd1 vs vanilla mCE: -25.00 (seed std 35.36; better, within seed noise); "
        "same seed: -50.00, +0.00, better in 1/2 [lower is better]" in lines
    )
    assert "advprop_pgd1 vs advtrain clean acc: +10.00 (seed std n/a with 1 seed; better)" in lines
    assert not any("pgd5" in line for line in lines)  # configs not run get no verdict

    md = run.render_markdown(report)
    assert "| config | clean acc (%) | CIFAR-10-C mean acc (%) | mCE vs vanilla (%) |" in md
    assert "| advprop_pgd1 | 65.00 ± 2.83 | 62.50 ± 17.68 | 75.00 ± 35.36 |" in md
    assert "`python benchmarks/paper/run.py --scale smoke`" in md and "torch" in md


def test_mce_is_missing_without_the_same_seeds_vanilla(tmp_path):
    report = run.build_report([job("advprop_pgd1", 3, tmp_path, 0.6, 10.0)], "smoke", run.SCALES["smoke"], 100, "x")
    stats = report["summary"]["advprop_pgd1"]
    assert stats["mce"]["mean"] is None and stats["cost_ratio"]["mean"] is None
    assert run.format_cell(stats["mce"], "mce", 1) == "-"


def test_eval_complete_requires_the_table_numbers_on_the_same_images():
    scale = run.SCALES["smoke"]
    full = evaluation(0.5, {"fog": [0.5, 0.5]}, {"1": 0.2, "4": 0.1, "8": 0.0}, limit=16)
    full["adversarial"]["steps"] = scale.pgd_steps
    assert run.eval_complete(full, scale, 16)
    assert not run.eval_complete(full, scale, 32)  # other image subset
    assert not run.eval_complete({**full, "corruptions": None}, scale, 16)
    assert not run.eval_complete({**full, "adversarial": {**full["adversarial"], "linf": {"1": 0.2}}}, scale, 16)
    assert not run.eval_complete(None, scale, 16)


def test_interrupted_training_is_resumed_and_a_failure_reported(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(run, "_run_logged", lambda cmd, log, what: (calls.append(cmd), (1, 0.5))[1])
    scale = run.SCALES["smoke"]
    j = run.make_job("vanilla", 0, scale, tmp_path, ["model.width=8"], 16, None)
    (j.run_dir / "checkpoints").mkdir(parents=True)
    (j.run_dir / "checkpoints" / "last.pt").write_bytes(b"")
    j.log.parent.mkdir(parents=True)
    j.log.write_text("mbn-train: error: something broke\n")
    run.execute(j, scale, 16)
    assert calls == [[sys.executable, "-m", "mbn.cli.train", "--resume", str(j.run_dir)]]
    assert j.status == "FAILED training (exit 1): mbn-train: error: something broke"
    assert j.metrics is None and j.seconds == {"train": 0.5}


# ---------------------------------------------------------------------------------------------- command


def test_dry_run_prints_every_command_and_runs_nothing(tmp_path, capsys):
    runs = tmp_path / "runs"
    argv = ["--scale", "cpu", "--dry-run", "--seeds", "0", "1", "--configs", "vanilla", "advprop_pgd5"]
    assert run.main([*argv, "--runs-dir", str(runs), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert out.count("-m mbn.cli.train") == 4 and out.count("# then evaluate_run(") == 4
    assert "# advprop_pgd5-s1" in out
    assert "domains.adv.steps=5 domains.adv.eps=4 domains.adv.step_size=1" in out
    assert "data.name=imagefolder" in out and f"data.root={(REPO.parent / 'shared/datasets/cifar10').resolve()}" in out
    assert "trainer.seed=1" in out and f"trainer.out_dir={runs / 'vanilla-s1'}" in out
    assert "linf_eps=[1.0, 4.0, 8.0]" in out and "limit=1000" in out
    assert not runs.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--scale", "smoke", "--eval-limit", "0"], "--eval-limit"),
        (["--scale", "smoke", "--override", "trainer.seed"], "--override"),
        (["--scale", "smoke", "--configs", "nope"], "--configs"),
        (["--scale", "smoke", "--suite", "imagenet-q=/data"], "unknown suite 'imagenet-q'"),
    ],
)
def test_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        run.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_data_root_is_a_clear_error(tmp_path, capsys):
    assert run.main(["--scale", "cpu", "--data-root", str(tmp_path / "none"), "--runs-dir", str(tmp_path)]) == 2
    assert "--data-root" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_smoke_experiment_trains_evaluates_reports_and_resumes(tmp_path, capsys):
    from PIL import Image

    from mbn.synthetic import SYNTHETIC_CLASSES, generate_synthetic

    out, runs, suite = tmp_path / "out", tmp_path / "runs", tmp_path / "suite"
    images, labels = generate_synthetic(12, 32, seed=5)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        (suite / SYNTHETIC_CLASSES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(suite / SYNTHETIC_CLASSES[label] / f"{i}.png")
    argv = ["--scale", "smoke", "--seeds", "0", "--configs", "vanilla", "advprop_pgd1", "--suite", f"folder={suite}"]
    argv += ["--out", str(out), "--runs-dir", str(runs), "--cache-dir", str(tmp_path / "cache")]
    assert run.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("[2/2] advprop_pgd1-s0: done") for line in lines)

    report = json.loads((out / "results.json").read_text())
    assert list(report["summary"]) == ["vanilla", "advprop_pgd1"]
    assert all(list(stats) == list(run.METRICS) for stats in report["summary"].values())
    vanilla, advprop = report["summary"]["vanilla"], report["summary"]["advprop_pgd1"]
    assert vanilla["mce"]["values"] == [1.0] and vanilla["cost_ratio"]["values"] == [1.0]
    assert all(stats[k]["n"] == 1 for stats in (vanilla, advprop) for k in run.METRICS)
    assert 0.0 <= advprop["clean_acc"]["mean"] <= 1.0 and advprop["mce"]["mean"] > 0
    assert report["settings"]["model"] == "cifar_resnet8 (width 8)" and report["settings"]["eval_images"] == 16
    for r in report["runs"]:
        assert Path(r["config_yaml"]).is_file() and (Path(r["run_dir"]) / "eval.json").is_file()
        assert "evaluate: wrote eval.json" in Path(r["log"]).read_text()
    md = (out / "results.md").read_text()
    assert "| vanilla | " in md and "| advprop_pgd1 | " in md and "mCE vs vanilla (%)" in md
    assert "advprop_pgd1 vs vanilla clean acc:" in md
    assert "## Robustness suites" in md and "| model | clean | folder |" in md and "| advprop_pgd1-s0 | " in md
    assert report["suite_rows"]["vanilla-s0"]["suites"]["folder"]["num_images"] == 12

    # a second call finds both runs complete and only rewrites the report
    assert run.main(argv) == 0
    assert capsys.readouterr().out.count("skipped (done)") == 2
    assert json.loads((out / "results.json").read_text())["summary"] == report["summary"]


def test_ssl_study_dry_run_orders_pretraining_first_and_tunes_only_attacks(tmp_path, capsys):
    argv = ["--study", "ssl", "--scale", "cpu", "--dry-run", "--seeds", "0", "--configs", "at_pretrained"]
    assert run.main([*argv, "--runs-dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    names = [line[2:] for line in out.splitlines() if line.startswith("# ") and not line.startswith("# then")]
    assert names == ["ssl_pretrain-s0", "at_pretrained-s0"]  # the dependency is added and comes first
    pretrain, finetune = (line for line in out.splitlines() if "-m mbn.cli.train" in line)
    assert "domains.adv" not in pretrain and "domains.adv.steps=3" in finetune
    assert f"model.init_from={tmp_path / 'runs' / 'ssl_pretrain-s0'}" in finetune
    assert out.count("# then evaluate_run(") == 1  # the pre-training run is not a table row


def test_ssl_verdicts_judge_against_seed_noise():
    import ssl_study

    def stats(values):
        return run.summarize({"x": {i: {"m": v} for i, v in enumerate(values)}}, ["m"])["x"]["m"]

    def config(**metrics):
        base = {m: [0.3, 0.31, 0.29] for m in ssl_study.METRICS}
        return {m: stats(metrics.get(m, base[m])) for m in ssl_study.METRICS}

    summary = {
        "at": config(),
        # clearly better below eps_train, clearly worse above: claim (a) holds for this weight
        "at_ssl_w05": config(pgd_linf_2=[0.5] * 3, pgd_linf_4=[0.5] * 3, pgd_linf_8=[0.5] * 3,
                             pgd_linf_12=[0.1] * 3, pgd_linf_16=[0.1] * 3),
        "at_ssl_w2": config(),  # identical to at: within noise
    }  # fmt: skip
    lines = ssl_study.verdicts(summary)
    assert any(line.startswith("(a) at_ssl_w05 vs at") and ": held;" in line for line in lines)
    assert any(line.startswith("(a) at_ssl_w2 vs at") and "within seed noise" in line for line in lines)
    assert any(line.startswith("(a) larger weight") and "did not hold" in line for line in lines)
    assert any(line.startswith("(c) tandem") and "held" in line for line in lines)
