"""Rank-1 intervention results on disk: JSON, a Markdown table, a PNG; and the asymmetry report's section.

Files written by :func:`write_rank1_report` into ``out_dir`` (for a pipeline run, ``RUN/rank1/``):

    rank1.json   Rank1Result (config, base metrics, per-direction metrics, z-scores, matching)
    rank1.md     the tables below
    rank1.png    per-unit-norm DPO-loss and CE change of each tested direction, controls as strips

Column meanings (per direction; ``m0`` = the unedited model's value on the same held-out data):

    dL/eps         (dpo_loss(eps_small) - m0) / eps_small      measured, held-out pairs
    <G,dW>/eps     first-order prediction from the training-pair gradient (= -||G v|| or -||G^T u||)
    <G_ho,dW>/eps  the same from the held-out-pair gradient (the exact first-order term of dL)
    dCE/eps        (ce(eps_small) - m0) / eps_small on held-out pretraining text
    KL/eps^2       KL(base || edited) at eps, per predicted token, divided by eps^2
    z <family>     (tested - mean) / std of the family's values of dL/eps; negative: the tested
                   direction lowers the DPO loss more than that family does (its standard error,
                   from the family's size: ``z_se`` in rank1.json, experiment.zscore_se)
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from weightgeom.harness.rank1.experiment import Rank1Result
from weightgeom.harness.reports.markdown import fmt, markdown_table

JSON_NAME, MD_NAME, PNG_NAME = "rank1.json", "rank1.md", "rank1.png"
FAMILY_COLORS = {"haar": "0.55", "matched": "tab:blue", "lower": "tab:green", "layer": "tab:orange"}


def _z(result, tested_id: str, family: str, metric: str = "dpo_loss_unit"):
    for entry in result.zscores:
        if entry["tested"] == tested_id and entry["family"] == family:
            return entry["z"].get(metric)
    return None


def _matching(result, tested_id: str) -> dict:
    return next((m for m in result.matching if m["tested"] == tested_id), {})


def _label(d: dict) -> str:
    return f"{d['source']}#{d['rank'] + 1}"


def unit_table(result) -> str:
    """Tested directions: per-unit-norm changes, predictions, z-scores of dL/eps against each family."""
    header = ["layer", "role", "direction", "dL/eps", "<G,dW>/eps", "<G_ho,dW>/eps", "z haar", "z matched",
              "matched overlap", "z lower", "z layer", "dCE/eps", "z haar (dCE)", "KL/eps^2"]
    rows = []
    for d in result.tested():
        m = d["metrics"]
        rows.append([d["layer"], d["role"], _label(d), m["dpo_loss_unit"], m["pred1_unit"], m["pred1_heldout_unit"],
                     _z(result, d["id"], "haar"), _z(result, d["id"], "matched"),
                     _matching(result, d["id"]).get("overlap_mean"), _z(result, d["id"], "lower"),
                     _z(result, d["id"], "layer"), m["ce_unit"], _z(result, d["id"], "haar", "ce_unit"), m["kl_unit"]])
    return markdown_table(header, rows)


def at_eps_table(result) -> str:
    """Tested directions at the chosen eps: raw changes next to the first- and second-order predictions."""
    header = ["layer", "role", "direction", "dL", "<G,dW>", "<G_ho,dW>", "K-FAC 2nd", "measured 2nd",
              "d margin", "accuracy", "dCE", "KL"]
    rows = []
    for d in result.tested():
        m = d["metrics"]
        rows.append([d["layer"], d["role"], _label(d), m["dpo_loss"], m["pred1"], m["pred1_heldout"], m["pred2_kfac"],
                     m["dpo_loss_curv"], m["margin"], m["accuracy"], m["ce"], m["kl"]])
    return markdown_table(header, rows)


def family_table(result) -> str:
    """Control families: mean and std of dL/eps and dCE/eps, per (layer, role, family, source)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for d in result.directions:
        if d["family"] != "tested":
            source = d["source"] if d["family"] in ("lower", "matched", "layer") else "-"
            groups[(d["layer"], d["role"], d["family"], source)].append(d["metrics"])
    header = ["layer", "role", "family", "source", "n", "dL/eps mean", "dL/eps std", "dCE/eps mean", "dCE/eps std"]
    rows = []
    for (layer, role, family, source), ms in sorted(groups.items()):
        dl = [m["dpo_loss_unit"] for m in ms]
        dce = [m["ce_unit"] for m in ms]
        rows.append([layer, role, family, source, len(ms), _mean(dl), _std(dl), _mean(dce), _std(dce)])
    return markdown_table(header, rows)


