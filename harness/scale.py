"""The scale report: each claim's figures across a sweep of sizes and pretraining lengths.

Reads every ``RUN/{i:02d}/`` pipeline of a sweep (its config.yaml and metrics files), recomputes the
asymmetry verdicts per run (harness/asymmetry.py), and writes one table and one plot: at what size
does each claim start to hold?
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from harness.asymmetry import READ_ROLES, load_phases, mean_over, verdicts  # noqa: E402
from harness.report import markdown_table  # noqa: E402
from hooks.roles import WRITE_ROLES  # noqa: E402


def sweep_rows(run_dir: Path) -> list[dict]:
    rows = []
    for sub in sorted(p for p in Path(run_dir).iterdir() if p.is_dir() and (p / "align").is_dir()):
        cfg = yaml.safe_load((sub / "config.yaml").read_text())
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
             + [{True: "held", False: "no", None: "n/a"}[v.held] for v in r["verdicts"]] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = [r["hidden"] * r["layers"] for r in rows]
    for key, label in (("ce_write_pred", "CE: write side vs prediction subspace"),
                       ("align_read_in", "alignment: read side vs C_a"),
                       ("align_write_pred", "alignment: write side vs prediction subspace")):
        ax.plot(x, [r[key] for r in rows], marker="o", label=label)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="isotropic")
    ax.set_xscale("log")
    ax.set_xlabel("hidden size x layers")
    ax.set_ylabel("relative RSF (mean over roles, layers)")
    ax.set_title("Each claim's figure across the sweep")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "scale.png", dpi=120)
    plt.close(fig)
    lines = [f"# Scale sweep: {run_dir.name}", "", "Claims:", ""]
    lines += [f"{i + 1}. {c}" for i, c in enumerate(claims)]
    lines += ["", markdown_table(header, table), "", "![scale](scale.png)", ""]
    (out_dir / "report.md").write_text("\n".join(lines))
    return out_dir / "report.md"
