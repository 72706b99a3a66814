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

from weightgeom.harness.compare.result import CompareResult, InitResult, MassResult, SeriesResult, spread
from weightgeom.harness.reports.markdown import fmt, markdown_table
from weightgeom.harness.reports.plots import plot_rsf_k_curve
from weightgeom.hooks.roles import ROLES, WRITE_ROLES

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
    return _save(fig, out_path)


def _save(fig, out_path: Path) -> Path:
    """Lay out, write (creating the folder) and close ``fig``; returns ``out_path``."""
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
    lines += mass_section(result.mass, out_dir)
    if result.notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in result.notes] + [""]
    (out_dir / "report.md").write_text("\n".join(lines))
    return out_dir / "report.md"


MASS_INTRO = ("Relative mass of each loss's C_delta (per-token `delta` at the write matrix's output) in the top-k "
              "prediction subspace: tr(V_k^T C_delta V_k) / tr(C_delta) over k / m. 1.0 = `delta` has no "
              "preference for where the unembedding reads; m / k = all of it lies there. z: exact, against "
              "Haar-random k-subspaces.")


def mass_table(mass: dict[str, MassResult]) -> str:
    """Losses x write roles: the relative mass and its z-score, each the mean over layers."""
    roles = [r for r in WRITE_ROLES if any(r in m.role_means() for m in mass.values())]
    rows = []
    for name, m in mass.items():
        means, zs = m.role_means(), m.role_means(m.z)
        values = [means.get(r) for r in roles]
        found = [v for v in values if v is not None]
        rows.append([name] + [v for r in roles for v in (means.get(r), zs.get(r))]
                    + [sum(found) / len(found) if found else None])
    return markdown_table(["loss"] + [h for r in roles for h in (f"mass {r}", f"z {r}")] + ["mean (o, down)"], rows)


def mass_section(mass: dict[str, MassResult], out_dir: Path, heading: str = "##") -> list[str]:
    """The mechanism metric: settings, the mean table, per-layer tables and k-curves (``mass_k_curve.png``)."""
    if not mass:
        return []
    lines = [f"{heading} Mechanism: C_delta's mass in the prediction subspace", "", MASS_INTRO, ""]
    lines += [f"- `{name}`: {m.source}." for name, m in mass.items()]
    lines += ["", mass_table(mass), ""]
    for name, m in mass.items():
        layers = sorted({int(key.split("/")[0][1:]) for key in m.mass})
        rows = [[role] + [m.mass.get(f"L{i}/{role}") for i in layers] for role in WRITE_ROLES
                if any(f"L{i}/{role}" in m.mass for i in layers)]
        lines += [f"{heading}# `{name}` per layer", "", markdown_table(["role"] + [f"L{i}" for i in layers], rows), ""]
    curves = {f"{name} {role}": curve for name, m in mass.items() for role, curve in m.curve_means().items()}
    if curves:
        plot_rsf_k_curve(curves, Path(out_dir) / "mass_k_curve.png", "relative mass of C_delta vs k (mean over layers)")
        lines += [f"{heading}# Mass against k (mean over layers)", "", curve_table(curves), "",
                  "![mass vs k](mass_k_curve.png)", ""]
    return lines


# ----- compare init: mean and spread over seeds ----------------------------------------------------------

def _pm(stats: dict | None) -> str:
    if stats is None:
        return "-"
    return f"{fmt(stats['mean'])} ± {fmt(stats['sd'])}"


def init_mean_table(init: InitResult) -> str:
    """Roles x (relative delta, RSF_in, z_in, RSF_out (pred), z_out_pred): mean ± sd over seeds of each
    seed's mean over layers."""
    summary = init.summary()
    families = [("delta", None), ("rsf_in", "rsf_in"), ("z_in", "z_in"), ("rsf_out_pred", "rsf_out_pred"),
                ("z_out_pred", "z_out_pred")]
    rows = []
    for role in init.results[0].roles:
        delta = [r.layer_means("relative_delta").get(role) for r in init.results]
        row = [role, _pm(_spread_of(delta))]
        row += [_pm(summary.get(f"{family}/all/{role}")) for _, family in families[1:]]
        rows.append(row)
    return markdown_table(["role", "‖dW‖/‖W‖", "RSF_in", "z_in", "RSF_out (pred)", "z_out_pred"], rows)


