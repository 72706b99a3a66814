"""PNG plots for reports, drawn only from saved files (metrics rows, instrument snapshots).

Every function writes one PNG and returns its path; matplotlib runs headless (Agg).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from hooks import keys  # noqa: E402
from hooks.roles import ROLES  # noqa: E402



def plot_rsf_over_steps(rows: list[dict], prefix: str, out_path: Path, title: str | None = None) -> Path:
    """One panel per role: ``{prefix}/L{i}/{role}`` against step, a line per layer, plus the
    isotropic level 1.0. ``prefix`` is a relative-RSF family such as ``rsf_in`` or ``rsf_out_pred``."""
    series: dict[str, dict[int, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        for key, value in row.items():
            found = keys.layer_of(key, prefix)
            if found and value == value:  # NaN (a null in the JSONL) is no point
                layer, role = found
                series[role][layer].append((row["step"], value))
    if not series:
        raise ValueError(f"no '{prefix}/L*/*' metrics in these rows: was the phase instrumented?")
    roles = [r for r in ROLES if r in series] + sorted(set(series) - set(ROLES))
    cols = min(len(roles), 4)
    nrows = (len(roles) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 2.8 * nrows), squeeze=False, sharex=True)
    for ax, role in zip(axes.flat, roles):
        for layer, points in sorted(series[role].items()):
            steps, values = zip(*points)
            ax.plot(steps, values, marker=".", linewidth=1.2, label=f"L{layer}")
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
        ax.set_title(role, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(roles):]:
        ax.axis("off")
    axes.flat[0].set_ylabel("relative RSF (1 = isotropic)", fontsize=8)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title or f"{prefix} over steps", fontsize=11)
    fig.tight_layout()
    return _save(fig, out_path)


def plot_spectra(state: dict[str, torch.Tensor], out_path: Path, title: str | None = None, top: int = 64) -> Path:
    """Eigenvalue spectra (normalised to sum 1, log scale) of every ``C_a`` and ``C_delta`` in an
    instrument snapshot; one panel per side, a line per layer/group."""
    panels = {"cov_in": "C_a (input side)", "cov_out": "C_delta (output side)"}
    found = {side: sorted(k for k in state if (p := keys.parse_state_key(k)) and p[0] == side and p[3] == "sum_outer")
             for side in panels}
    found = {side: names for side, names in found.items() if names}
    if not found:
        raise ValueError("no cov_in/*/sum_outer or cov_out/*/sum_outer tensors in this snapshot")
    fig, axes = plt.subplots(1, len(found), figsize=(5.5 * len(found), 3.8), squeeze=False)
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
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle(title or "covariance spectra", fontsize=11)
    fig.tight_layout()
    return _save(fig, out_path)


def plot_rsf_k_curve(curves: dict[str, tuple[list[int], list[float]]], out_path: Path,
                     title: str | None = None) -> Path:
    """Relative RSF against k: ``curves[label] = (ks, values)``."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, (ks, values) in curves.items():
        ax.plot(ks, values, marker="o", linewidth=1.2, label=label)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("relative RSF")
    ax.legend(fontsize=7)
    ax.set_title(title or "relative RSF vs k", fontsize=11)
    fig.tight_layout()
    return _save(fig, out_path)


def plot_series(rows: list[dict], keys: list[str], out_path: Path, title: str, ylabel: str) -> Path:
    """Plain line plot of a few scalar metrics against step (loss curves)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for key in keys:
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker=".", linewidth=1.2, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out_path)


def _save(fig, out_path: Path) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def plot_phase_trajectories(phases: list[tuple[str, list[tuple[int, float]]]], out_path: Path, title: str,
                            ylabel: str, offset_after: str | None = None) -> Path:
    """One line per phase of a summary metric against step. With ``offset_after`` (a phase name,
    e.g. pretraining), the other phases start where that one ends, so alignment runs read as
    continuations of the checkpoint they all start from."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    offset = 0
    if offset_after is not None:
        base = dict(phases).get(offset_after) or []
        offset = max((s for s, _ in base), default=0)
    for name, points in phases:
        if not points:
            continue
        shift = 0 if name == offset_after else offset
        steps, values = zip(*points)
        style = {"color": "black", "linewidth": 2.0} if name == offset_after else {"linewidth": 1.3}
        ax.plot([s + shift for s in steps], values, marker=".", label=name, **style)
    if offset:
        ax.axvline(offset, color="gray", linestyle=":", linewidth=1)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel("optimizer step" + (" (alignment runs start at the checkpoint)" if offset else ""))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _save(fig, out_path)
