"""The report of one run (a pretraining or a single alignment run), from its saved files only.

Reads ``RUN/config.yaml``, ``RUN/metrics.jsonl``, the newest ``RUN/instruments/*.safetensors`` (and,
for the summary, ``RUN/run_info.json`` and the newest checkpoint's ``config.json`` and
``model.safetensors`` header) and writes ``RUN/report/report.md`` with PNG plots and
``health.json`` beside it:

* the run summary (model, parameters, seed, k, versions, steps and tokens or pairs seen);
* the health block (memorisation, preference accuracy at chance, non-finite values; harness/reports/health.py);
* training curves (loss, held-out loss, preference accuracy when present);
* the final relative RSF per layer and role (input side vs ``C_a``; output side vs the prediction
  subspace and vs ``C_delta``), with z-scores against random subspaces;
* relative RSF of each role over steps (the within-run trajectory of the cumulative delta);
* covariance spectra and the relative-RSF-vs-k curve, recomputed from the snapshot tensors.

Pipelines (pretrain + alignment objectives) get the asymmetry report in harness/reports/asymmetry.py.
Definitions of every number: docs/metrics.md; the report's sections and rules: docs/reports.md.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from weightgeom.core.config import saved_objective
from weightgeom.core.sinks import read_metrics
from weightgeom.harness.reports.claims import CONCENTRATED, NEAR_ISOTROPIC
from weightgeom.harness.reports.health import (
    check_phase,
    health_block,
    health_json,
    is_finite,
    snapshot_non_finite,
    snapshot_warning,
)
from weightgeom.harness.reports.markdown import markdown_table, metrics_doc_link
from weightgeom.harness.reports.phases import final_geometry, read_config
from weightgeom.harness.reports.plots import (
    ISOTROPIC,
    plot_rsf_k_curve,
    plot_rsf_over_steps,
    plot_spectra,
    plot_training_curves,
)
from weightgeom.harness.reports.summary import PhaseFiles, n_eval_pairs, pairs_per_step, summary_section
from weightgeom.hooks import geometry as geo
from weightgeom.hooks import keys
from weightgeom.hooks.roles import GROUP_OF_ROLE, ROLES

FAMILIES = (("rsf_in", "z_in", "input side vs top-k of C_a"),
            ("rsf_out_pred", "z_out_pred", "output side vs the prediction subspace"),
            ("rsf_out_delta", "z_out_delta", "output side vs top-k of C_delta"))
# The lines drawn on each family's plots: the isotropic level and the verdicts' thresholds (harness/reports/claims.py).
THRESHOLDS = {"rsf_in": (ISOTROPIC, (CONCENTRATED, f"concentrated above ({CONCENTRATED:g})")),
              "rsf_out_pred": (ISOTROPIC, (NEAR_ISOTROPIC, f"concentrated above / near-isotropic below "
                                                           f"({NEAR_ISOTROPIC:g})")),
              "rsf_out_delta": (ISOTROPIC,)}


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


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def k_curves(state: dict, ks: list[int]) -> dict[str, tuple[list[int], list[float]]]:
    """Relative RSF_in of each role's cumulative delta against the top-k of its ``C_a``, for every
    k in ``ks``, averaged over layers. From the snapshot's ``curve_in/L{i}/{r}/{energy,sq_norm}`` (the
    delta's energy along each top eigenvector of ``C_a``, recorded by the phase's last metric computation),
    or, in a snapshot written before those existed, recomputed from its ``weights/L{i}/{r}/delta``. Layers
    whose numbers hold a NaN or inf are left out (health.snapshot_non_finite names them)."""
    per_role: dict[str, list[dict[int, float]]] = defaultdict(list)
    for key in state:
        parsed = keys.parse_state_key(key)
        if parsed is None:
            continue
        family, layer, role, field = parsed
        if family == keys.CURVE_IN and field == "energy":
            curve = _recorded_curve(state, keys.matrix_key(layer, role), ks)
        elif family == keys.WEIGHTS and field == "delta":
            curve = _legacy_curve(state, key, layer, role, ks)
        else:
            continue
        if curve:
            per_role[role].append(curve)
    curves = {}
    for role in ROLES:
        if per_role.get(role):
            common = sorted(set.intersection(*(set(c) for c in per_role[role])))
            curves[role] = (common, [sum(c[k] for c in per_role[role]) / len(per_role[role]) for k in common])
    return curves


def _recorded_curve(state: dict, matrix: str, ks: list[int]) -> dict[int, float]:
    energy = state[keys.state_key(keys.CURVE_IN, matrix, "energy")].double()
    total = state[keys.state_key(keys.CURVE_IN, matrix, "sq_norm")].double()
    group = keys.matrix_key(int(matrix.split("/")[0][1:]), GROUP_OF_ROLE.get(matrix.split("/")[1], ""))
    cov = state.get(keys.state_key("cov_in", group, "sum_outer"))
    n = cov.shape[0] if cov is not None else None
    if n is None or not (_finite(energy) and _finite(total)) or float(total) <= 0:
        return {}
    cumulative = torch.cumsum(energy, 0)
    return {k: float(cumulative[k - 1] / total) * n / k for k in ks if k <= energy.shape[0] and k < n}


def _legacy_curve(state: dict, key: str, layer: int, role: str, ks: list[int]) -> dict[int, float]:
    cov_key = keys.state_key("cov_in", keys.matrix_key(layer, GROUP_OF_ROLE.get(role, "")), "sum_outer")
    if cov_key not in state or not (_finite(state[key]) and _finite(state[cov_key])):
        return {}
    dW = state[key].double()
    _, evecs = geo.sym_eigh(state[cov_key].double())
    usable = [k for k in ks if k < dW.shape[1]]
    return geo.rsf_curve(dW, evecs, usable, side="in") if usable and dW.norm() > 0 else {}


def training_table(rows: list[dict], throughput: bool = True) -> str | None:
    """First, minimum and last finite value of each loss / accuracy key the rows hold (and of
    ``train/tokens_per_s`` with ``throughput``: a wall-clock number, different on every run)."""
    names = ("train/loss", "eval/loss", "pref/loss", "eval/pref_loss", "pref/accuracy", "eval/pref_accuracy",
             "pref/margin", "eval/pref_margin") + (("train/tokens_per_s",) if throughput else ())
    body = []
    for name in names:
        values = [r[name] for r in rows if is_finite(r.get(name))]
        if values:
            body.append([name, float(values[0]), float(min(values)), float(values[-1]), len(values)])
        elif any(name in r for r in rows):
            body.append([name, math.nan, math.nan, math.nan, 0])
    return markdown_table(["metric", "first", "min", "last", "finite points"], body) if body else None


def _objective_grade(cfg: dict, name: str) -> float | None:
    for o in (cfg.get("align") or {}).get("objectives") or []:
        if o.get("name") == name:
            return saved_objective(o).contrast_grade()
    return None


def write_run_report(run_dir: Path, out_dir: Path | None = None) -> Path:
    run_dir = Path(run_dir)
    out_dir = Path(out_dir or run_dir / "report")
    rows = read_metrics(run_dir / "metrics.jsonl")
    cfg = read_config(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = final_geometry(rows)
    phase = str(rows[-1].get("phase", run_dir.name)) if rows else run_dir.name
    alignment = phase.startswith("align") or any(keys.family(k) == "pref" for r in rows for k in r)
    inst = cfg.get("instruments", {}) or {}

    snapshots = sorted((run_dir / "instruments").glob("step_*.safetensors"))
    state = load_file(str(snapshots[-1])) if snapshots else {}
    bad = snapshot_non_finite(state)
    warnings, notes = check_phase(rows, phase, alignment=alignment,
                                  pairs_per_step=pairs_per_step(cfg) if alignment else None,
                                  n_eval_pairs=n_eval_pairs(run_dir, run_dir) if alignment else None,
                                  grade=_objective_grade(cfg, run_dir.name) if alignment else None)
    warnings += snapshot_warning(bad, phase, snapshots[-1].name if snapshots else "")

    lines = [f"# Run report: {run_dir.name}", "",
             f"Phase `{phase}`. Relative RSF = RSF / (k / dim) with k = {inst.get('k', '?')}: 1.0 is what an "
             "isotropic delta scores. Values are for the cumulative weight delta since the run's start; z-scores "
             "compare it with Haar-random k-subspaces (exact, closed form). Everything below is read from the "
             "run's saved "
             f"files. Definitions: {metrics_doc_link(out_dir)}.", ""]
    lines += summary_section(run_dir, cfg, [PhaseFiles(phase, run_dir, rows, alignment)])
    lines += health_block(warnings, notes)

    if plot_training_curves([(phase, rows)], out_dir / "training.png", f"training curves: {run_dir.name}"):
        lines += ["## Training", "", "![training curves](training.png)", "", training_table(rows) or "", ""]

    if final:
        lines += [f"## Relative RSF at step {final['step']}", ""]
        for prefix, zprefix, meaning in FAMILIES:
            if any(keys.layer_of(k, prefix) for k in final):
                lines += [f"### `{prefix}`: {meaning}", "", rsf_table(final, prefix, zprefix), ""]
        lines += ["## Trajectories", "",
                  "Per role, one line per layer; dashed gray: the isotropic level 1.0; dotted red: the verdicts' "
                  "threshold (harness/reports/claims.py).", ""]
        for prefix, _, meaning in FAMILIES:
            if any(keys.layer_of(k, prefix) and is_finite(v) for r in rows for k, v in r.items()):
                plot_rsf_over_steps(rows, prefix, out_dir / f"{prefix}.png", f"{prefix}: {meaning}",
                                    thresholds=THRESHOLDS[prefix])
                lines += [f"![{prefix}]({prefix}.png)", ""]
    else:
        lines += ["No geometry metrics were logged (instruments disabled, or the run stopped before the "
                  "first scheduled compute).", ""]

    if snapshots:
        lines += [f"## Covariance spectra ({snapshots[-1].name})", ""]
        if bad:
            lines += [f"Non-finite tensors in this snapshot, left out below: {', '.join(bad)}.", ""]
        try:
            plot_spectra(state, out_dir / "spectra.png", title=f"covariance spectra, {snapshots[-1].stem}")
            lines += ["![spectra](spectra.png)", ""]
        except ValueError as err:
            lines += [f"No spectra plotted: {err}.", ""]
        curves_k = k_curves(state, list(inst.get("k_curve") or [1, 2, 4, 8, 16, 32]))
        if curves_k:
            plot_rsf_k_curve(curves_k, out_dir / "rsf_k_curve.png", "relative RSF_in vs k (mean over layers)")
            lines += ["## Relative RSF_in against k", "", "![rsf vs k](rsf_k_curve.png)", "",
                      markdown_table(["role"] + [f"k={k}" for k in next(iter(curves_k.values()))[0]],
                                     [[role] + vals for role, (_, vals) in curves_k.items()]), ""]
    (out_dir / "report.md").write_text("\n".join(lines))
    (out_dir / "health.json").write_text(health_json(warnings, notes))
    return out_dir / "report.md"
