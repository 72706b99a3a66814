"""The layering of docs/architecture.md holds: hooks <- core <- trainers <- harness, the instruments
never import a trainer framework, the training loops do not import each other, and inside the
harness the CLI and pipeline sit above the rank-1 and compare rooms, which sit above the reports. The contracts
live in pyproject.toml ([tool.importlinter]); import-linter reads every import, including the ones
inside functions."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

ROOT = Path(__file__).resolve().parents[1]


def lint(config: Path, cwd: Path) -> subprocess.CompletedProcess:
    """import-linter in a fresh interpreter whose packages are the ones under ``cwd`` (in this test
    process ``weightgeom`` is already imported from the repository, and would be found instead)."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(config)!r}, no_cache=True))")
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)


def test_the_project_keeps_its_import_contracts():
    result = lint(ROOT / "pyproject.toml", ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("module", "target", "arrow"), [
    ("hooks/keys.py", "weightgeom.core.config", "weightgeom.hooks.keys -> weightgeom.core.config"),
    ("harness/reports/claims.py", "weightgeom.harness.rank1.report", "weightgeom.harness.reports.claims -> "
                                                                      "weightgeom.harness.rank1.report"),
])
def test_an_upward_import_breaks_the_contract(tmp_path, module, target, arrow):
    """The same contracts on a copy of the package with one upward import, hidden inside a function
    (an instrument importing the config layer; a report importing the rank-1 room), are reported
    broken: the check can fail."""
    shutil.copytree(ROOT / "weightgeom", tmp_path / "weightgeom", ignore=shutil.ignore_patterns("__pycache__"))
    path = tmp_path / "weightgeom" / module
    path.write_text(path.read_text() + textwrap.dedent(f"""

        def _upward():
            import {target}  # hidden inside a function, still an arrow upward
            return {target}
    """))
    result = lint(ROOT / "pyproject.toml", tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert arrow in result.stdout and "3 kept, 1 broken" in result.stdout, result.stdout
