"""The phases of a pipeline run, read back from its saved files.

A pipeline directory holds ``RUN/pretrain/`` (CE pretraining, absent when the run aligned a model
from ``init_from``) and ``RUN/align/{objective}/`` (one run per alignment objective). Each is a
:class:`Phase`: its name, what kind of objective it ran, where that objective sits on the graded
contrastive axis, its metric rows and its directory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from weightgeom.core.config import saved_objective
from weightgeom.core.sinks import read_metrics
from weightgeom.hooks import keys

PRETRAIN = "pretrain (CE)"  # the pretraining phase's name in reports


def final_geometry(rows: list[dict]) -> dict:
    """The last row that holds geometry metrics (the forced compute at the run's last step)."""
    for row in reversed(rows):
        if any(keys.family(k) in keys.RSF_FAMILIES for k in row):
            return row
    return {}


@dataclass
class Phase:
    name: str  # PRETRAIN or an objective name
    kind: str  # "ce", or the objective's loss: "trl", "graded", "mixture", "dpo", "likelihood"
    grade: float | None  # where the objective sits on the graded axis (1 = DPO); None: not on it
    rows: list[dict]
    path: Path | None = None  # the phase's run directory (config.yaml, metrics.jsonl, checkpoints/)

    @property
    def final(self) -> dict:
        """Last row holding geometry (the forced compute at the phase's last step)."""
        return final_geometry(self.rows)


def read_config(run_dir: Path) -> dict:
    """``RUN/config.yaml`` as a dict ({} when the file is absent)."""
    path = Path(run_dir) / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def load_phases(run_dir: Path) -> list[Phase]:
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    objectives = {o["name"]: saved_objective(o) for o in (cfg.get("align", {}) or {}).get("objectives", [])}
    phases = []
    if (run_dir / "pretrain" / "metrics.jsonl").is_file():
        phases.append(Phase(PRETRAIN, "ce", None, read_metrics(run_dir / "pretrain" / "metrics.jsonl"),
                            run_dir / "pretrain"))
    for path in sorted((run_dir / "align").glob("*/metrics.jsonl")):
        name = path.parent.name
        obj = objectives.get(name) or saved_objective({"name": name})
        phases.append(Phase(name, obj.loss, obj.contrast_grade(), read_metrics(path), path.parent))
    if not phases:
        raise FileNotFoundError(f"{run_dir} has no pretrain/metrics.jsonl or align/*/metrics.jsonl; "
                                "run an asymmetry recipe first: `harness run recipes/asymmetry.yaml`")
    return phases


def role_means(row: dict, prefix: str, roles: tuple[str, ...]) -> dict[str, float]:
    """``{role: row["{prefix}/all/{role}"]}`` for the roles whose layer mean the row holds
    (non-finite values included: callers decide what a NaN means)."""
    return {r: row[keys.layer_mean(prefix, r)] for r in roles if row.get(keys.layer_mean(prefix, r)) is not None}


def mean_over(row: dict, prefix: str, roles: tuple[str, ...]) -> float:
    """Mean of ``{prefix}/all/{role}`` over the ``roles`` the row holds; NaN when it holds none, and
    non-finite when any of them is (a diverged phase never averages into a finite number)."""
    vals = list(role_means(row, prefix, roles).values())
    return sum(vals) / len(vals) if vals else math.nan
