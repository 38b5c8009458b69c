"""``benchmarks/gpu_check.py``: its dry run exercises every part on the CPU, ready for the first GPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_runs_every_part_and_writes_every_section(gpu_check, tmp_path, capsys):
    out = tmp_path / "check"
    assert gpu_check.main(["--out", str(out), "--dry-run", "--budget-s", "900"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("gpu_check: ")]
    assert [line.split(":")[1].strip() for line in lines[:4]] == list(gpu_check.PARTS)  # one line per part
    results = json.loads((out / "results.json").read_text())
    parts = results["parts"]
    assert results["dry_run"] and results["device"] == "cpu"
    assert all(parts[name]["status"] == "ok" for name in gpu_check.PARTS), {k: v.get("error") for k, v in parts.items()}
    assert parts["environment"]["torch"] and parts["environment"]["mbn"]
    assert parts["tests"]["passed"] > 0 and parts["tests"]["failed"] == 0
    throughput = parts["throughput"]
    assert not throughput["case_errors"], throughput["case_errors"]
    ratios = throughput["ratios"]
    for key in (
        "engine_over_hand_vanilla",
        "engine_over_hand_advprop",
        "bf16_over_fp32",
        "fp16_scaler_over_fp32",
        "advprop_over_vanilla",
        "fast_advprop_over_vanilla",
        "on_device_over_loader",
        "split_over_per_bn",
    ):
        assert ratios[key] is not None and ratios[key] > 0, key
    assert throughput["streamed"]["loader_images_per_s_device"] > 0
    assert parts["paper"]["table"].keys() == {"vanilla", "advprop_pgd1"}
    markdown = (out / "results.md").read_text()
    assert markdown.startswith("# GPU check (dry run")
    assert all(f"## {name}: ok" in markdown for name in gpu_check.PARTS)
    assert results["elapsed_s"] < 900


def test_budget_is_never_exceeded_and_each_part_is_saved(gpu_check, tmp_path, capsys):
    """With 3 seconds, the environment runs and every later part is skipped, named, and saved."""
    out = tmp_path / "short"
    assert gpu_check.main(["--out", str(out), "--dry-run", "--budget-s", "3"]) == 0
    parts = json.loads((out / "results.json").read_text())["parts"]
    assert parts["environment"]["status"] == "ok"
    assert all(parts[name]["status"] == "skipped" for name in ("tests", "throughput", "paper"))
    assert "needs at least" in parts["paper"]["why"]
    assert "## paper: skipped" in (out / "results.md").read_text()
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", str(out), "--budget-s", "0"])
    assert "--budget-s" in capsys.readouterr().err
