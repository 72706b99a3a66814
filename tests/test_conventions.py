"""Habits the code relies on, enforced: every file a docstring, comment or document names exists (any
Markdown file, by path or bare name); no two modules import each other, however indirectly; metric and
state keys are built only by hooks/keys.py; the linters' configuration is the one CI runs."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

# A repository path as the code and docs cite it: a top-level folder, then a file with an extension.
CITED = re.compile(r"(?<![\w./-])((?:\.ci|benchmarks|core|docs|harness|hooks|recipes|tests|trainers|weightgeom)"
                   r"/[\w./-]*\w\.(?:py|md|yaml|sh|toml|txt))\b")
# A key family at the start of an f-string, followed by a formatted field: a key built by hand.
HAND_BUILT_KEY = re.compile(r"""\bf["'](?:rsf_\w*|z_\w+|gap_\w+|spike_\w+|coherence|cov_in|cov_out|weights|"""
                            r"""frozen_in|curve_in|curve_mass|mass_pred|pred|meta)/\{""")
PACKAGES = ("hooks", "core", "trainers", "harness")
# Any Markdown file named anywhere, as a path or a bare name (a design note named without its folder): a reader
# will look for it. Names with a template or glob in them (``report$2.md``, ``*.md``) and URLs are not citations.
MARKDOWN = re.compile(r"(?<![\w./:$*{}-])([\w./-]*\w\.md)\b")
# Markdown the harness writes into a run (harness/reports/, harness/rank1/report.py): named as outputs
# (``RUN/report/report.md``, ``rank1/rank1.md``), not as documents of this repository.
WRITTEN = {"report.md", "rank1.md"}
# The repository's top-level folders: a path under one of them is a repository path, never an output's.
FOLDERS = (".ci", "benchmarks", "core", "docs", "harness", "hooks", "recipes", "tests", "trainers", "weightgeom")


def tracked_files(*patterns: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=REPO, capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if (REPO / line).is_file()]


def test_every_cited_file_exists():
    missing = []
    for name in tracked_files("*.py", "*.md", "*.yaml", "*.sh", "*.toml"):
        for cited in CITED.findall((REPO / name).read_text(encoding="utf-8")):
            if not (REPO / cited).exists() and "*" not in cited:
                missing.append(f"{name}: {cited}")
    assert not missing, "files cited but not in the repository:\n" + "\n".join(sorted(set(missing)))


def test_the_citation_check_can_fail():
    gone = "harness" + "/asymmetry.py"  # moved to harness/reports/ (split here so this file cites nothing stale)
    assert CITED.findall(f"see {gone} and `core/config.py`") == [gone, "core/config.py"]
    assert not (REPO / gone).exists()


def missing_markdown(name: str, text: str, documents: set[str]) -> list[str]:
    """The Markdown files ``text`` (the contents of the repository file ``name``) names that the repository
    does not hold: a path must exist from the repository root or from ``name``'s folder; a bare name may
    also be any tracked document's name (``documents``: README.md, metrics.md, ...); a run's written
    report is no citation."""
    missing = []
    for cited in MARKDOWN.findall(text):
        path = Path(cited)
        if (REPO / path).exists() or (REPO / name).parent.joinpath(path).exists():
            continue
        if len(path.parts) == 1 and cited in documents | WRITTEN:
            continue
        if path.name in WRITTEN and path.parts[0] not in FOLDERS:
            continue
        missing.append(cited)
    return missing


def test_every_named_markdown_file_exists():
    documents = {Path(name).name for name in tracked_files("*.md")}
    missing = [f"{name}: {cited}" for name in tracked_files("*.py", "*.md", "*.yaml", "*.sh", "*.toml", "*.txt")
               for cited in missing_markdown(name, (REPO / name).read_text(encoding="utf-8"), documents)]
    assert not missing, "Markdown files named but not in the repository (cite docs/...):\n" + "\n".join(missing)


