"""The wheel a researcher installs: recipes inside, built-in domains under a name that cannot collide, extras."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from mbn import extras
from mbn.extras import MissingExtraError

REPO = Path(__file__).resolve().parents[1]
PLUGIN_EXAMPLE = REPO / "tests" / "plugin_example"
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
    assert any("imagecorruptions" in line and 'extra == "robustness"' in line for line in requires)
    assert not [line for line in requires if "torchattacks" in line]  # its requests pin: installed with --no-deps
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
    hidden = {"torchattacks", "imagecorruptions"}
    monkeypatch.setattr(extras.importlib.util, "find_spec", lambda name: None if name in hidden else real(name))
    with pytest.raises(MissingExtraError) as err:
        extras.require("imagecorruptions", "the frost corruption (its textures)")
    assert str(err.value) == (
        "the frost corruption (its textures) needs the 'imagecorruptions' package: "
        'pip install "mbn-advprop[robustness]"'
    )
    extras.require("numpy", "anything")  # present: no error


def test_missing_torchattacks_says_how_to_install_it_without_its_pins(monkeypatch):
    from mbn.eval.robustness import autoattack_accuracy

    real = extras.importlib.util.find_spec
    monkeypatch.setattr(extras.importlib.util, "find_spec", lambda name: None if name == "torchattacks" else real(name))
    with pytest.raises(MissingExtraError) as err:  # refused before the model or the batches are touched
        autoattack_accuracy(None, [], "clean", None, eps=8 / 255, num_classes=10)
    assert str(err.value) == (
        "AutoAttack (mbn-eval --autoattack) needs the 'torchattacks' package: "
        'pip install --no-deps "torchattacks>=3.5"'
    )


def _extras() -> dict[str, list[Requirement]]:
    """pyproject.toml's optional dependencies, each with the extras it names (``mbn-advprop[a,b]``) expanded."""
    project = _toml(REPO / "pyproject.toml")["project"]
    declared = {name: [Requirement(r) for r in reqs] for name, reqs in project["optional-dependencies"].items()}

    def expand(name: str, seen: frozenset[str] = frozenset()) -> list[Requirement]:
        out = []
        for req in declared[name]:
            if req.name == project["name"]:
                out += [r for extra in sorted(req.extras - seen) for r in expand(extra, seen | {name})]
            else:
                out.append(req)
        return out

    return {name: expand(name) for name in declared}


def test_no_extra_installs_torchattacks():
    """torchattacks pins requests~=2.25.1: as a requirement of an extra it would downgrade the user's requests."""
    extras_ = _extras()
    assert "imagecorruptions" in {r.name for r in extras_["robustness"]}
    assert {name: [str(r) for r in reqs if r.name == "torchattacks"] for name, reqs in extras_.items()} == {
        name: [] for name in extras_
    }
    assert "--no-deps" in extras.TORCHATTACKS and "torchattacks>=3.5" in extras.TORCHATTACKS
    assert 'pip install -q --no-deps "torchattacks>=3.5"' in (REPO / ".ci" / "run").read_text()


def test_no_extra_caps_a_package_the_user_has_anyway():
    """An installed extra's requirements pin none of requests, tqdm or mbn's own requirements to an old series.

    Read from the metadata of each extra's requirements installed here (the dev environment installs them all):
    no ``==``/``~=`` pin (torchattacks' ``requests~=2.25.1`` downgraded requests), and no upper bound the version
    installed here breaks (a next-major cap such as ``requests<3`` downgrades nothing).
    """
    project = _toml(REPO / "pyproject.toml")["project"]
    shared = {"requests", "tqdm"} | {Requirement(r).name for r in project["dependencies"]}
    capped, checked = [], 0
    for name, reqs in _extras().items():
        for req in reqs:
            try:
                requires = importlib.metadata.requires(req.name) or []
            except importlib.metadata.PackageNotFoundError:
                continue
            checked += 1
            for dep in map(Requirement, requires):
                if dep.marker is not None and not dep.marker.evaluate({"extra": ""}):
                    continue  # an extra of that package, not installed by ours
                if dep.name not in shared:
                    continue
                pinned = any(s.operator in ("~=", "==", "===") for s in dep.specifier)
                try:
                    installed = importlib.metadata.version(dep.name)
                except importlib.metadata.PackageNotFoundError:
                    installed = None
                if pinned or (installed is not None and not dep.specifier.contains(installed, prereleases=True)):
                    capped.append(f"[{name}] {req.name} requires {dep}")
    assert checked, "none of the extras' requirements is installed here"
    assert capped == []


def test_user_facing_extras_cap_nothing():
    """``pip install 'mbn-advprop[robustness]'`` (or ``[onnx]``) downgrades nothing: no upper bound or pin at all."""
    for name, reqs in _extras().items():
        if name == "dev":  # the test environment's own caps (setuptools<81 for imagecorruptions' pkg_resources)
            continue
        pinned = [str(r) for r in reqs if any(s.operator in ("<", "<=", "~=", "==", "===") for s in r.specifier)]
        assert pinned == [], name


def _toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads(path.read_text())


def test_the_plugin_example_requires_mbn_by_its_distribution_name():
    """``pip install ./tests/plugin_example`` resolves to this mbn, not the unrelated "mbn" on the package index."""
    requirements = [Requirement(r) for r in _toml(PLUGIN_EXAMPLE / "pyproject.toml")["project"]["dependencies"]]
    assert requirements  # a plugin declares what it plugs into
    providers = importlib.metadata.packages_distributions()["mbn"]
    for req in requirements:
        try:
            dist = importlib.metadata.distribution(req.name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{req} names no installed distribution (mbn's is mbn-advprop)")
        assert dist.metadata["Name"] in providers, f"{req.name} does not provide the mbn package"
        assert req.specifier.contains(dist.version, prereleases=True), (str(req), dist.version)


def test_the_documented_plugin_install_registers_its_domains(tmp_path):
    """docs/plugins.md's ``pip install ./tests/plugin_example``, offline: pip builds and installs it into a folder."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools (the example's build backend) is not installed; pip cannot build it offline")
    source, target = tmp_path / "plugin_example", tmp_path / "site"
    shutil.copytree(PLUGIN_EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
           "--no-compile", "--target", str(target), str(source)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    code = (
        "import json, importlib.metadata as md, torch, mbn\n"
        "eps = {e.name: e.value for e in md.entry_points(group='mbn.domains') if e.dist.name == 'mbn-example-plugin'}\n"
        "images = torch.rand(2, 3, 4, 4)\n"
        "ctx = mbn.DomainContext(model=torch.nn.Identity(), bn='clean', generator=torch.Generator().manual_seed(0))\n"
        "out = {name: mbn.create_domain(name).generate(images, torch.zeros(2), ctx)[0] for name in eps}\n"
        "print(json.dumps({'entry_points': eps, 'origins': {n: mbn.available_domains()[n] for n in eps},\n"
        "    'inverted': torch.allclose(out['invert'], 1 - images),\n"
        "    'shuffled': torch.equal(out['channel_shuffle'].sort(1).values, images.sort(1).values),\n"
        "    'requires': md.requires('mbn-example-plugin')}))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    info = json.loads(run.stdout)
    assert info["entry_points"] == {
        "invert": "mbn_example_plugin.domains:Invert",
        "channel_shuffle": "mbn_example_plugin.domains:ChannelShuffle",
    }
    assert info["origins"]["invert"].startswith("entry point mbn_example_plugin.domains:Invert")
    assert info["inverted"] and info["shuffled"]
    assert info["requires"] == ["mbn-advprop"]  # what pip resolves without --no-deps: this distribution
