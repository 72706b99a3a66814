"""The asymmetry report: the paper's table, trajectories and a verdict per claim, from saved files.

Reads ``RUN/pretrain/metrics.jsonl`` and ``RUN/align/{objective}/metrics.jsonl`` (the last
geometry row of each run is the final cumulative delta of that phase) and writes
``RUN/report/report.md`` with PNG plots, ``verdicts.json`` (one entry per claim of
harness/reports/claims.py) and ``health.json`` (harness/reports/health.py). Every verdict is computed from the
numbers with the rules in harness/reports/claims.py, which the report prints next to it; nothing assumes
the paper is right.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from weightgeom.harness.reports.claims import (
    CONCENTRATED,
    CONTROL_ROLES,
    GRADE_DROP,
    GRADE_RHO,
    NEAR_ISOTROPIC,
    READ_ROLES,
    SPECIFIC_EXCESS,
    SPECIFIC_SPREAD,
    Z_MIN,
    specificity,
    verdicts,
)
from weightgeom.harness.reports.evidence import INIT_DELTA, WriteEvidence, write_evidence
from weightgeom.harness.reports.health import check_phase, health_block, health_json
from weightgeom.harness.reports.markdown import fmt, markdown_table, metrics_doc_link
from weightgeom.harness.reports.phases import PRETRAIN, Phase, load_phases, mean_over, read_config
from weightgeom.harness.reports.plots import (
    plot_phase_trajectories,
    plot_rsf_over_steps,
    plot_training_curves,
    plot_write_evidence,
)
from weightgeom.harness.reports.run_report import THRESHOLDS, training_table
from weightgeom.harness.reports.summary import PhaseFiles, n_eval_pairs, pairs_per_step, summary_section
from weightgeom.hooks import keys
from weightgeom.hooks.roles import ROLES, WRITE_ROLES


def asymmetry_table(phases: list[Phase]) -> str:
    header = ["objective", "role", "RSF_in (C_a)", "z_in", "gap_in", "RSF_out (pred)", "z_out_pred",
              "RSF_out (C_delta)", "z_out_delta", "gap_out_delta"]
    rows = []
    for p in phases:
        f = p.final
        for r in ROLES:
            if not any(keys.layer_mean(prefix, r) in f for prefix in keys.RSF_FAMILIES):
                continue  # role not tracked, or nothing written to it in this phase
            gaps_in = _layer_mean(f, "gap_in", r)
            gaps_out = _layer_mean(f, "gap_out_delta", r)
            rows.append([p.name, r, f.get(keys.layer_mean("rsf_in", r)), f.get(keys.layer_mean("z_in", r)), gaps_in,
                         f.get(keys.layer_mean("rsf_out_pred", r)), f.get(keys.layer_mean("z_out_pred", r)),
                         f.get(keys.layer_mean("rsf_out_delta", r)), f.get(keys.layer_mean("z_out_delta", r)),
                         gaps_out])
    return markdown_table(header, rows)


def specificity_table(phases: list[Phase]) -> str:
    """Per objective: relative RSF_in of the read pathway and of its controls, and the specificity rule."""
    header = ["objective", *READ_ROLES, *CONTROL_ROLES, "read mean", "controls mean", "controls sd", "excess",
              "specific"]
    rows = []
    for p in phases:
        s = specificity(p)
        if not (s.read or s.controls):
            continue
        rows.append([p.name, *(s.read.get(r) for r in READ_ROLES), *(s.controls.get(r) for r in CONTROL_ROLES),
                     s.read_mean, s.control_mean, s.control_sd, s.excess,
                     {True: "yes", False: "no", None: "not measured"}[s.specific]])
    return markdown_table(header, rows)


def per_layer_table(phases: list[Phase], prefix: str) -> str:
    layers = sorted({found[0] for p in phases for k in p.final if (found := keys.layer_of(k, prefix))})
    header = ["objective", "role"] + [f"L{i}" for i in layers]
    rows = []
    for p in phases:
        for r in ROLES:
            vals = [p.final.get(keys.metric(prefix, i, r)) for i in layers]
            if any(v is not None for v in vals):
                rows.append([p.name, r] + vals)
    return markdown_table(header, rows)


def spikiness_table(phases: list[Phase], k: int | None) -> str:
    """Spikiness of every covariance, mean over layers; the top-k column is named with the run's k."""
    header = ["objective", "covariance", "top-1 share", f"top-{k if k else 'k'} share", "participation ratio",
              "effective rank"]
    rows = []
    for p in phases:
        f = p.final
        names = sorted({parsed.name for k in f
                        if (parsed := keys.parse(k)) and parsed.family in ("spike_in", "spike_out")})
        for side in ("spike_in", "spike_out"):
            for name in names:
                stats = [_layer_mean(f, side, name, s) for s in ("top1", "topk", "pr", "erank")]
                if not any(v is not None for v in stats):
                    continue
                label = ("C_a " if side == "spike_in" else "C_delta ") + name
                rows.append([p.name, label] + stats)
    return markdown_table(header, rows)


