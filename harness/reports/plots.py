"""PNG plots for reports, drawn only from saved files (metrics rows, instrument snapshots).

Every function writes one PNG and returns its path; matplotlib runs headless (Agg). Conventions
shared by every figure: reference levels and verdict thresholds are drawn as labelled horizontal
lines (``thresholds``: ``(value, label)`` pairs, styled in order: isotropic level, then thresholds);
legends sit outside the axes, so they never cover data; non-finite values are no points.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, NullLocator, ScalarFormatter

from weightgeom.hooks import keys
from weightgeom.hooks.roles import ROLES

Threshold = tuple[float, str]  # (y value, legend label)
ISOTROPIC: Threshold = (1.0, "isotropic (1.0)")
# Styles of threshold lines, in order: the reference level first, then verdict thresholds.
THRESHOLD_STYLES = ({"color": "gray", "linestyle": "--"}, {"color": "tab:red", "linestyle": ":"},
                    {"color": "tab:purple", "linestyle": "-."})
LINE_STYLES = ("-", "--", ":", "-.")
PRETRAIN_COLOR = "black"


def _finite(points):
    return [(s, v) for s, v in points if isinstance(v, (int, float)) and math.isfinite(v)]


def _draw_thresholds(ax, thresholds: list[Threshold] | tuple[Threshold, ...]) -> list[Line2D]:
    handles = []
    for (value, label), style in zip(thresholds, THRESHOLD_STYLES * 2):
        handles.append(ax.axhline(value, linewidth=1.0, label=label, **style))
    return handles


def _layout(fig, axes, title: str, handles: dict[str, Line2D] | None = None, *, panel: tuple[float, float],
            ncol: int = 6, right: float = 0.25, wgap: float = 0.6, top: float = 0.75) -> None:
    """Size the figure around panels of ``panel`` = (width, height) inches and put the legend
    (``handles``: label -> artist) in a band below every axes, so it never covers data. Margins are
    fixed in inches (a layout engine costs more than the drawing on these small figures)."""
    nrows, ncols = axes.shape
    ncol = max(1, min(ncol, len(handles or {})))
    legend_rows = math.ceil(len(handles) / ncol) if handles else 0
    left, xlabel, hgap = 0.75, 0.5, 0.8
    bottom = xlabel + (0.2 * legend_rows + 0.15 if legend_rows else 0.0)
    width = left + right + ncols * panel[0] + (ncols - 1) * wgap
    height = top + bottom + nrows * panel[1] + (nrows - 1) * hgap
    fig.set_size_inches(width, height)
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=wgap / panel[0], hspace=hgap / panel[1])
    fig.suptitle(title, fontsize=11, y=1 - 0.1 / height, va="top")
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", bbox_to_anchor=(0.5, 0.05 / height),
                   ncol=ncol, fontsize=7, frameon=False)


def _step_axis(ax, label: str) -> None:
    """Integer step ticks, from the phase start (step 0: nothing written yet)."""
    ax.set_xlabel(label, fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(left=0)


def phase_colors(names: list[str], pretrain: str | None = None) -> dict[str, str]:
    """One colour per phase, stable in the phase order; the pretraining phase is black."""
    cycle = [c for c in plt.rcParams["axes.prop_cycle"].by_key()["color"]]
    out, i = {}, 0
    for name in names:
        if name == pretrain:
            out[name] = PRETRAIN_COLOR
        else:
            out[name] = cycle[i % len(cycle)]
            i += 1
    return out


def plot_rsf_over_steps(rows: list[dict], prefix: str, out_path: Path, title: str | None = None,
                        thresholds: tuple[Threshold, ...] = (ISOTROPIC,)) -> Path:
    """One panel per role: ``{prefix}/L{i}/{role}`` against step, a line per layer, plus the
    ``thresholds``. ``prefix`` is a relative-RSF family such as ``rsf_in`` or ``rsf_out_pred``."""
    series: dict[str, dict[int, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        for key, value in row.items():
            found = keys.layer_of(key, prefix)
            if found and isinstance(value, (int, float)) and math.isfinite(value):
                layer, role = found
                series[role][layer].append((row["step"], value))
    if not series:
        raise ValueError(f"no finite '{prefix}/L*/*' metrics in these rows: was the phase instrumented?")
    roles = [r for r in ROLES if r in series] + sorted(set(series) - set(ROLES))
    cols = min(len(roles), 4)
    nrows = (len(roles) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, squeeze=False, sharex=True)
    handles: dict[str, Line2D] = {}
    for ax, role in zip(axes.flat, roles):
        for layer, points in sorted(series[role].items()):
            steps, values = zip(*points)
            (line,) = ax.plot(steps, values, marker=".", linewidth=1.2, color=f"C{layer % 10}")
            handles.setdefault(f"L{layer}", line)
        for h in _draw_thresholds(ax, thresholds):
            handles.setdefault(h.get_label(), h)
        ax.set_title(role, fontsize=10)
        _step_axis(ax, "step")
        ax.tick_params(labelsize=7, labelbottom=True)
    for ax in list(axes.flat)[len(roles):]:
        ax.axis("off")
    for row_axes in axes:
        row_axes[0].set_ylabel("relative RSF", fontsize=8)
    _layout(fig, axes, title or f"{prefix} over steps", handles, panel=(2.9, 2.0), ncol=8)
    return _save(fig, out_path)


def plot_spectra(state: dict[str, torch.Tensor], out_path: Path, title: str | None = None, top: int = 64) -> Path:
    """Eigenvalue spectra (normalised to sum 1, log scale) of every ``C_a`` and ``C_delta`` in an
    instrument snapshot; one panel per side, a line per layer/group. Matrices holding a NaN or inf
    (a diverged run) are skipped: health.snapshot_non_finite names them for the report."""
    panels = {"cov_in": "C_a (input side)", "cov_out": "C_delta (output side)"}
    found = {side: sorted(k for k in state if (p := keys.parse_state_key(k)) and p[0] == side and p[3] == "sum_outer"
                          and bool(torch.isfinite(state[k]).all()))
             for side in panels}
    found = {side: names for side, names in found.items() if names}
    if not found:
        raise ValueError("no finite cov_in/*/sum_outer or cov_out/*/sum_outer tensors in this snapshot")
    fig, axes = plt.subplots(1, len(found), squeeze=False)
    for ax, (side, names) in zip(axes.flat, found.items()):
        for key in names:
            outer = state[key].double()
            evals = torch.linalg.eigvalsh((outer + outer.T) / 2).flip(0).clamp_min(0)
            if evals.sum() <= 0:
                continue
            share = (evals / evals.sum())[:top]
            ax.semilogy(range(1, len(share) + 1), share.clamp_min(1e-12).numpy(), linewidth=1.2,
                        label=keys.matrix_key(*keys.parse_state_key(key)[1:3]))
        ax.set_title(panels[side], fontsize=10)
        ax.set_xlabel("eigenvalue index", fontsize=8)
        ax.set_ylabel("share of trace", fontsize=8)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, frameon=False,
                  ncol=1 + len(names) // 16)
    legend_width = 1.2 * (1 + max(len(n) for n in found.values()) // 16)
    _layout(fig, axes, title or "covariance spectra", panel=(4.2, 2.9), right=legend_width, wgap=legend_width + 0.6)
    return _save(fig, out_path)


def plot_rsf_k_curve(curves: dict[str, tuple[list[int], list[float]]], out_path: Path,
                     title: str | None = None, thresholds: tuple[Threshold, ...] = (ISOTROPIC,)) -> Path:
    """Relative RSF against k: ``curves[label] = (ks, values)``, with the ``thresholds``."""
    fig, axes = plt.subplots(1, 1, squeeze=False)
    ax = axes[0, 0]
    handles = {}
    for label, (ks, values) in curves.items():
        (handles[label],) = ax.plot(ks, values, marker="o", linewidth=1.2)
    for h in _draw_thresholds(ax, thresholds):
        handles[h.get_label()] = h
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({k for ks, _ in curves.values() for k in ks}))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("k", fontsize=8)
    ax.set_ylabel("relative RSF", fontsize=8)
    ax.tick_params(labelsize=7)
    _layout(fig, axes, title or "relative RSF vs k", handles, panel=(4.8, 2.8), ncol=5, top=0.5)
    return _save(fig, out_path)


def plot_training_curves(phases: list[tuple[str, list[dict]]], out_path: Path, title: str,
                         pretrain: str | None = None) -> Path | None:
    """Loss and preference-accuracy curves of every phase, one panel per kind of curve, against each
    phase's own steps: the CE loss (``train/loss``, held-out ``eval/loss``), the preference loss
    (``pref/loss``, ``eval/pref_loss``) and the preference accuracy (``pref/accuracy``,
    ``eval/pref_accuracy``) with the chance level 0.5. Training curves solid, held-out dashed with
    markers; one colour per phase. None when no phase logged any of these keys."""
    panels = [("CE loss (per token)", "train/loss", "eval/loss", None),
              ("preference loss (per pair)", "pref/loss", "eval/pref_loss", None),
              ("preference accuracy", "pref/accuracy", "eval/pref_accuracy", (0.5, "chance (0.5)"))]
    present = [p for p in panels if any(k in r for _, rows in phases for r in rows for k in p[1:3])]
    if not present:
        return None
    colors = phase_colors([n for n, _ in phases], pretrain)
    fig, axes = plt.subplots(1, len(present), squeeze=False)
    handles: dict[str, Line2D] = {}
    for ax, (label, train_key, eval_key, chance) in zip(axes.flat, present):
        for name, rows in phases:
            for key, style in ((train_key, {"linestyle": "-", "linewidth": 1.2}),
                               (eval_key, {"linestyle": "--", "linewidth": 1.2, "marker": "o", "markersize": 3})):
                points = _finite([(r["step"], r[key]) for r in rows if key in r])
                if points:
                    steps, values = zip(*points)
                    ax.plot(steps, values, color=colors[name], **style)
                    handles.setdefault(name, Line2D([], [], color=colors[name], linewidth=1.5))
        if chance is not None:
            for h in _draw_thresholds(ax, [chance]):
                handles.setdefault(h.get_label(), h)
            ax.set_ylim(-0.05, 1.05)
        ax.set_title(label, fontsize=10)
        _step_axis(ax, "optimizer step of the phase")
        ax.tick_params(labelsize=7)
    handles["training"] = Line2D([], [], color="gray", linestyle="-")
    handles["held-out"] = Line2D([], [], color="gray", linestyle="--", marker="o", markersize=3)
    _layout(fig, axes, title, handles, panel=(3.8, 2.6), ncol=7)
    return _save(fig, out_path)


def plot_phase_trajectories(phases: list[tuple[str, dict[str, list[tuple[int, float]]]]], out_path: Path,
                            title: str, ylabel: str, pretrain: str | None = None,
                            thresholds: tuple[Threshold, ...] = (ISOTROPIC,)) -> Path:
    """A summary metric of every phase against step, in two panels that share the y axis: the
    pretraining phase (``pretrain``) over its own steps on the left, every alignment run on the right
    over its steps from the pretrained checkpoint (so short alignment runs are not squeezed into the
    end of a long pretraining axis). ``phases[i] = (name, {line label: [(step, value)]})``: several
    lines per phase (e.g. the read pathway and its controls) get the line styles in order."""
    colors = phase_colors([n for n, _ in phases], pretrain)
    groups = [[p for p in phases if p[0] == pretrain], [p for p in phases if p[0] != pretrain]]
    groups = [g for g in groups if any(_finite(pts) for _, lines in g for pts in lines.values())]
    if not groups:
        raise ValueError(f"no finite points to plot for {title!r}")
    fig, axes = plt.subplots(1, len(groups), squeeze=False, sharey=True)
    handles: dict[str, Line2D] = {}  # phases, then line kinds, then thresholds
    levels: dict[str, Line2D] = {}
    styles: dict[str, str] = {}
    for ax, group in zip(axes.flat, groups):
        is_pretrain = group[0][0] == pretrain
        for name, lines in group:
            for label, points in lines.items():
                points = _finite(points)
                if not points:
                    continue
                style = styles.setdefault(label, LINE_STYLES[len(styles) % len(LINE_STYLES)])
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o", markersize=3.5, linestyle=style, color=colors[name],
                        linewidth=2.0 if is_pretrain else 1.3)
                handles.setdefault(name, Line2D([], [], color=colors[name], linewidth=2.0))
        for h in _draw_thresholds(ax, thresholds):
            levels.setdefault(h.get_label(), h)
        ax.set_title("pretraining (CE)" if is_pretrain else "alignment runs, from the pretrained checkpoint"
                     if pretrain else "alignment runs", fontsize=9)
        _step_axis(ax, "pretraining step" if is_pretrain else "alignment step")
        ax.tick_params(labelsize=7, labelleft=True)
    axes.flat[0].set_ylabel(ylabel, fontsize=8)
    if len(styles) > 1:
        for label, style in styles.items():
            handles[label] = Line2D([], [], color="gray", linestyle=style)
    handles.update(levels)
    _layout(fig, axes, title, handles, panel=(4.4, 2.9), ncol=6)
    return _save(fig, out_path)


def plot_scale(x: list[float], lines: dict[str, list[float | None]], out_path: Path,
               thresholds: tuple[Threshold, ...] = (ISOTROPIC,)) -> Path:
    """Each claim's figure across a sweep: ``lines[label]`` against ``x`` (hidden size x layers, log axis)."""
    fig, axes = plt.subplots(1, 1, squeeze=False)
    ax = axes[0, 0]
    handles = {}
    for label, values in lines.items():
        points = _finite([(xi, v) for xi, v in zip(x, values) if v is not None])
        if points:
            xs, ys = zip(*points)
            (handles[label],) = ax.plot(xs, ys, marker="o")
    for h in _draw_thresholds(ax, thresholds):
        handles[h.get_label()] = h
    ax.set_xscale("log")
    ax.set_xlabel("hidden size x layers", fontsize=8)
    ax.set_ylabel("relative RSF (mean over roles, layers)", fontsize=8)
    _layout(fig, axes, "Each claim's figure across the sweep", handles, panel=(6.0, 3.2), ncol=2, top=0.5)
    return _save(fig, out_path)


