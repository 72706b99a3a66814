"""Markdown building blocks shared by every report (run, asymmetry, scale, compare, rank-1)."""

from __future__ import annotations

import math
import os
from pathlib import Path

# The repository's docs/metrics.md (resolved through the weightgeom/ links to the real folder).
METRICS_DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def fmt(value) -> str:
    """3 significant figures; ``-`` for a missing value, ``NaN`` / ``inf`` / ``-inf`` for a non-finite one."""
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def metrics_doc_link(out_dir: Path) -> str:
    """A Markdown link from ``out_dir`` to this repository's docs/metrics.md (relative, so the same
    files give the same report), or the document's name when the sources are not installed beside."""
    if METRICS_DOC.is_file():
        return f"[docs/metrics.md]({Path(os.path.relpath(METRICS_DOC, Path(out_dir).resolve())).as_posix()})"
    return "docs/metrics.md (in the harness's source repository)"
