"""The asymmetry report: the paper's table, trajectories and a verdict per claim, from saved files.

Reads ``RUN/pretrain/metrics.jsonl`` and ``RUN/align/{objective}/metrics.jsonl`` (the last
geometry row of each run is the final cumulative delta of that phase) and writes
``RUN/report/report.md`` with PNG plots. Every verdict is computed from the numbers with the
thresholds below, which the report prints; nothing assumes the paper is right.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from harness.plots import plot_phase_trajectories, plot_rsf_over_steps
from harness.rank1_report import rank1_section
from harness.report import final_geometry, markdown_table
from harness.sinks import read_metrics
from hooks.roles import ROLES, WRITE_ROLES

READ_ROLES = ("q", "k")  # the paper's read pathway (v, gate, up are comparisons)
# Thresholds (relative RSF: 1.0 = isotropic). Stated in the report next to every verdict.
CONCENTRATED = 2.0  # relative RSF above this, with z above Z_MIN, counts as concentrated
NEAR_ISOTROPIC = 2.0  # relative RSF below this counts as near-isotropic
Z_MIN = 3.0
GRADE_RHO = -0.5  # Spearman correlation of write-side RSF with the grade, at most this
GRADE_DROP = 0.25  # and the g=0 value above the g=1 value by at least this (relative RSF units)


@dataclass
class Phase:
    name: str  # "pretrain (CE)" or an objective name
    kind: str  # "ce", "trl", "graded", "mixture", "dpo", "likelihood"
    grade: float | None
    rows: list[dict]

    @property
    def final(self) -> dict:
        """Last row holding geometry (the forced compute at the phase's last step)."""
        return final_geometry(self.rows)


def load_phases(run_dir: Path) -> list[Phase]:
    run_dir = Path(run_dir)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    objectives = {o["name"]: o for o in (cfg.get("align", {}) or {}).get("objectives", [])}
    phases = []
    if (run_dir / "pretrain" / "metrics.jsonl").is_file():
        phases.append(Phase("pretrain (CE)", "ce", None, read_metrics(run_dir / "pretrain" / "metrics.jsonl")))
    for path in sorted((run_dir / "align").glob("*/metrics.jsonl")):
        name = path.parent.name
        obj = objectives.get(name, {})
        kind = obj.get("loss", "graded")
        grade = {"trl": 1.0, "dpo": 1.0, "likelihood": 0.0}.get(kind, obj.get("grade") if kind == "graded" else None)
        phases.append(Phase(name, kind, grade, read_metrics(path)))
    if not phases:
        raise FileNotFoundError(f"{run_dir} has no pretrain/metrics.jsonl or align/*/metrics.jsonl; "
                                "run an asymmetry recipe first: `harness run recipes/asymmetry.yaml`")
    return phases


def mean_over(row: dict, prefix: str, roles: tuple[str, ...]) -> float:
    vals = [row[f"{prefix}/all/{r}"] for r in roles if row.get(f"{prefix}/all/{r}") is not None]
    return sum(vals) / len(vals) if vals else math.nan


def spearman(x: list[float], y: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r

    if len(x) < 3:
        return math.nan
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else math.nan


@dataclass
class Verdict:
    claim: str
    held: bool | None  # None: not measurable on this run
    evidence: str


def verdicts(phases: list[Phase]) -> list[Verdict]:
    ce = next((p for p in phases if p.kind == "ce"), None)
    dpo = [p for p in phases if p.grade == 1.0 and p.kind in ("trl", "dpo", "graded")]
    out = []

    def fmt(v):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"

    if dpo:
        vals = [(p.name, mean_over(p.final, "rsf_in", READ_ROLES), mean_over(p.final, "z_in", READ_ROLES)) for p in dpo]
        held = all(v > CONCENTRATED and z > Z_MIN for _, v, z in vals)
        out.append(Verdict("Read pathway (W_Q, W_K) concentrates along the top C_a directions under alignment",
                           held, "; ".join(f"{n}: relative RSF_in {fmt(v)} (z {fmt(z)})" for n, v, z in vals)
                           + f"; held if > {CONCENTRATED} with z > {Z_MIN}"))
        vals = [(p.name, mean_over(p.final, "rsf_out_pred", WRITE_ROLES)) for p in dpo]
        ce_val = mean_over(ce.final, "rsf_out_pred", WRITE_ROLES) if ce else math.nan
        held = all(v < NEAR_ISOTROPIC and (math.isnan(ce_val) or v < ce_val) for _, v in vals)
        out.append(Verdict("Write pathway (W_O, W_down) stays near-isotropic w.r.t. the prediction subspace under "
                           "alignment", held, "; ".join(f"{n}: relative RSF_out(pred) {fmt(v)}" for n, v in vals)
                           + f" (CE: {fmt(ce_val)}); held if < {NEAR_ISOTROPIC} and below CE's"))
    else:
        out.append(Verdict("Read/write asymmetry under alignment", None, "no DPO-like objective (grade 1) in this run"))
    if ce:
        v = mean_over(ce.final, "rsf_out_pred", WRITE_ROLES)
        z = mean_over(ce.final, "z_out_pred", WRITE_ROLES)
        out.append(Verdict("CE pretraining writes prediction geometry: W_O / W_down deltas concentrate in the "
                           "unembedding's top subspace", v > CONCENTRATED and z > Z_MIN,
                           f"CE relative RSF_out(pred) {fmt(v)} (z {fmt(z)}); held if > {CONCENTRATED} with z > {Z_MIN}"))
    graded = sorted((p for p in phases if p.grade is not None and p.kind in ("graded", "dpo", "likelihood")),
                    key=lambda p: p.grade)
    if len(graded) >= 3:
        xs = [p.grade for p in graded]
        ys = [mean_over(p.final, "rsf_out_pred", WRITE_ROLES) for p in graded]
        rho, drop = spearman(xs, ys), ys[0] - ys[-1]
        out.append(Verdict("Grade dependence: the more contrastive the objective, the less write-side prediction "
                           "geometry", rho <= GRADE_RHO and drop >= GRADE_DROP,
                           ", ".join(f"g={x:g}: {fmt(y)}" for x, y in zip(xs, ys))
                           + f"; Spearman rho {fmt(rho)}, g0 - g1 = {fmt(drop)}; held if rho <= {GRADE_RHO} "
                             f"and drop >= {GRADE_DROP}"))
    else:
        out.append(Verdict("Grade dependence", None, "fewer than 3 graded objectives in this run"))
    return out


def asymmetry_table(phases: list[Phase]) -> str:
    header = ["objective", "role", "RSF_in (C_a)", "z_in", "gap_in", "RSF_out (pred)", "z_out_pred",
              "RSF_out (C_delta)", "z_out_delta", "gap_out_delta"]
    rows = []
    for p in phases:
        f = p.final
        for r in ROLES:
            if not any(f"{prefix}/all/{r}" in f for prefix in ("rsf_in", "rsf_out_pred", "rsf_out_delta")):
                continue  # role not tracked, or nothing written to it in this phase
            gaps_in = _layer_mean(f, "gap_in", r)
            gaps_out = _layer_mean(f, "gap_out_delta", r)
            rows.append([p.name, r, f.get(f"rsf_in/all/{r}"), f.get(f"z_in/all/{r}"), gaps_in,
                         f.get(f"rsf_out_pred/all/{r}"), f.get(f"z_out_pred/all/{r}"),
                         f.get(f"rsf_out_delta/all/{r}"), f.get(f"z_out_delta/all/{r}"), gaps_out])
    return markdown_table(header, rows)


def per_layer_table(phases: list[Phase], prefix: str) -> str:
    layers = sorted({int(k.split("/")[1][1:]) for p in phases for k in p.final
                     if k.startswith(prefix + "/L")})
    header = ["objective", "role"] + [f"L{i}" for i in layers]
    rows = []
    for p in phases:
        for r in ROLES:
            vals = [p.final.get(f"{prefix}/L{i}/{r}") for i in layers]
            if any(v is not None for v in vals):
                rows.append([p.name, r] + vals)
    return markdown_table(header, rows)


def spikiness_table(phases: list[Phase]) -> str:
    header = ["objective", "covariance", "top-1 share", "top-8 share", "participation ratio", "effective rank"]
    rows = []
    for p in phases:
        f = p.final
        names = sorted({"/".join(k.split("/")[2:-1]) for k in f if k.startswith(("spike_in/", "spike_out/"))})
        for side in ("spike_in", "spike_out"):
            for name in names:
                stats = [_layer_mean(f, side, f"{name}/{s}") for s in ("top1", "topk", "pr", "erank")]
                if not any(v is not None for v in stats):
                    continue
                label = ("C_a " if side == "spike_in" else "C_delta ") + name
                rows.append([p.name, label] + stats)
    return markdown_table(header, rows)


def _layer_mean(row: dict, prefix: str, suffix: str) -> float | None:
    vals = [v for k, v in row.items() if k.startswith(prefix + "/L") and k.split("/", 2)[2] == suffix
            and v is not None]
    return sum(vals) / len(vals) if vals else None


def write_asymmetry_report(run_dir: Path, out_dir: Path | None = None) -> Path:
    run_dir = Path(run_dir)
    out_dir = Path(out_dir or run_dir / "report")
    out_dir.mkdir(parents=True, exist_ok=True)
    phases = load_phases(run_dir)
    found = verdicts(phases)
    lines = [f"# Where pretraining writes and alignment reads: {run_dir.name}", "",
             "Relative RSF = RSF / (k / dim); 1.0 is isotropic. Input side against the top-k eigenvectors of the "
             "objective's own `C_a`; output side against the prediction subspace (top-k right singular vectors "
             "of `W_U diag(g)`) and against the top-k of the objective's own `C_delta`. Values are the cumulative "
             "weight delta of each phase at its last step, averaged over layers; z-scores against seeded "
             "Haar-random k-subspaces; `gap` is the eigengap (l_k - l_{k+1}) / l_k of the subspace used.", "",
             "## Verdicts", ""]
    for v in found:
        status = {True: "HELD", False: "DID NOT HOLD", None: "NOT MEASURED"}[v.held]
        lines += [f"- **{status}**: {v.claim}. {v.evidence}."]
    lines += ["", f"Thresholds: concentrated = relative RSF > {CONCENTRATED} and z > {Z_MIN}; near-isotropic = "
              f"relative RSF < {NEAR_ISOTROPIC}; grade dependence = Spearman rho <= {GRADE_RHO} and a drop >= "
              f"{GRADE_DROP} from g=0 to g=1.", "",
              "## The asymmetry table (mean over layers)", "", asymmetry_table(phases), "",
              "## Per layer: relative RSF_in", "", per_layer_table(phases, "rsf_in"), "",
              "## Per layer: relative RSF_out against the prediction subspace", "",
              per_layer_table(phases, "rsf_out_pred"), "",
              "## Spikiness of the covariances (mean over layers)", "", spikiness_table(phases), "",
              "## Trajectories (cumulative delta vs step)", "",
              "The within-checkpoint trajectory: pretraining (black) and every alignment run from its final "
              "checkpoint, each measured against its own phase-start weights.", ""]
    for prefix, roles, label in (("rsf_in", READ_ROLES, "read pathway (q, k): relative RSF_in vs C_a"),
                                 ("rsf_out_pred", WRITE_ROLES,
                                  "write pathway (o, down): relative RSF_out vs prediction subspace")):
        series = [(p.name, [(r["step"], mean_over(r, prefix, roles)) for r in p.rows
                            if not math.isnan(mean_over(r, prefix, roles))]) for p in phases]
        if any(points for _, points in series):
            name = f"trajectory_{prefix}.png"
            plot_phase_trajectories(series, out_dir / name, label, "relative RSF (mean over roles, layers)",
                                    offset_after="pretrain (CE)")
            lines += [f"![trajectory {prefix}]({name})", ""]
    for prefix in ("rsf_in", "rsf_out_pred"):
        for p in phases:
            if not any(k.startswith(prefix + "/L") for r in p.rows for k in r):
                continue
            safe = p.name.split(" ")[0].replace("/", "_")
            path = plot_rsf_over_steps(p.rows, prefix=prefix, out_path=out_dir / f"{prefix}_{safe}.png",
                                       title=f"{prefix} over steps: {p.name}")
            lines.append(f"![{prefix} {p.name}]({Path(path).name})")
    lines.append("")
    lines += rank1_section(run_dir)  # present once `harness rank1 RUN` has written RUN/rank1/rank1.json
    (out_dir / "report.md").write_text("\n".join(lines))
    (out_dir / "verdicts.json").write_text(json.dumps([v.__dict__ for v in found], indent=2))
    return out_dir / "report.md"