def test_the_markdown_check_can_fail():
    design = "DESIGN" + ".md"  # split so that this file names no missing document itself
    text = (f"uncentered ({design} section 2); see docs/{design}, docs/metrics.md, metrics.md, README.md, "
            "RUN/report/report.md, rank1/rank1.md, runs/x/report$2.md and *.md")
    assert missing_markdown("harness/cli.py", text, {"README.md", "metrics.md"}) == [design, f"docs/{design}"]
    assert missing_markdown("docs/compare.md", "[metrics](metrics.md)", set()) == []  # from the naming file's folder
    not_output = "docs/" + "report.md"  # a run's output name, but under a repository folder: a missing document
    assert missing_markdown("harness/cli.py", not_output, set()) == [not_output]


def module_name(path: str) -> str:
    """``harness/compare/report.py`` -> ``weightgeom.harness.compare.report`` (a package: its __init__)."""
    parts = Path(path).with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join(parts if parts[0] == "weightgeom" else ("weightgeom", *parts))


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """``{module: the project's modules it imports}`` from ``{file: source}``. Every import counts: at the
    top, inside a function, under ``if TYPE_CHECKING:`` (a cycle there still leaves two modules that can be
    neither read nor changed apart)."""
    modules = {module_name(path): path for path in sources}
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(sources[path])):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, one level up per extra dot
                    base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1], base]).strip(".")
                found |= {f"{base}.{alias.name}" for alias in node.names} | {base}
        graph[module] = {name for name in found if name in modules and name != module}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that reach each other through their imports (sorted), one per cycle."""
    reach = {}
    for start in graph:
        seen, todo = set(), [start]
        while todo:
            for name in graph[todo.pop()] - seen:
                seen.add(name)
                todo.append(name)
        reach[start] = seen
    groups = {tuple(sorted({m} | {n for n in reach[m] if m in reach[n]})) for m in graph if m in reach[m]}
    return sorted(list(group) for group in groups)


def package_sources() -> dict[str, str]:
    return {name: (REPO / name).read_text(encoding="utf-8")
            for name in tracked_files(*(f"{p}/*.py" for p in (*PACKAGES, "recipes", "weightgeom")))}


def test_no_import_cycles():
    cycles = import_cycles(import_graph(package_sources()))
    assert not cycles, "modules that import each other (move what both need to a module of its own):\n" + \
        "\n".join(" <-> ".join(group) for group in cycles)


def test_the_cycle_check_can_fail():
    sources = package_sources()
    report = "harness/compare/report.py"  # the report renders what the analysis returns; plant the old cycle
    sources[report] += "\nif TYPE_CHECKING:\n    from weightgeom.harness.compare.analysis import compare\n"
    assert import_cycles(import_graph(sources)) == [["weightgeom.harness.compare.analysis",
                                                     "weightgeom.harness.compare.report"]]
    relative = {report: "from . import analysis\n", "harness/compare/analysis.py": "from .report import x\n"}
    assert import_cycles(import_graph(relative)) == [["weightgeom.harness.compare.analysis",
                                                      "weightgeom.harness.compare.report"]]


def test_keys_are_built_only_in_hooks_keys():
    found = []
    for name in tracked_files(*(f"{p}/*.py" for p in PACKAGES)):
        if name == "hooks/keys.py":
            continue
        for i, line in enumerate((REPO / name).read_text(encoding="utf-8").splitlines(), 1):
            if HAND_BUILT_KEY.search(line):
                found.append(f"{name}:{i}: {line.strip()}")
    assert not found, "keys built by hand (use weightgeom.hooks.keys):\n" + "\n".join(found)
    assert HAND_BUILT_KEY.search('out[f"rsf_in/{key}"] = 1') and HAND_BUILT_KEY.search("f'cov_out/{k}/count'")


def test_ruff_is_clean():
    ruff = pytest.importorskip("ruff")
    from ruff.__main__ import find_ruff_bin  # noqa: PLC0415

    done = subprocess.run([find_ruff_bin(), "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert ruff  # the package imported: the check ran
