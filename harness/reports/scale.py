"""The scale report: each claim's figures across a sweep of sizes and pretraining lengths.

Reads every ``RUN/{i:02d}/`` pipeline of a sweep (its config.yaml and metrics files), recomputes the
asymmetry verdicts per run (harness/reports/claims.py), and writes one table and one plot: at what size
does each claim start to hold?
"""

from __future__ import annotations

from pathlib import Path

from weightgeom.harness.reports.claims import CONCENTRATED, READ_ROLES, verdicts
from weightgeom.harness.reports.markdown import markdown_table
from weightgeom.harness.reports.phases import load_phases, mean_over, read_config
from weightgeom.harness.reports.plots import ISOTROPIC, plot_scale
from weightgeom.hooks.roles import WRITE_ROLES


def sweep_rows(run_dir: Path) -> list[dict]:
    rows = []
    for sub in sorted(p for p in Path(run_dir).iterdir() if p.is_dir() and (p / "align").is_dir()):
        cfg = read_config(sub)
        phases = load_phases(sub)
        ce = next((p for p in phases if p.kind == "ce"), None)
        dpo = next((p for p in phases if p.grade == 1.0), None)
        m = cfg["model"]
        rows.append({
            "run": sub.name, "hidden": m["hidden_size"], "layers": m["num_layers"], "heads": m["num_heads"],
            "vocab": cfg["tokenizer"]["vocab_size"], "pretrain_steps": cfg["train"]["steps"],
            "ce_write_pred": mean_over(ce.final, "rsf_out_pred", WRITE_ROLES) if ce else None,
            "align_read_in": mean_over(dpo.final, "rsf_in", READ_ROLES) if dpo else None,
            "align_write_pred": mean_over(dpo.final, "rsf_out_pred", WRITE_ROLES) if dpo else None,
            "verdicts": verdicts(phases),
        })
    if not rows:
        raise FileNotFoundError(f"{run_dir} holds no sweep runs (subdirectories with align/)")
    return rows


def write_scale_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    out_dir = run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = sweep_rows(run_dir)
    claims = [v.claim for v in rows[0]["verdicts"]]
    header = ["run", "hidden", "layers", "heads", "vocab", "pretrain steps", "CE RSF_out(pred) o/down",
              "align RSF_in q/k", "align RSF_out(pred) o/down"] + [f"claim {i + 1}" for i in range(len(claims))]
    table = [[r["run"], r["hidden"], r["layers"], r["heads"], r["vocab"], r["pretrain_steps"], r["ce_write_pred"],
              r["align_read_in"], r["align_write_pred"]]
             + [v.status for v in r["verdicts"]] for r in rows]
    plot_scale([r["hidden"] * r["layers"] for r in rows],
               {label: [r[key] for r in rows] for key, label in (
                   ("ce_write_pred", "CE: write side vs prediction subspace"),
                   ("align_read_in", "alignment: read side vs C_a"),
                   ("align_write_pred", "alignment: write side vs prediction subspace"))},
               out_dir / "scale.png",
               thresholds=(ISOTROPIC, (CONCENTRATED, f"verdict threshold ({CONCENTRATED:g})")))
    lines = [f"# Scale sweep: {run_dir.name}", "", "Claims:", ""]
    lines += [f"{i + 1}. {c} ({v.rule})" for i, (c, v) in enumerate(zip(claims, rows[0]["verdicts"]))]
    lines += ["", markdown_table(header, table), "", "![scale](scale.png)", ""]
    (out_dir / "report.md").write_text("\n".join(lines))
    return out_dir / "report.md"
