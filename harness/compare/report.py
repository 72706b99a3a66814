"""The report of ``harness compare``: report.md, compare.json and PNG plots from a ``CompareResult``.

Everything is drawn from the result alone (no model is loaded here), so a report can be re-rendered
from a result held in memory; compare.json holds every number the Markdown shows.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from weightgeom.harness.compare.result import CompareResult
from weightgeom.harness.reports.markdown import markdown_table
from weightgeom.harness.reports.plots import plot_rsf_k_curve
from weightgeom.hooks.roles import WRITE_ROLES

MEAN_COLUMNS = ["role", "‖dW‖/‖W‖", "RSF_in", "z_in", "gap_in", "RSF_out (pred)", "z_out_pred",
                "RSF_out (pred, other W_U)"]


def mean_table(result: CompareResult) -> str:
    """Roles x (relative delta, relative RSF_in, z, eigengap, relative RSF_out vs the prediction
    subspace, z, and against the other checkpoint's W_U), each the mean over layers."""
    means = {name: result.layer_means(name) for name in
             ("relative_delta", "rsf_in", "z_in", "gap_in", "rsf_out_pred", "z_out_pred", "rsf_out_pred_alt")}
    rows = [[role] + [means[name].get(role) for name in means] for role in result.roles]
    return markdown_table(MEAN_COLUMNS, rows)


def layer_table(result: CompareResult, name: str) -> str:
    """Roles x layers of one MatrixResult field (e.g. ``rsf_in``), plus the mean over layers."""
    layers = result.layers
    means = result.layer_means(name)
    by_key = {m.key: getattr(m, name) for m in result.matrices}
    rows = [[role] + [by_key.get(f"L{i}/{role}") for i in layers] + [means.get(role)]
            for role in result.roles if role in means]
    return markdown_table(["role"] + [f"L{i}" for i in layers] + ["mean"], rows)


def curve_table(curves: dict[str, tuple[list[int], list[float]]]) -> str:
    ks = sorted({k for ks, _ in curves.values() for k in ks})
    rows = [[role] + [dict(zip(ks_r, vals)).get(k) for k in ks] for role, (ks_r, vals) in curves.items()]
    return markdown_table(["role"] + [f"k={k}" for k in ks], rows)


def plot_rsf_per_layer(result: CompareResult, out_path: Path) -> Path:
    """Two panels: relative RSF_in per layer (a line per role) and relative RSF_out against the
    prediction subspace per layer (write roles), with the isotropic level 1.0."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), squeeze=False)
    for ax, name, title in ((axes[0, 0], "rsf_in", f"input side vs top-{result.k} of C_a"),
                            (axes[0, 1], "rsf_out_pred", f"output side vs prediction subspace ({result.unembed} W_U)")):
        plotted = 0
        for role in result.roles:
            points = [(m.layer, getattr(m, name)) for m in result.matrices
                      if m.role == role and getattr(m, name) is not None]
            if points:
                layers, values = zip(*points)
                ax.plot(layers, values, marker="o", linewidth=1.2, label=role)
                plotted += 1
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
        ax.set_xticks(result.layers)
        ax.set_xlabel("layer")
        ax.set_ylabel("relative RSF (1 = isotropic)")
        ax.set_title(title, fontsize=10)
        if plotted:
            ax.legend(fontsize=7)
    fig.suptitle("dW = AFTER - BASE", fontsize=11)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def write_compare_report(result: CompareResult, out_dir: str | Path) -> Path:
    """Write ``out_dir/report.md``, ``out_dir/compare.json`` and the PNGs; returns report.md's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.json").write_text(json.dumps(result.to_dict(), indent=2))
    lines = [f"# Weight delta: {result.after_dir} - {result.base_dir}", "",
             f"Architecture `{result.model_type}`, {len(result.layers)} layers, roles {', '.join(result.roles)}; "
             f"dW = W_AFTER - W_BASE per matrix (fp32, out x in). Relative RSF = RSF / (k / dim): 1.0 is what an "
             f"isotropic delta scores, dim / k the maximum. k = {result.k} (capped at dim - 1).", ""]
    if result.no_delta:
        lines += ["**No delta.** " + result.notes[0], ""]
        (out_dir / "report.md").write_text("\n".join(lines))
        return out_dir / "report.md"
    z_note = ("exact z-scores against Haar-random k-subspaces (closed form)" if result.zscores
              else "z-scores off (--no-zscores)")
    lines += ["## Settings", "",
              f"- Input side: top-{result.k} eigenvectors of C_a (uncentered) per input group; C_a from "
              f"{result.c_a_source}." + (f" Saved as `{Path(result.c_a_file).name}` (reuse with `--c-a`)."
                                         if result.c_a_file else ""),
              f"- Output side (write roles {', '.join(WRITE_ROLES)}): prediction subspace = top-{result.k} right "
              f"singular vectors of W_U diag(g) from **{result.unembed.upper()}**'s unembedding (the live metrics use "
              f"the unembedding at measurement time, i.e. AFTER's). Eigengap of its squared singular values at k: "
              f"{_fmt(result.gap_pred)}; overlap of AFTER's and BASE's k-subspaces ‖V_A^T V_B‖²/k: "
              f"{_fmt(result.pred_overlap)}. A small gap makes RSF_out sensitive to small changes of W_U: compare the "
              "'other W_U' column.",
              f"- {z_note}; gap = eigengap (l_k - l_k+1) / l_k of the subspace used.", ""]
    lines += ["## Mean over layers", "", mean_table(result), "",
              "![relative RSF per layer](rsf_per_layer.png)", ""]
    plot_rsf_per_layer(result, out_dir / "rsf_per_layer.png")
    lines += ["## Per layer", ""]
    for name, title in (("rsf_in", "Relative RSF_in (vs top-k of C_a)"), ("z_in", "z_in"), ("gap_in", "gap_in"),
                        ("rsf_out_pred", "Relative RSF_out (vs prediction subspace)"), ("z_out_pred", "z_out_pred"),
                        ("relative_delta", "‖dW‖_F / ‖W_base‖_F")):
        if result.layer_means(name):
            lines += [f"### {title}", "", layer_table(result, name), ""]
    lines += ["## Relative RSF against k (mean over layers)", "",
              "Each k below the matrix's dimension (a k-subspace with k >= dim is the whole space).", ""]
    for side, title in (("in", "Input side vs top-k of C_a"), ("out", "Output side vs the prediction subspace")):
        curves = result.curve_means(side)
        if curves:
            name = f"rsf_k_curve_{side}.png"
            plot_rsf_k_curve(curves, out_dir / name, f"relative RSF_{side} vs k (mean over layers)")
            lines += [f"### {title}", "", curve_table(curves), "", f"![{name}]({name})", ""]
    if result.notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in result.notes] + [""]
    (out_dir / "report.md").write_text("\n".join(lines))
    return out_dir / "report.md"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"
