"""Preference pairs for instruct models from the stdlib's own docstrings (local text only).

Each pair asks "What does `json.dumps` do?"; chosen = that function's docstring summary,
rejected = another function's summary. Unlike the word-shuffled set of
`weightgeom.core.data.build_embedded_preferences` (meant for models trained from scratch), both
answers are fluent English, so only a model that links names to behaviour prefers chosen.

Design:
- Sources are the running interpreter's stdlib `.py` files (test dirs, site-packages and the
  build-config dir skipped, as `weightgeom.core.tokenizer.stdlib_text_files` does), parsed with
  `ast`, never imported: no side effects, and the set depends only on the Python version.
- Candidates are public module-level functions of public modules (no part starting with `_`,
  and, where the module has a literal `__all__`, only names in it), named by import path
  (`json/__init__.py` -> `json.dumps`); `posixpath` and `genericpath` read as `os.path`,
  `ntpath` (the Windows twin) is skipped. Ordered by relative path, first name wins.
- Summary = the docstring's first paragraph, whitespace collapsed, kept if it reads as a
  sentence: 20..200 characters, starts with a letter, does not open with the function's own
  signature (`dumps(obj) -> str`), no doctest `>>>`, not a deprecation notice, not ending in `:`.
  A summary shared by several functions does not identify any of them: all copies are dropped.
- Rejected avoids shortcuts a model could take without knowing the function: it comes from a
  different top-level package (siblings such as `os.path.isfile`/`isdir` are near-synonyms;
  with unique summaries this also makes rejected != chosen),
  never mentions the asked function's name, is the nearest in length among a seeded sample of
  `n_candidates` such summaries (no length confound under summed log-probs), and serves as
  rejected at most `max_rejected_uses` times (no summary becomes a learnable "always wrong").
- Deterministic given `seed` (`random.Random(seed)`, never the global RNG); the parsed candidate
  list is cached per process and stdlib path.
"""

from __future__ import annotations

import ast
import functools
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Same directories `weightgeom.core.tokenizer.stdlib_text_files` skips.
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
# Module renames (as users call them) and platform twins skipped.
_MODULE_ALIASES = {"posixpath": "os.path", "genericpath": "os.path"}
# Platform twins, and packages nobody calls as a library: the IDLE app, demos, and the deprecated
# distutils / lib2to3 (gone in 3.12 / 3.13; skipping them keeps the set steadier across versions).
_SKIP_MODULES = frozenset({"ntpath", "nturl2path", "idlelib", "turtledemo", "distutils", "lib2to3"})
MIN_SUMMARY_CHARS = 20
MAX_SUMMARY_CHARS = 200
QUESTION = "What does `{name}` do?"


@dataclass(frozen=True)
class DocstringCandidate:
    """One public stdlib function: `name` as a user calls it, its `module`, its docstring `summary`."""

    name: str
    module: str
    summary: str

    @property
    def package(self) -> str:
        return self.module.split(".")[0]

    @property
    def short_name(self) -> str:
        return self.name.rsplit(".", 1)[-1]


def build_docstring_preferences(
    n_pairs: int,
    seed: int = 0,
    n_candidates: int = 16,
    max_rejected_uses: int = 2,
    stdlib: str | Path | None = None,
) -> list[dict]:
    """`n_pairs` conversational pairs (TRL format) asking what a stdlib function does.

    prompt = [user: "What does `module.function` do?"], chosen = [assistant: its own docstring
    summary], rejected = [assistant: the summary of a function from another top-level package,
    not mentioning the asked name, nearest in length among `n_candidates` seeded draws, used as
    rejected at most `max_rejected_uses` times]. Asked functions are drawn without replacement.
    `stdlib` defaults to the running interpreter's stdlib. Deterministic given `seed`.
    """
    if n_pairs < 1 or n_candidates < 1 or max_rejected_uses < 1:
        raise ValueError(
            "need n_pairs >= 1, n_candidates >= 1, max_rejected_uses >= 1; "
            f"got {n_pairs}, {n_candidates}, {max_rejected_uses}."
        )
    root = str(Path(stdlib if stdlib is not None else sysconfig.get_paths()["stdlib"]).resolve())
    candidates = docstring_candidates(root)
    if n_pairs > len(candidates):
        raise ValueError(
            f"asked for {n_pairs} docstring pairs but only {len(candidates)} functions under {root} "
            f"have a usable docstring summary; ask for at most {len(candidates)}."
        )
    rng = random.Random(seed)
    asked = rng.sample(candidates, n_pairs)
    uses: dict[str, int] = {}
    pairs = []
    for cand in asked:
        rejected = _pick_rejected(cand, candidates, uses, rng, n_candidates, max_rejected_uses)
        if rejected is None:
            raise ValueError(
                f"no rejected summary left for {cand.name} after {len(pairs)} pairs; "
                f"raise max_rejected_uses (now {max_rejected_uses}) or ask for fewer pairs."
            )
        uses[rejected.summary] = uses.get(rejected.summary, 0) + 1
        pairs.append({
            "prompt": [{"role": "user", "content": QUESTION.format(name=cand.name)}],
            "chosen": [{"role": "assistant", "content": cand.summary}],
            "rejected": [{"role": "assistant", "content": rejected.summary}],
        })
    return pairs