def matching_table(result) -> str:
    """Per tested direction: the matching band, the least overlap the band forces, the matched controls'
    overlaps ``|<w, t>|``, and the other-layer controls' overlaps (the same direction in another layer
    can be nearly the tested one: the residual stream's leading directions persist across layers)."""
    layer_overlap = {z["tested"]: z["overlap_mean"] for z in result.zscores if z["family"] == "layer"}
    header = ["tested", "matched on", "target", "band", "least possible overlap", "matched overlap mean",
              "matched overlap max", "matched pairwise overlap", "other-layer overlap mean"]
    rows = [[m["tested"], m["form"], m["target"], f"[{fmt(m['lo'])}, {fmt(m['hi'])}]", m["min_overlap"],
             m["overlap_mean"], m["overlap_max"], m.get("pairwise_overlap"), layer_overlap.get(m["tested"])]
            for m in result.matching]
    return markdown_table(header, rows)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _std(xs: list[float]) -> float:
    if len(xs) < 2:
        return math.nan
    mu = _mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


def _explanation(result) -> list[str]:
    c = result.config
    centred = ", vocab-centred W_U" if c.get("pred_centered") else ""
    return [
        f"Edits of Frobenius norm eps = {fmt(c['eps'])} (per-unit-norm columns at eps_small = {fmt(c['eps_small'])}), "
        f"each the steepest-descent rank-1 edit given its direction (input side `-eps (Gv/|Gv|) v^T` for read roles, "
        f"output side `-eps u (u^T G)/|u^T G|` for write roles), G = mean sigmoid-DPO gradient "
        f"(beta = {fmt(c['beta'])}) "
        f"over {c['n_train_pairs']} training pairs at the base weights. Measured on {c['n_eval_pairs']} held-out pairs "
        f"(reference = base) and {c['text_blocks'][0]} held-out text blocks of {c['text_blocks'][1]} tokens.",
        "",
        f"Directions: `C_a#j` = j-th eigenvector of the role's input covariance; `pred#j` = j-th right singular "
        f"vector of `W_U diag(g)` (the prediction subspace{centred}); "
        f"`C_delta#j` = j-th eigenvector of the role's "
        f"output-gradient covariance. Controls: `haar` ({c['n_random']} Haar-random directions), `matched` "
        f"({c['n_matched']} directions with `w^T Q w` within {fmt(100 * c['tol'])}% of the tested one's, Q = the form "
        f"that picked it: C_a, C_delta, or `M^T M` (squared prediction singular value); orthogonal to the tested "
        f"direction where the spectrum allows, else rotated from it into the band, so they overlap it: see the "
        f"overlap columns), "
        f"`lower` (up to {c['n_lower']} lower principal directions of the same form), `layer` (the same direction "
        f"measured in every other layer; none for `pred`, which is model-level). z = (tested - mean) / std over the "
        f"family; negative z on dL/eps: the tested direction lowers the DPO loss more than the family. A z from 10 "
        f"controls has a standard error of 0.36 at z = 0 and 0.96 at z = 3 (each z's: `z_se` in rank1.json).",
        "",
        "Second order: K-FAC `1/2 (N/P) tr(dW^T C_delta dW C_a)` with C_delta per token at per-pair scale and N/P "
        "counted tokens per pair (both sequences, prompt included); it approximates the empirical Fisher, which at "
        "the reference equals DPO's Gauss-Newton term; `measured 2nd` = (L(eps) + L(-eps) - 2 L0) / 2 on held-out "
        "pairs also holds the Hessian of the log-ratio, which K-FAC does not.",
    ]