def _spread_of(values: list) -> dict | None:
    return spread(values) if values and all(v is not None for v in values) else None


def init_curve_table(curves: dict[str, tuple[list[int], list[float], list[float]]]) -> str:
    ks = sorted({k for ks, _, _ in curves.values() for k in ks})
    rows = []
    for role, (ks_r, mean, sd) in curves.items():
        by_k = {k: (m, s) for k, m, s in zip(ks_r, mean, sd)}
        rows.append([role] + [f"{fmt(by_k[k][0])} ± {fmt(by_k[k][1])}" if k in by_k else "-" for k in ks])
    return markdown_table(["role"] + [f"k={k}" for k in ks], rows)


def write_init_report(init: InitResult, out_dir: str | Path) -> Path:
    """``out_dir/report.md`` (mean ± sd over seeds), ``init.json``, the k-curve PNGs (means), and one compare
    report per seed in ``seed_{s}/``; returns report.md's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for seed, result in zip(init.seeds, init.results):
        write_compare_report(result, out_dir / f"seed_{seed}")
    (out_dir / "init.json").write_text(json.dumps(init.to_dict(), indent=2))
    first = init.results[0]
    lines = [f"# The whole delta training wrote: {init.after_dir} - random init", "",
             f"BASE is a random initialisation of AFTER's own config (`{init.model_type}`, built with "
             f"`from_config`: the family's own `_init_weights`, initializer_range {init.initializer_range}), one per "
             f"seed ({', '.join(map(str, init.seeds))}); dW = W_AFTER - W_init. Numbers are mean ± sd over the seeds "
             f"of each seed's mean over layers. Relative RSF: 1.0 = isotropic. k = {first.k}. Per seed: "
             + ", ".join(f"[seed {s}](seed_{s}/report.md)" for s in init.seeds) + ".", ""]
    if first.c_a_source:
        lines += [f"- Input side: top-{first.k} of C_a from {first.c_a_source}.", ""]
    lines += [f"- Output side: the prediction subspace of **{first.unembed.upper()}**'s unembedding.", "",
              "## Mean over layers", "", init_mean_table(init), ""]
    lines += ["## Relative RSF against k (mean over layers; mean ± sd over seeds)", ""]
    for side, title in (("in", "Input side vs top-k of C_a"), ("out", "Output side vs the prediction subspace")):
        curves = init.curve_summary(side)
        if curves:
            name = f"rsf_k_curve_{side}.png"
            plot_rsf_k_curve({role: (ks, mean) for role, (ks, mean, _) in curves.items()}, out_dir / name,
                             f"relative RSF_{side} of AFTER - init vs k (mean over layers and seeds)")
            lines += [f"### {title}", "", init_curve_table(curves), "", f"![{name}]({name})", ""]
    lines += mass_section(first.mass, out_dir)
    notes = list(init.notes) + [n for n in first.notes[1:]]
    if notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    (out_dir / "report.md").write_text("\n".join(lines))
    return out_dir / "report.md"


# ----- compare series: cumulative and incremental rows, trajectories --------------------------------------

def _x_axis(series: SeriesResult) -> tuple[list[float], str]:
    if all(s is not None for s in series.steps):
        return [float(s) for s in series.steps], "step"
    return [float(i) for i in range(len(series.paths))], "checkpoint (order given)"


def series_table(series: SeriesResult, role: str) -> str:
    """One row per checkpoint after the first: layer means of the cumulative and incremental deltas."""
    write = role in WRITE_ROLES
    header = ["checkpoint", "step", "‖dW‖/‖W‖ cum", "RSF_in cum", "z_in cum", "RSF_in inc"]
    if write:
        header += ["RSF_out cum", "z_out cum", "RSF_out inc"]
    losses = list(series.first_mass) or (list(series.rows[0].cumulative.mass) if series.rows else [])
    header += [f"mass {loss}" for loss in losses] if write else []
    rows = []
    if write and series.first_mass:
        rows.append([Path(series.paths[0]).name, series.steps[0], None, None, None, None, None, None, None]
                    + [series.first_mass[loss].role_means().get(role) for loss in losses])
    for row in series.rows:
        cum, inc = row.cumulative, row.incremental
        values = [Path(row.path).name, row.step, cum.layer_means("relative_delta").get(role),
                  cum.layer_means("rsf_in").get(role), cum.layer_means("z_in").get(role),
                  inc.layer_means("rsf_in").get(role)]
        if write:
            values += [cum.layer_means("rsf_out_pred").get(role), cum.layer_means("z_out_pred").get(role),
                       inc.layer_means("rsf_out_pred").get(role)]
            values += [cum.mass[loss].role_means().get(role) if loss in cum.mass else None for loss in losses]
        rows.append(values)
    return markdown_table(header, rows)


def plot_series_role(series: SeriesResult, role: str, out_path: Path) -> Path | None:
    """Relative RSF of one role against the step: input side (blue) and output side vs the prediction subspace
    (orange), cumulative solid, incremental dashed; the mechanism's mass per loss dotted; isotropic 1.0."""
    xs, label = _x_axis(series)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    drawn = 0
    for family, colour, title in (("rsf_in", "tab:blue", "RSF_in"), ("rsf_out_pred", "tab:orange", "RSF_out (pred)")):
        for kind, style in (("cumulative", "-"), ("incremental", "--")):
            points = [(xs[row.index], v) for row in series.rows
                      if (v := getattr(row, kind).layer_means(family).get(role)) is not None]
            if points:
                ax.plot(*zip(*points), linestyle=style, marker="o", color=colour, linewidth=1.2,
                        label=f"{title} {kind}")
                drawn += 1
    losses = list(series.first_mass) or (list(series.rows[0].cumulative.mass) if series.rows else [])
    for j, loss in enumerate(losses):
        first = series.first_mass.get(loss)
        v = first.role_means().get(role) if first is not None else None
        points = [(xs[0], v)] if v is not None else []
        points += [(xs[row.index], v) for row in series.rows
                   if loss in row.cumulative.mass and (v := row.cumulative.mass[loss].role_means().get(role))]
        if points:
            ax.plot(*zip(*points), linestyle=":", marker="s", color=f"C{2 + j}", linewidth=1.2,
                    label=f"mass of C_delta ({loss})")
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel(label)
    ax.set_ylabel("relative (1 = isotropic)")
    ax.set_title(f"{role}: mean over layers", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, out_path)


