"""The report of one run (a pretraining or a single alignment run), from its saved files only.

Reads ``RUN/config.yaml``, ``RUN/metrics.jsonl`` and the newest ``RUN/instruments/*.safetensors``
and writes ``RUN/report/report.md`` with PNG plots beside it:

* training curves (loss, eval loss, preference accuracy when present);
* the final relative RSF per layer and role (input side vs ``C_a``; output side vs the prediction
  subspace and vs ``C_delta``), with z-scores against random subspaces;
* relative RSF of each role over steps (the within-run trajectory of the cumulative delta);
* covariance spectra and the relative-RSF-vs-k curve, recomputed from the snapshot tensors.

Pipelines (pretrain + alignment objectives) get the asymmetry report in harness/asymmetry.py.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import yaml
from safetensors.torch import load_file

from hooks import geometry as geo
from core.sinks import read_metrics
from harness.plots import plot_rsf_k_curve, plot_rsf_over_steps, plot_series, plot_spectra
from hooks import keys
from hooks.roles import GROUP_OF_ROLE, ROLES

FAMILIES = (("rsf_in", "z_in", "input side vs top-k of C_a"),
            ("rsf_out_pred", "z_out_pred", "output side vs the prediction subspace"),
            ("rsf_out_delta", "z_out_delta", "output side vs top-k of C_delta"))


def fmt(value) -> str:
    """3 significant figures; ``-`` for missing or non-finite values."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def final_geometry(rows: list[dict]) -> dict:
    """The last row that holds geometry metrics (the forced compute at the run's last step)."""
    for row in reversed(rows):
        if any(keys.family(k) == "rsf_in" for k in row):
            return row
    return {}


def rsf_table(row: dict, prefix: str, zprefix: str) -> str:
    """Roles x layers (+ mean and its z-score) of one relative-RSF family."""
    layers = sorted({found[0] for k in row if (found := keys.layer_of(k, prefix))})
    header = ["role"] + [f"L{i}" for i in layers] + ["mean", "z (mean)"]
    body = []
    for role in ROLES:
        vals = [row.get(keys.metric(prefix, i, role)) for i in layers]
        if all(v is None for v in vals):
            continue
        body.append([role] + vals + [row.get(keys.layer_mean(prefix, role)), row.get(keys.layer_mean(zprefix, role))])
    return markdown_table(header, body)


def k_curves(state: dict, ks: list[int]) -> dict[str, tuple[list[int], list[float]]]:
    """Relative RSF_in of each role's cumulative delta against the top-k of its ``C_a``, for every
    k in ``ks``, averaged over layers (recomputed from snapshot tensors)."""
    per_role: dict[str, list[dict[int, float]]] = defaultdict(list)
    for key in state:
        parsed = keys.parse_state_key(key)
        if parsed is None or parsed[0] != "weights" or parsed[3] != "delta":
            continue
        _, layer, role, _ = parsed
        cov_key = keys.state_key("cov_in", keys.matrix_key(layer, GROUP_OF_ROLE.get(role, "")), "sum_outer")
        if cov_key not in state:
            continue
        dW = state[key].double()
        _, evecs = geo.sym_eigh(state[cov_key].double())
        usable = [k for k in ks if k < dW.shape[1]]
        if usable and dW.norm() > 0:
            per_role[role].append(geo.rsf_curve(dW, evecs, usable, side="in"))
    curves = {}
    for role in ROLES:
        if per_role.get(role):
            common = sorted(set.intersection(*(set(c) for c in per_role[role])))
            curves[role] = (common, [sum(c[k] for c in per_role[role]) / len(per_role[role]) for k in common])
    return curves


def write_run_report(run_dir: Path, out_dir: Path | None = None) -> Path:
    run_dir = Path(run_dir)
    out_dir = Path(out_dir or run_dir / "report")
    rows = read_metrics(run_dir / "metrics.jsonl")
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    out_dir.mkdir(parents=True, exist_ok=True)
    final = final_geometry(rows)
    last_step = rows[-1]["step"] if rows else 0
    inst = cfg.get("instruments", {}) or {}
    lines = [f"# Run report: {run_dir.name}", "",
             f"{last_step} optimizer steps; phase `{rows[-1].get('phase', '?') if rows else '?'}`. "
             f"Relative RSF = RSF / (k / dim) with k = {inst.get('k', '?')}: 1.0 is what an isotropic delta "
             "scores. Values are for the cumulative weight delta since the run's start; z-scores compare it "
             "with seeded Haar-random k-subspaces. Everything below is read from the run's saved files.", ""]

    curves = [k for k in ("train/loss", "eval/loss", "pref/loss", "eval/pref_loss") if any(k in r for r in rows)]
    if curves:
        plot_series(rows, curves, out_dir / "loss.png", "loss", "loss (per token / per pair)")
        lines += ["## Training", "", "![loss](loss.png)", ""]
        summary = [[k, next((r[k] for r in rows if k in r), None), next((r[k] for r in reversed(rows) if k in r), None)]
                   for k in curves + [k for k in ("pref/accuracy", "pref/margin", "train/tokens_per_s")
                                      if any(k in r for r in rows)]]
        lines += [markdown_table(["metric", "first", "last"], summary), ""]

    if final:
        lines += [f"## Relative RSF at step {final['step']}", ""]
        for prefix, zprefix, meaning in FAMILIES:
            if any(keys.layer_of(k, prefix) for k in final):
                lines += [f"### `{prefix}`: {meaning}", "", rsf_table(final, prefix, zprefix), ""]
        lines += ["## Trajectories", ""]
        for prefix, _, meaning in FAMILIES:
            if any(keys.layer_of(k, prefix) for r in rows for k in r):
                plot_rsf_over_steps(rows, prefix, out_dir / f"{prefix}.png", f"{prefix}: {meaning}")
                lines += [f"![{prefix}]({prefix}.png)", ""]
    else:
        lines += ["No geometry metrics were logged (instruments disabled, or the run stopped before the "
                  "first scheduled compute).", ""]

    snapshots = sorted((run_dir / "instruments").glob("step_*.safetensors"))
    if snapshots:
        state = load_file(str(snapshots[-1]))
        lines += [f"## Covariance spectra ({snapshots[-1].name})", ""]
        plot_spectra(state, out_dir / "spectra.png", title=f"covariance spectra, {snapshots[-1].stem}")
        lines += ["![spectra](spectra.png)", ""]
        curves_k = k_curves(state, list(inst.get("k_curve") or [1, 2, 4, 8, 16, 32]))
        if curves_k:
            plot_rsf_k_curve(curves_k, out_dir / "rsf_k_curve.png", "relative RSF_in vs k (mean over layers)")
            lines += ["## Relative RSF_in against k", "", "![rsf vs k](rsf_k_curve.png)", "",
                      markdown_table(["role"] + [f"k={k}" for k in next(iter(curves_k.values()))[0]],
                                     [[role] + vals for role, (_, vals) in curves_k.items()]), ""]
    (out_dir / "report.md").write_text("\n".join(lines))
    return out_dir / "report.md"