def plot_write_evidence(deltas: dict[str, dict[str, dict[int, float]]],
                        init: dict[str, dict[int, tuple[float, float]]] | None,
                        masses: dict[str, dict[str, dict[int, float]]], out_path: Path, title: str,
                        roles: tuple[str, ...] = ("o", "down"), pretrain: str | None = None,
                        thresholds: tuple[Threshold, ...] = (ISOTROPIC,)) -> Path | None:
    """The write side's k-curves, one panel per role: (i) each phase's own delta (solid, a colour per phase;
    pretraining black), (ii) the whole pretraining delta against init (thick gray with the seeds' sd as error
    bars), (iii) each phase's C_delta mass (dotted, the phase's colour). ``deltas[phase][role] = {k: value}``,
    ``init[role] = {k: (mean, sd)}``, ``masses`` as ``deltas``. None when there is nothing to draw."""
    names = list(dict.fromkeys([*deltas, *masses]))
    if not names and not init:
        return None
    colors = phase_colors(names, pretrain)
    fig, axes = plt.subplots(1, len(roles), squeeze=False)
    handles: dict[str, Line2D] = {}
    all_ks: set[int] = set()
    for ax, role in zip(axes[0], roles):
        for name in names:
            for source, style, label in ((deltas, "-", f"{name}: delta (i)"),
                                         (masses, ":", f"{name}: C_delta mass (iii)")):
                curve = (source.get(name) or {}).get(role) or {}
                points = _finite(sorted(curve.items()))
                if points:
                    ks, values = zip(*points)
                    all_ks.update(ks)
                    (handles[label],) = ax.plot(ks, values, linestyle=style, marker="o", markersize=3,
                                                color=colors[name], linewidth=1.2)
        if init and init.get(role):
            ks = sorted(init[role])
            all_ks.update(ks)
            handles["whole pretraining delta vs init (ii), mean ± sd over seeds"] = ax.errorbar(
                ks, [init[role][k][0] for k in ks], yerr=[init[role][k][1] for k in ks], color="gray", linewidth=2.4,
                marker="s", markersize=4, capsize=3)[0]
        for h in _draw_thresholds(ax, thresholds):
            handles[h.get_label()] = h
        ax.set_xscale("log", base=2)
        ax.set_title(role, fontsize=9)
        ax.set_xlabel("k", fontsize=8)
        ax.set_ylabel("relative (1 = isotropic)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[0]:
        if all_ks:
            ax.set_xticks(sorted(all_ks))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
    _layout(fig, axes, title, handles, panel=(4.2, 2.8), ncol=2, top=0.5)
    return _save(fig, out_path)


def _save(fig, out_path: Path) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
