"""The layer contracts of pyproject.toml (docs/ARCHITECTURE.md), checked with import-linter: they hold for the
code as it is, and they catch a violation even when a function-local import hides it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, clean_env


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter on the packages under `root`, with the contracts of `root`/pyproject.toml."""
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=clean_env(PYTHONPATH=str(root)),
                          capture_output=True, text=True, timeout=300)


def test_the_code_keeps_every_contract():
    res = lint_imports(REPO)
    assert res.returncode == 0, res.stdout[-3000:]
    assert "Contracts: 2 kept, 0 broken." in res.stdout


@pytest.fixture()
def copy_of_the_code(tmp_path) -> Path:
    for name in ("slm_assist", "data_tools"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "demo_corpus"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    return tmp_path


@pytest.mark.parametrize("module, hidden_import, broken", [
    # the shared core reaching up into the training engine
    ("slm_assist/core/errors.py", "from slm_assist.training.trainer import Trainer", "One-way layers"),
    # data_tools using the trainer's model builder (it must go through the core's model-directory opener)
    ("data_tools/score.py", "from slm_assist.training.models import build_model", "One-way layers"),
    # a recipe importing the commands above it
    ("slm_assist/salt/recipe.py", "from slm_assist.report import run_summary", "One-way layers"),
    # a cycle inside one layer: the packer and the tokenizer command importing each other
    ("data_tools/pack.py", "from data_tools.tokenizer import main", "No import cycle"),
])
def test_a_function_local_import_cannot_hide_a_violation(copy_of_the_code, module, hidden_import, broken):
    path = copy_of_the_code / module
    path.write_text(path.read_text() + f"\n\ndef _hidden():\n    {hidden_import}\n")
    res = lint_imports(copy_of_the_code)
    assert res.returncode == 1, res.stdout[-3000:]
    verdicts = {line.rsplit(" ", 1)[0]: line.rsplit(" ", 1)[1] for line in res.stdout.splitlines()
                if line.endswith((" KEPT", " BROKEN"))}
    # (an upward import also closes a cycle, so the other contract may break too)
    assert [v for name, v in verdicts.items() if name.startswith(broken)] == ["BROKEN"], res.stdout[-3000:]