def write_rank1_report(result, out_dir: str | Path) -> Path:
    """Write ``rank1.json``, ``rank1.md`` and ``rank1.png`` into ``out_dir``; returns the Markdown path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / JSON_NAME).write_text(result.to_json())
    plot_rank1(result, out_dir / PNG_NAME)
    base = result.base
    lines = ["# Rank-1 interventions: causal test of the read/write asymmetry", ""] + _explanation(result) + [
        "",
        f"Base model on the held-out data: DPO loss {fmt(base['dpo_loss'])} (log 2 at the reference), "
        f"CE {fmt(base['ce'])}.",
        "", "## Tested directions, per unit norm", "", unit_table(result), "",
        f"![rank-1 edits]({PNG_NAME})", "",
        f"## Tested directions at eps = {fmt(result.config['eps'])}", "", at_eps_table(result), "",
        "## Control families", "", family_table(result), "",
        "## Matching and overlaps", "",
        "`least possible overlap`: the smallest |<w, t>| any unit direction in the band can have (t is an "
        "eigenvector of the form: a spiked top eigenvalue forces matched directions towards t). `matched pairwise "
        "overlap`: mean |<w_i, w_j>| among the matched controls; near 1, the band admits little more than one "
        "direction (e.g. the second eigenvector when it has nearly the tested variance), the family's spread is "
        "small and its z-scores are large by construction.", "",
        matching_table(result), "",
        "## Matrices", "", statistics_table(result), ""]
    path = out_dir / MD_NAME
    path.write_text("\n".join(lines))
    return path


def statistics_table(result) -> str:
    header = ["matrix", "shape", "|W|_F", "|G|_F", "|G_heldout|_F", "|G_ce|_F", "tokens/pair", "C_a top-1 share",
              "C_delta top-1 share"]
    rows = [[s["key"], "x".join(map(str, s["shape"])), s["weight_norm"], s["grad_norm"], s["grad_heldout_norm"],
             s["grad_ce_norm"], s["tokens_per_pair"], s["C_a_top"][0] / s["C_a_trace"] if s["C_a_trace"] else None,
             s["C_delta_top"][0] / s["C_delta_trace"] if s["C_delta_trace"] else None] for s in result.statistics]
    return markdown_table(header, rows)


def rank1_section(run_dir: str | Path) -> list[str]:
    """Markdown lines for the asymmetry report (``RUN/report/report.md``), read from
    ``RUN/rank1/rank1.json``; no lines when that file does not exist."""
    path = Path(run_dir) / "rank1" / JSON_NAME
    if not path.is_file():
        return []
    result = Rank1Result.from_json(path.read_text())
    return ["## Causal test: closed-form rank-1 interventions", ""] + _explanation(result) + [
        "", unit_table(result), "", f"![rank-1 edits](../rank1/{PNG_NAME})", "",
        "Full tables (raw changes at eps, control families, variance matching): `rank1/rank1.md`.", ""]


def plot_rank1(result, out_path: Path) -> Path:
    """One column per role, rows dL/eps and dCE/eps; per tested direction its value (black star) and
    the control families' values as jittered strips."""
    tested = result.tested()
    roles = list(dict.fromkeys(d["role"] for d in tested))
    by_family: dict[tuple, list[dict]] = defaultdict(list)
    for d in result.directions:
        by_family[(d["layer"], d["role"], d["family"])].append(d)
    metrics = (("dpo_loss_unit", "dL_DPO / eps"), ("ce_unit", "dCE / eps"))
    per_role = max(sum(d["role"] == r for d in tested) for r in roles)
    fig, axes = plt.subplots(len(metrics), len(roles), figsize=(len(roles) * max(3.5, 1.5 + 0.45 * per_role), 6.5),
                             squeeze=False)
    offsets = {"haar": -0.3, "matched": -0.1, "lower": 0.1, "layer": 0.3}
    for col, role in enumerate(roles):
        ts = [d for d in tested if d["role"] == role]
        for row, (metric, label) in enumerate(metrics):
            ax = axes[row][col]
            for x, t in enumerate(ts):
                for family, dx in offsets.items():
                    members = [d for d in by_family[(t["layer"], role, family)]
                               if (family in ("haar",)) or (family == "lower" and d["source"] == t["source"])
                               or d.get("tested") == t["id"]]
                    ys = [d["metrics"][metric] for d in members]
                    if ys:
                        xs = [x + dx + 0.04 * ((i % 5) - 2) / 2 for i in range(len(ys))]
                        ax.scatter(xs, ys, s=7, color=FAMILY_COLORS[family], alpha=0.7,
                                   label=family if x == 0 else None)
                ax.scatter([x], [t["metrics"][metric]], marker="*", s=90, color="black", zorder=3,
                           label="tested" if x == 0 else None)
            ax.axhline(0.0, color="gray", linewidth=0.6, linestyle="--")
            ax.set_xticks(range(len(ts)))
            ax.set_xticklabels([f"L{t['layer']} {_label(t)}" for t in ts], rotation=60, fontsize=7)
            ax.tick_params(axis="y", labelsize=7)
            if row == 0:
                ax.set_title(f"{role} ({'input' if ts and ts[0]['side'] == 'in' else 'output'} side)", fontsize=10)
            if col == 0:
                ax.set_ylabel(label, fontsize=9)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(f"rank-1 edits at eps_small = {fmt(result.config['eps_small'])}: tested directions vs controls",
                 fontsize=11)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