def write_series_report(series: SeriesResult, out_dir: str | Path) -> Path:
    """``out_dir/report.md`` (a table and a trajectory plot per role) and ``series.jsonl``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "series.jsonl").write_text("".join(json.dumps(row) + "\n" for row in series.jsonl_rows()))
    first = series.rows[0].cumulative if series.rows else None
    lines = [f"# A series of {len(series.paths)} checkpoints", "",
             "Per checkpoint after the first: the **cumulative** delta (from the first checkpoint, "
             f"{series.paths[0]}) and the **incremental** delta (from the previous checkpoint); relative RSF, mean "
             f"over layers (1.0 = isotropic), k = {first.k if first else '-'}. Every row is `harness compare` of "
             "that pair with the same options; `series.jsonl` holds every number.", "",
             "| # | checkpoint | step |", "|---|---|---|"]
    lines += [f"| {i} | {p} | {fmt(s)} |" for i, (p, s) in enumerate(zip(series.paths, series.steps))]
    lines += [""]
    if first is not None and first.c_a_source:
        lines += [f"- Input side: C_a of each delta's BASE (first row: {first.c_a_source}).", ""]
    for role in ROLES:
        if series.rows and role in series.rows[0].cumulative.roles:
            lines += [f"## {role}", "", series_table(series, role), ""]
            path = plot_series_role(series, role, out_dir / f"series_{role}.png")
            if path is not None:
                lines += [f"![{role}]({path.name})", ""]
    if series.first_mass or (first is not None and first.mass):
        lines += ["Mass: the mechanism metric of each checkpoint's own C_delta. " + MASS_INTRO, ""]
        sources = series.first_mass or first.mass
        lines += [f"- `{name}`: {m.source} (shown for the first checkpoint; the same on each)." for name, m in
                  sources.items()] + [""]
    notes = list(series.notes) + sorted({n for row in series.rows for r in (row.cumulative, row.incremental)
                                        for n in r.notes})
    if notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    (out_dir / "report.md").write_text("\n".join(lines))
    return out_dir / "report.md"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"