def _layer_mean(row: dict, prefix: str, name: str, stat: str | None = None) -> float | None:
    """Mean over layers of ``{prefix}/L{i}/{name}[/{stat}]`` in ``row`` (None when absent)."""
    vals = []
    for k, v in row.items():
        parsed = keys.parse(k)
        if (parsed and parsed.family == prefix and parsed.layer is not None and parsed.name == name
                and parsed.stat == stat and v is not None):
            vals.append(v)
    return sum(vals) / len(vals) if vals else None


def _trajectory(phase: Phase, prefix: str, roles: tuple[str, ...]) -> list[tuple[int, float]]:
    return [(r["step"], m) for r in phase.rows if not math.isnan(m := mean_over(r, prefix, roles))]


def phase_health(run_dir: Path, cfg: dict, phases: list[Phase]):
    warnings, notes = [], []
    for p in phases:
        alignment = p.kind != "ce"
        w, n = check_phase(p.rows, p.name, alignment=alignment,
                           pairs_per_step=pairs_per_step(cfg) if alignment else None,
                           n_eval_pairs=n_eval_pairs(run_dir, p.path) if alignment and p.path else None,
                           grade=p.grade)
        warnings += w
        notes += n
    return warnings, notes


def write_asymmetry_report(run_dir: Path, out_dir: Path | None = None, sections: Sequence[str] = ()) -> Path:
    """RUN/report/: report.md (summary, health, verdicts, tables, curves, trajectories, then ``sections``:
    Markdown lines of later stages, e.g. the rank-1 section that ``harness.pipeline.write_report`` passes),
    verdicts.json, health.json and the PNGs, from the files a pipeline run saved."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir or run_dir / "report")
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = read_config(run_dir)
    phases = load_phases(run_dir)
    evidence = write_evidence(run_dir, cfg, phases)
    found = verdicts(phases, evidence)
    warnings, notes = phase_health(run_dir, cfg, phases)
    k = (cfg.get("instruments") or {}).get("k")
    lines = _intro(run_dir, out_dir, k)
    lines += summary_section(run_dir, cfg, [PhaseFiles(p.name, p.path or run_dir, p.rows, p.kind != "ce")
                                            for p in phases])
    lines += health_block(warnings, notes)
    lines += _verdict_section(found, warnings)
    pretrain = PRETRAIN if any(p.name == PRETRAIN for p in phases) else None
    lines += _evidence_section(phases, evidence, out_dir, run_dir, k, pretrain)
    lines += _tables(phases, k)
    lines += _curves_section(phases, out_dir, pretrain)
    lines += _trajectory_section(phases, out_dir, pretrain)
    lines += list(sections)
    (out_dir / "report.md").write_text("\n".join(lines))
    (out_dir / "verdicts.json").write_text(json.dumps([asdict(v) for v in found], indent=2))
    (out_dir / "health.json").write_text(health_json(warnings, notes))
    return out_dir / "report.md"


def _intro(run_dir: Path, out_dir: Path, k: int | None) -> list[str]:
    return [f"# Where pretraining writes and alignment reads: {run_dir.name}", "",
            "Relative RSF = RSF / (k / dim); 1.0 is isotropic. Input side against the top-k eigenvectors of the "
            "objective's own `C_a`; output side against the prediction subspace (top-k right singular vectors "
            "of `W_U diag(g)`, with `W_U` and `g` taken at each phase's last step) and against the top-k of the "
            "objective's own `C_delta`. Values are the cumulative weight delta of each phase at its last step, "
            "averaged over layers; exact z-scores against Haar-random k-subspaces; `gap` is the eigengap "
            f"(l_k - l_{{k+1}}) / l_k of the subspace used; k = {k if k else 'not recorded'}. Definitions: "
            f"{metrics_doc_link(out_dir)}.", ""]


def _verdict_section(found: list, warnings: list) -> list[str]:
    lines = ["## Verdicts", ""]
    if warnings:
        lines += [f"Read these with the health warning{'s' if len(warnings) > 1 else ''} above (phases: "
                  f"{', '.join(dict.fromkeys(w.phase for w in warnings))}).", ""]
    for v in found:
        lines += [f"- **{v.status}**: {v.claim}. {v.evidence}. Rule: {v.rule}."]
        if v.basis:
            curve = ", ".join(f"k={kk}: {fmt(value)}" for kk, value in sorted(v.curve.items()))
            lines += [f"  - Rests on {v.basis}." + (f" Its k-curve (mean of o, down): {curve}." if curve else "")]
    return lines + ["", f"Thresholds: concentrated = relative RSF > {CONCENTRATED} and z > {Z_MIN}; near-isotropic = "
                    f"relative RSF < {NEAR_ISOTROPIC}; specific = read-pathway mean above the controls' mean by more "
                    f"than {SPECIFIC_EXCESS} and by more than {SPECIFIC_SPREAD:g} x the controls' sd; grade "
                    f"dependence = Spearman rho <= {GRADE_RHO} and a drop >= {GRADE_DROP} from g=0 to g=1. A claim "
                    "whose numbers or comparison are missing or non-finite is NOT MEASURED.", ""]


def _evidence_section(phases: list[Phase], ev: WriteEvidence, out_dir: Path, run_dir: Path, k: int | None,
                      pretrain: str | None) -> list[str]:
    """The write side's evidence, each with its k-curves: (i) every phase's own delta, (ii) the whole pretraining
    delta of the starting checkpoint against init, (iii) every phase's C_delta mass (harness/reports/evidence.py)."""
    lines = ["## The write side's evidence", "",
             "The write-side verdicts above each rest on one of: **(i)** a phase's own cumulative delta (relative "
             "RSF_out against the prediction subspace); **(ii)** the whole pretraining delta of the checkpoint the run "
             "started from, against random initialisations of its config (`harness compare init`); **(iii)** the "
             "mechanism: the relative mass of a phase's own `C_delta` (its loss's per-token `delta` at o and down) in "
             "the prediction subspace (1.0 = no preference, as for RSF). Values are means over layers, against k.", ""]
    rows = []
    for p in phases:
        for role in WRITE_ROLES:
            curve = (ev.delta_curves.get(p.name) or {}).get(role)
            if curve:
                rows.append([p.name, role, *(curve.get(kk) for kk in _ks(ev))])
    if rows:
        lines += ["### (i) each phase's own delta: relative RSF_out(pred) against k", "",
                  markdown_table(["phase", "role", *(f"k={kk}" for kk in _ks(ev))], rows), ""]
    lines += ["### (ii) the whole pretraining delta against random initialisations", ""]
    pre = ev.pretraining
    if pre is not None:
        ks = sorted({kk for c in pre.curves.values() for kk in c})
        table = [[role, *(f"{fmt(c[kk][0])} ± {fmt(c[kk][1])}" if kk in c else "-" for kk in ks)]
                 for role, c in pre.curves.items()]
        lines += [f"{pre.start} minus random initialisations of its config (seeds {', '.join(map(str, pre.seeds))}; "
                  f"mean ± sd over seeds): relative RSF_out(pred) against k. Every number: "
                  f"[{INIT_DELTA}/report.md](../{INIT_DELTA}/report.md).", "",
                  markdown_table(["role", *(f"k={kk}" for kk in ks)], table), ""]
    elif ev.start:
        lines += [f"Not measured: the run started from {ev.start}, whose pretraining delta against init is written by "
                  f"the pipeline to `{INIT_DELTA}/` (or `harness compare init {ev.start} --out "
                  f"{run_dir / INIT_DELTA}`).", ""]
    else:
        lines += ["Not needed: the model was trained from a random initialisation, so the CE phase's delta (i) is the "
                  "whole pretraining delta.", ""]
    rows = []
    for p in phases:
        for role in WRITE_ROLES:
            value = p.final.get(keys.layer_mean("mass_pred", role))
            z = p.final.get(keys.layer_mean("mass_pred_z", role))
            curve = (ev.mass_curves.get(p.name) or {}).get(role) or {}
            if value is not None or curve:
                rows.append([p.name, role, value, z, *(curve.get(kk) for kk in _ks(ev))])
    lines += ["### (iii) the mechanism: C_delta's mass in the prediction subspace", ""]
    if rows:
        lines += [f"The live `mass_pred` at each phase's last step (k = {k if k else 'not recorded'}), its z against "
                  "Haar-random subspaces, and its k-curve from the final snapshot.", "",
                  markdown_table(["phase", "role", "mass", "z", *(f"k={kk}" for kk in _ks(ev))], rows), ""]
    else:
        lines += ["Not measured: the phases' rows hold no `mass_pred` (a run from before the live metric).", ""]
    init_curves = pre.curves if pre is not None else None
    path = plot_write_evidence(ev.delta_curves, init_curves, ev.mass_curves, out_dir / "write_evidence.png",
                               "the write side's evidence against k (mean over layers)", pretrain=pretrain)
    if path is not None:
        lines += ["![write-side evidence](write_evidence.png)", ""]
    if ev.notes:
        lines += [f"- {note}" for note in ev.notes] + [""]
    return lines


