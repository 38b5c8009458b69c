"""``mbn-train --import MODULE`` and the recipe's ``imports:`` key: a domain in the user's own file trains, resumes
and evaluates without a launcher script; the stored recipe names the module, so each later command imports it."""

from __future__ import annotations

import sys
import textwrap

import pytest
import yaml

from mbn import registry
from mbn.checkpoint import load_checkpoint
from mbn.cli.eval import main as eval_main
from mbn.cli.train import main as train_main
from mbn.config import RecipeError, load_recipe
from mbn.imports import import_user_modules
from tests.runs import REPO, train

MODULE = "mbn_test_user_domains"
DOMAIN = "user_half_invert"
SOURCE = f'''
import mbn

IMPORTS = globals().get("IMPORTS", 0) + 1


@mbn.register_domain("{DOMAIN}")
class HalfInvert(mbn.Domain):
    def generate(self, images, labels, ctx):
        return 1.0 - 0.5 * images, labels
'''


@pytest.fixture
def user_dir(tmp_path, monkeypatch, scratch_registry):
    """``tmp_path`` as the working directory, holding the user's module; sys.path and sys.modules restored after."""
    (tmp_path / f"{MODULE}.py").write_text(textwrap.dedent(SOURCE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    forget()
    yield tmp_path
    forget()


def forget() -> None:
    """Unimport the user's module and unregister its domain, as in a fresh process."""
    sys.modules.pop(MODULE, None)
    registry._DOMAINS.pop(DOMAIN, None)
    registry._ORIGINS.pop(DOMAIN, None)


def imported_again() -> bool:
    return MODULE in sys.modules and DOMAIN in registry.available_domains()


@pytest.mark.slow
def test_import_trains_resumes_and_evaluates_from_the_stored_recipe(user_dir, capsys):
    recipe, run = REPO / "recipes" / "vanilla.yaml", user_dir / "run"
    extra = [f"domains.inv.type={DOMAIN}", "trainer.max_steps=2"]
    assert train(recipe, run, "--import", MODULE, *extra) == 0, capsys.readouterr().err
    assert yaml.safe_load((run / "config.yaml").read_text())["imports"] == [MODULE]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["config"]["imports"] == [MODULE]

    forget()
    assert train_main(["--resume", str(run), "trainer.max_steps=4"]) == 0, capsys.readouterr().err
    assert imported_again()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"] == 4

    forget()
    assert eval_main([str(run), "--limit", "8"]) == 0, capsys.readouterr().err
    assert imported_again()


def test_recipe_key_imports_and_the_command_line_adds_to_it(user_dir):
    (user_dir / "other_user_module.py").write_text("LOADED = True\n")
    sys.modules.pop("other_user_module", None)
    recipe = user_dir / "recipe.yaml"
    recipe.write_text(f"base: vanilla\nimports: [{MODULE}]\ndomains:\n  inv:\n    type: {DOMAIN}\n")
    cfg = load_recipe(recipe, imports=["other_user_module", MODULE])
    assert list(cfg.imports) == [MODULE, "other_user_module"]  # the recipe's first, no repeats
    assert imported_again() and "other_user_module" in sys.modules
    sys.modules.pop("other_user_module")


def test_a_missing_module_is_one_line_and_exit_code_2(user_dir, capsys):
    assert train(REPO / "recipes" / "vanilla.yaml", user_dir / "run", "--import", "no_such_user_module") == 2
    err = capsys.readouterr().err
    assert err == (
        "mbn-train: error: --import no_such_user_module: ModuleNotFoundError: No module named 'no_such_user_module'\n"
    )
    assert not (user_dir / "run").exists()


def test_a_module_failing_inside_is_named_with_its_error(user_dir, capsys):
    (user_dir / "broken_user_module.py").write_text("raise ValueError('bad setting\\nmore')\n")
    assert train(REPO / "recipes" / "vanilla.yaml", user_dir / "run", "imports=[broken_user_module]") == 2
    assert capsys.readouterr().err == "mbn-train: error: key 'imports': broken_user_module: ValueError: bad setting\n"


def test_without_the_import_the_domain_is_unknown(user_dir, capsys):
    assert train(REPO / "recipes" / "vanilla.yaml", user_dir / "run", f"domains.inv.type={DOMAIN}") == 2
    assert f"unknown domain type {DOMAIN!r}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "my_domains.py",
            r"--import my_domains.py: expected a module name .* \(a module name, not a file: 'my_domains'\)",
        ),
        (
            "./plugins/my_domains.py",
            r"expected a module name .* \(a module name, not a file: 'plugins.my_domains'\)",
        ),
        ("", "--import : expected a module name"),
        ("a-b", "--import a-b: expected a module name"),
    ],
)
def test_a_file_name_or_bad_name_is_refused(name, message):
    with pytest.raises(RecipeError, match=message):
        import_user_modules([name], "--import")
