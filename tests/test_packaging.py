"""The wheel a researcher installs: recipes inside, built-in domains under a name that cannot collide, extras."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mbn import extras
from mbn.extras import MissingExtraError

REPO = Path(__file__).resolve().parents[1]
TINY_RUN = ["trainer.max_steps=2", "trainer.progress=none", "data.synthetic_train_size=128",
            "data.synthetic_test_size=64", "logging.tensorboard=false"]  # fmt: skip


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(REPO)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return next(out.glob("*.whl"))


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel's files installed alone (its dependencies are this environment's) into a folder."""
    target = tmp_path_factory.mktemp("site")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--no-compile",
        "--target",
        str(target),
        str(wheel),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return target


@pytest.mark.slow
def test_wheel_holds_recipes_and_no_bare_domains_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).stem for n in names if n.startswith("mbn/recipes/") and n.endswith(".yaml")}
    assert shipped == {p.stem for p in (REPO / "recipes").glob("*.yaml")}
    assert "mbn_domains/pgd.py" in names
    assert not [n for n in names if n.startswith("domains/")]
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    metadata = zipfile.ZipFile(wheel).read(meta).decode()
    assert "Name: mbn-advprop" in metadata
    assert "License-Expression: Apache-2.0" in metadata  # and the licence text travels with the wheel
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    base = [line for line in requires if "extra ==" not in line]
    assert not [line for line in base if "torchattacks" in line or "imagecorruptions" in line or "opencv" in line]
    assert any("torchattacks" in line and 'extra == "robustness"' in line for line in requires)
    entry_points = zipfile.ZipFile(wheel).read(meta.replace("METADATA", "entry_points.txt")).decode()
    assert "[mbn.domains]" in entry_points and "pgd = mbn_domains.pgd:PGDDomain" in entry_points
    assert "mbn-demo" not in entry_points  # every console script it declares exists
    for line in entry_points.split("[console_scripts]")[1].split("[")[0].strip().splitlines():
        module = line.split("=")[1].strip().split(":")[0]
        assert f"{module.replace('.', '/')}.py" in names, line


@pytest.mark.slow
def test_installed_wheel_runs_a_recipe_by_name_from_another_directory(installed, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(installed)}
    code = "import mbn.shipped as s; print(s.recipes_dir())"
    where = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert Path(where.stdout.strip()) == installed / "mbn" / "recipes"
    proc = subprocess.run([sys.executable, "-m", "mbn.cli.train", "quickstart", *TINY_RUN, "trainer.out_dir=run"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["sources"] == ["clean", "autoaug", "adv"]
    listing = subprocess.run([sys.executable, "-m", "mbn.cli.train", "--list-recipes"], cwd=tmp_path, env=env,
                             capture_output=True, text=True)  # fmt: skip
    assert listing.returncode == 0 and "quickstart" in listing.stdout and "fast_advprop" in listing.stdout


@pytest.mark.slow
def test_fast_advprop_budget_resolves_the_shipped_vanilla_outside_the_checkout(installed, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(installed)}
    cmd = [sys.executable, "-m", "mbn.cli.train", "fast_advprop", "data.name=synthetic", "model.name=cifar_resnet8",
           "model.width=8", "data.batch_size=16", *TINY_RUN, "trainer.out_dir=run"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["budget_of"] == "vanilla" and metrics["epochs"] < 30  # 30 epochs of vanilla's cost


@pytest.mark.slow
def test_a_domains_module_in_the_working_directory_changes_nothing(tmp_path):
    (tmp_path / "domains.py").write_text("raise SystemExit('the user module was imported')\n")
    (tmp_path / "domains").mkdir()
    (tmp_path / "domains" / "__init__.py").write_text("raise SystemExit('the user package was imported')\n")
    code = "import json, mbn; print(json.dumps(sorted(mbn.available_domains()))); mbn.create_domain('pgd')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (tmp_path / "elsewhere").mkdir()
    plain = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / "elsewhere", capture_output=True, text=True,
                           timeout=120)  # fmt: skip
    assert json.loads(proc.stdout) == json.loads(plain.stdout)  # (this process may hold test-registered domains)
    assert {"clean", "pgd", "autoaugment", "rotation"} <= set(json.loads(proc.stdout))


def test_an_unknown_recipe_name_is_one_line(capsys):
    from mbn.cli.train import main

    assert main(["no_such_recipe"]) == 2
    err = capsys.readouterr().err.strip()
    expected = "no_such_recipe: no such recipe file or shipped recipe (mbn-train --list-recipes lists them)"
    assert err == f"mbn-train: error: {expected}"


def test_missing_extra_is_named_in_one_line(monkeypatch):
    real = extras.importlib.util.find_spec
    monkeypatch.setattr(extras.importlib.util, "find_spec", lambda name: None if name == "torchattacks" else real(name))
    with pytest.raises(MissingExtraError) as err:
        extras.require("torchattacks", "AutoAttack (mbn-eval --autoattack)")
    assert str(err.value) == (
        "AutoAttack (mbn-eval --autoattack) needs the 'torchattacks' package: pip install \"mbn-advprop[robustness]\""
    )
    extras.require("numpy", "anything")  # present: no error