def _ks(ev: WriteEvidence) -> list[int]:
    found = {kk for curves in (*ev.delta_curves.values(), *ev.mass_curves.values()) for c in curves.values()
             for kk in c}
    return sorted(found)


def _tables(phases: list, k: int | None) -> list[str]:
    return ["## The asymmetry table (mean over layers)", "", asymmetry_table(phases), "",
            "## Read pathway against its controls (relative RSF_in, mean over layers)", "",
            "The controls read the same input as q and k (v) or the MLP's input (gate, up). The read-side "
            "concentration is specific to the read pathway only if q and k stand above them.", "",
            specificity_table(phases), "",
            "## Per layer: relative RSF_in", "", per_layer_table(phases, "rsf_in"), "",
            "## Per layer: relative RSF_out against the prediction subspace", "",
            per_layer_table(phases, "rsf_out_pred"), "",
            "## Spikiness of the covariances (mean over layers)", "", spikiness_table(phases, k), ""]


def _curves_section(phases: list, out_dir: Path, pretrain: str | None) -> list[str]:
    curves = plot_training_curves([(p.name, p.rows) for p in phases], out_dir / "training.png",
                                  "loss and preference accuracy of every phase", pretrain=pretrain)
    if not curves:
        return []
    lines = ["## Training curves", "", "![training curves](training.png)", ""]
    for p in phases:
        table = training_table(p.rows, throughput=False)  # the same files give the same report
        if table:
            lines += [f"### {p.name}", "", table, ""]
    return lines


