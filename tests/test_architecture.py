"""The layering of docs/architecture.md holds: hooks <- core <- trainers <- harness, the instruments
never import a trainer framework, and the training loops do not import each other. The contracts
live in pyproject.toml ([tool.importlinter]); import-linter reads every import, including the ones
inside functions."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

ROOT = Path(__file__).resolve().parents[1]


def lint(config: Path, cwd: Path) -> subprocess.CompletedProcess:
    """import-linter in a fresh interpreter whose packages are the ones under ``cwd`` (in this test
    process ``hooks`` etc. are already imported from the repository, and would be found instead)."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(config)!r}, no_cache=True))")
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)


def test_the_project_keeps_its_import_contracts():
    result = lint(ROOT / "pyproject.toml", ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_backward_import_breaks_the_contract(tmp_path):
    """The same contracts on a copy of the package skeleton with one upward import (an instrument
    importing the config layer) are reported broken: the check can fail."""
    for package in ("hooks", "core", "trainers", "harness"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    for module in ("trainers/ce.py", "trainers/preference.py", "trainers/trl_dpo.py"):
        (tmp_path / module).write_text("")
    (tmp_path / "core" / "config.py").write_text("X = 1\n")
    (tmp_path / "hooks" / "suite.py").write_text(textwrap.dedent("""
        def build():
            from core.config import X  # hidden inside a function, still an arrow upward
            return X
    """))
    config = tmp_path / "pyproject.toml"
    config.write_text((ROOT / "pyproject.toml").read_text().split("# The layering")[1].split("\n", 1)[1])
    result = lint(config, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "hooks.suite -> core.config" in result.stdout and "2 kept, 1 broken" in result.stdout
