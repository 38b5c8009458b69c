"""Domain registry: decorator, entry points in a fresh process, duplicate and unknown-parameter errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import mbn
from mbn import registry
from tests.plugin_env import install_plugin


@pytest.fixture
def clean_registry(monkeypatch):
    """Isolate registrations made by a test."""
    monkeypatch.setattr(registry, "_DOMAINS", dict(registry._DOMAINS))
    monkeypatch.setattr(registry, "_ORIGINS", dict(registry._ORIGINS))
    monkeypatch.setattr(registry, "_ENTRY_POINTS", dict(registry._ENTRY_POINTS))


class TestRegistry:
    def test_smoke_builtins_listed_with_origin(self):
        domains = mbn.available_domains()
        for name in ("clean", "pgd", "fgsm", "gd", "autoaugment", "randaugment", "trivialaugment", "gaussian_noise"):
            assert name in domains, name
            assert "mbn_domains." in domains[name], domains[name]  # entry point or module:Class

    def test_feature_decorator_registers_and_creates(self, clean_registry):
        @mbn.register_domain("scale_test")
        class Scale(mbn.Domain):
            def __init__(self, factor: float = 0.5) -> None:
                self.factor = factor

            def generate(self, images, labels, ctx):
                return images * self.factor, labels

        domain = mbn.create_domain("scale_test", factor=0.25)
        out, _ = domain.generate(torch.ones(1, 3, 2, 2), torch.zeros(1), None)
        assert out.max() == 0.25
        assert mbn.available_domains()["scale_test"].endswith("Scale")

    def test_exception_duplicate_name_names_both_origins(self, clean_registry):
        class Other(mbn.Domain):
            def generate(self, images, labels, ctx):
                return images, labels

        clash = r"'clean' registered twice: by (entry point )?mbn_domains\.clean:.* and by .*Other"
        with pytest.raises(ValueError, match=clash):
            mbn.register_domain("clean")(Other)

    def test_exception_unknown_parameter_names_domain_and_parameter(self):
        with pytest.raises(ValueError, match=r"domain 'pgd': unknown parameter 'epz'"):
            mbn.create_domain("pgd", epz=4)

    def test_exception_unknown_domain_suggests(self):
        with pytest.raises(KeyError, match=r"unknown domain type 'pgdd' \(did you mean 'pgd'\?\)"):
            mbn.create_domain("pgdd")

    def test_exception_not_a_domain(self, clean_registry):
        with pytest.raises(TypeError, match=r"subclass of mbn\.Domain"):
            mbn.register_domain("nope")(int)


def _run(code: str, site, extra_env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


class TestEntryPoints:
    @pytest.mark.slow
    def test_feature_discovery_in_fresh_process(self, tmp_path):
        site = install_plugin(tmp_path)
        code = (
            "import json, sys, torch, mbn\n"
            "d = mbn.available_domains()\n"
            "before = 'mbn_example_plugin.domains' in sys.modules\n"
            "dom = mbn.create_domain('invert', strength=1.0)\n"
            "x, _ = dom.generate(torch.zeros(1, 3, 2, 2), torch.zeros(1), None)\n"
            "print(json.dumps({'origin': d['invert'], 'lazy': not before, 'out': float(x.mean()),"
            " 'name': type(dom).name}))\n"
        )
        result = _run(code, site)
        assert result.returncode == 0, result.stderr
        info = json.loads(result.stdout)
        assert info["origin"].startswith("entry point mbn_example_plugin.domains:Invert")
        assert info["lazy"], "entry points must be imported only when their domain is used"
        assert info["out"] == 1.0 and info["name"] == "invert"

    @pytest.mark.slow
    def test_exception_entry_point_clashing_with_builtin(self, tmp_path):
        site = install_plugin(tmp_path, "[mbn.domains]\npgd = mbn_example_plugin.domains:Invert\n")
        result = _run("import mbn; mbn.available_domains()", site)
        assert result.returncode != 0
        last = result.stderr.strip().splitlines()[-1]
        assert "domain 'pgd' registered twice: by " in last  # the built-in's and the plugin's entry points
        assert "mbn_domains.pgd:PGDDomain" in last and "entry point mbn_example_plugin.domains:Invert" in last
