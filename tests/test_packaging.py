"""The installed package: one import root (``weightgeom``) and nothing else at site-packages' top level,
beside a user's own packages named like the repository's folders; recipes ship as package data.

Builds the wheel from this checkout, installs it (no dependencies: nothing here imports torch) into a
fresh venv that already holds packages called ``core``, ``hooks``, ``recipes`` and ``trainers``, and
imports both sides there.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.conftest import REPO

USER_PACKAGES = ("core", "hooks", "recipes", "trainers")


def run(*cmd, cwd=None) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(python, site-packages)`` of a fresh venv with the wheel and four same-named user packages."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"  # a copy: building in the checkout would leave build/ and *.egg-info there
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "runs", "__pycache__", ".whl"))
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist", source)
    wheel = next((root / "dist").glob("weightgeom_harness-*.whl"))
    venv.create(root / "env", with_pip=True)
    python = root / "env" / "bin" / "python"
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    for name in USER_PACKAGES:  # what another distribution (torchtune's recipes, a user's hooks) puts there
        (Path(site) / name).mkdir()
        (Path(site) / name / "__init__.py").write_text(f"OWNER = 'user {name}'\n")
    run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel)
    return python, site


@pytest.mark.slow
def test_the_wheel_installs_one_root_beside_same_named_packages(installed):
    python, site = installed
    files = run(python, "-m", "pip", "show", "-f", "weightgeom-harness").split("Files:", 1)[1].split()
    top = {f.split("/", 1)[0] for f in files if not f.startswith("..")}  # ../../../bin/: the console scripts
    assert top == {"weightgeom", next(t for t in top if t.endswith(".dist-info"))}, sorted(top)
    assert {f.rsplit("/", 1)[-1] for f in files if f.startswith("..")} == {"harness", "weightgeom"}
    code = ("import core, hooks, recipes, trainers, weightgeom, weightgeom.hooks.keys as k, weightgeom.recipes as r\n"
            "print([m.OWNER for m in (core, hooks, recipes, trainers)])\n"
            "print(k.__file__.startswith(weightgeom.__path__[0]), sorted(r.bundled()))\n")
    out = run(python, "-c", code, cwd=site).splitlines()  # cwd = site-packages: nothing else on the path
    recipes = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
    assert out == ["['user core', 'user hooks', 'user recipes', 'user trainers']", f"True {recipes}"]


@pytest.mark.slow
def test_uninstalling_leaves_the_users_packages(installed):
    python, site = installed
    run(python, "-m", "pip", "uninstall", "-y", "-q", "weightgeom-harness")
    out = run(python, "-c", "import core, hooks, recipes, trainers; print(recipes.OWNER)\n"
                            "import importlib.util as u; print(u.find_spec('weightgeom'))", cwd=site).splitlines()
    assert out == ["user recipes", "None"]


def test_a_folder_imported_by_its_bare_name_is_refused():
    """From the repository root ``hooks`` is a folder on the path; importing it by that name would make a
    second copy of every module (``hooks.suite.InstrumentSuite`` is not ``weightgeom.hooks.suite``'s)."""
    for name in ("hooks", "core", "trainers", "harness", "recipes"):
        done = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 1 and f"import weightgeom.{name}, not {name}" in done.stderr, done.stderr


def test_the_root_exports_its_public_names_lazily():
    code = ("import sys, weightgeom\n"
            "assert 'torch' not in sys.modules, 'import weightgeom pulled in torch'\n"
            "from weightgeom import InstrumentSuite, RunConfig, Suite, compare, run_rank1, run_recipe\n"
            "assert InstrumentSuite.__module__ == 'weightgeom.hooks.suite'\n"
            "assert set(weightgeom.__all__) == set(weightgeom._EXPORTS) | {'__version__'}\n"
            "print(weightgeom.__version__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()[0].isdigit()