def _pick_rejected(
    cand: DocstringCandidate,
    candidates: tuple[DocstringCandidate, ...],
    uses: dict[str, int],
    rng: random.Random,
    n_candidates: int,
    max_uses: int,
) -> DocstringCandidate | None:
    """Nearest-length summary among up to `n_candidates` eligible seeded draws (None if none is eligible)."""
    mention = re.compile(rf"\b{re.escape(cand.short_name)}\b", re.IGNORECASE)

    def eligible(other: DocstringCandidate) -> bool:
        return (
            other.package != cand.package
            and uses.get(other.summary, 0) < max_uses
            and not mention.search(other.summary)
        )

    sample: list[DocstringCandidate] = []
    # Rejection sampling: almost every draw is eligible; the bound keeps a pathological corpus finite.
    for _ in range(20 * n_candidates):
        if len(sample) == n_candidates:
            break
        other = candidates[rng.randrange(len(candidates))]
        if eligible(other) and other not in sample:
            sample.append(other)
    if not sample:  # few eligible left: scan them all (path order) before giving up
        sample = [c for c in candidates if eligible(c)][:n_candidates]
    if not sample:
        return None
    return min(sample, key=lambda o: abs(len(o.summary) - len(cand.summary)))


@functools.lru_cache(maxsize=4)
def docstring_candidates(stdlib: str) -> tuple[DocstringCandidate, ...]:
    """All usable (name, module, summary) under the stdlib directory `stdlib`, ordered by relative path."""
    root = Path(stdlib)
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(p in _SKIP_DIRS or p.startswith("config-") for p in rel.parts[:-1]):
            continue
        module = _module_name(rel)
        if module is not None and path.is_file():
            files.append((rel.as_posix(), module, path))
    files.sort()
    found: dict[str, DocstringCandidate] = {}
    for _, module, path in files:
        for name, summary in _public_summaries(path):
            qualified = f"{module}.{name}"
            if qualified not in found:
                found[qualified] = DocstringCandidate(qualified, module, summary)
    counts: dict[str, int] = {}
    for cand in found.values():
        counts[cand.summary] = counts.get(cand.summary, 0) + 1
    return tuple(c for c in found.values() if counts[c.summary] == 1)


def _module_name(rel: Path) -> str | None:
    """Import path of a stdlib file (`json/__init__.py` -> `json`), None for a private or unimportable one."""
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if not parts or any(p.startswith("_") or not p.isidentifier() for p in parts):
        return None
    if parts[0] in _SKIP_MODULES:
        return None
    module = ".".join(parts)
    return _MODULE_ALIASES.get(module, module)


def _public_summaries(path: Path) -> list[tuple[str, str]]:
    """(function name, summary) for the public module-level functions of one file with a usable summary."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):  # e.g. lib2to3 test data; null bytes
        return []
    exported = _literal_all(tree)
    out = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
            continue
        if exported is not None and node.name not in exported:
            continue
        if any(_decorator_name(d).startswith("_") for d in node.decorator_list):
            continue  # e.g. typing's `@_SpecialForm def NoReturn`: not a function any more
        summary = docstring_summary(ast.get_docstring(node), node.name)
        if summary is not None:
            out.append((node.name, summary))
    return out


def _decorator_name(node: ast.expr) -> str:
    """Last dotted part of a decorator (`@a.b(...)` -> `b`), "" when it is no plain name."""
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def _literal_all(tree: ast.Module) -> frozenset[str] | None:
    """Names in a module-level `__all__ = [...]` of string literals; None without one (or when computed)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                return None
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                return frozenset(value)
            return None
    return None


_DEPRECATED = re.compile(r"\b(deprecated|obsolete)\b", re.IGNORECASE)
# A summary opening with a call signature, `dumps(obj) -> str` or `os.path.join(a, *p)`.
_SIGNATURE = re.compile(r"[\w.]+\s*\(")


def docstring_summary(doc: str | None, name: str) -> str | None:
    """First paragraph of `doc` with whitespace collapsed, or None when it does not read as a sentence."""
    if not doc:
        return None
    first = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    summary = " ".join(first.split())
    if not MIN_SUMMARY_CHARS <= len(summary) <= MAX_SUMMARY_CHARS:
        return None
    if not summary[0].isalpha() or summary.endswith(":") or ">>>" in summary or "->" in summary:
        return None
    if _SIGNATURE.match(summary) or _DEPRECATED.search(summary):
        return None
    return summary