def _trajectory_section(phases: list, out_dir: Path, pretrain: str | None) -> list[str]:
    lines = ["## Trajectories (cumulative delta vs step)", "",
             "The within-checkpoint trajectory: pretraining (black, left panel) and every alignment run from its "
             "final checkpoint (right panel, its own steps), each measured against its own phase-start weights. "
             "Dashed gray: isotropic (1.0); dotted red: the verdicts' threshold.", ""]
    for prefix, lines_of, label in (
            ("rsf_in", {"q, k (read)": READ_ROLES, "v, gate, up (controls)": CONTROL_ROLES},
             "read pathway (solid) and controls (dashed): relative RSF_in vs C_a"),
            ("rsf_out_pred", {"o, down (write)": WRITE_ROLES},
             "write pathway (o, down): relative RSF_out vs prediction subspace")):
        series = [(p.name, {name: _trajectory(p, prefix, roles) for name, roles in lines_of.items()}) for p in phases]
        if any(points for _, by_line in series for points in by_line.values()):
            name = f"trajectory_{prefix}.png"
            plot_phase_trajectories(series, out_dir / name, label, "relative RSF (mean over roles, layers)",
                                    pretrain=pretrain, thresholds=THRESHOLDS[prefix])
            lines += [f"![trajectory {prefix}]({name})", ""]
    for prefix in ("rsf_in", "rsf_out_pred"):
        for p in phases:
            if not any(keys.layer_of(k, prefix) and isinstance(v, float) and math.isfinite(v)
                       for r in p.rows for k, v in r.items()):
                continue
            safe = p.name.split(" ")[0].replace("/", "_")
            path = plot_rsf_over_steps(p.rows, prefix=prefix, out_path=out_dir / f"{prefix}_{safe}.png",
                                       title=f"{prefix} over steps: {p.name}", thresholds=THRESHOLDS[prefix])
            lines.append(f"![{prefix} {p.name}]({Path(path).name})")
    return lines + [""]

