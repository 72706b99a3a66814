"""Report figures: thresholds are drawn as labelled lines, legends sit outside every axes, and the
trajectory gives the alignment runs their own panel (their own steps), not the end of pretraining's."""

from __future__ import annotations

import math

import pytest
import torch

from weightgeom.harness.reports import plots


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions would save, drawn and kept open for inspection."""
    kept = []

    def keep(fig, out_path):
        fig.canvas.draw()
        kept.append(fig)
        return out_path

    monkeypatch.setattr(plots, "_save", keep)
    yield kept
    for fig in kept:
        plots.plt.close(fig)


def _hlines(ax) -> dict[str, float]:
    """Label -> y of the horizontal lines spanning the axes (axhline)."""
    out = {}
    for line in ax.get_lines():
        x, y = line.get_xdata(), line.get_ydata()
        if len(y) == 2 and y[0] == y[1] and list(x) == [0, 1]:
            out[line.get_label()] = float(y[0])
    return out


def _legend_clear_of_axes(fig) -> None:
    renderer = fig.canvas.get_renderer()
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert legends, "no legend"
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            if ax.get_visible() and ax.axison:
                assert not box.overlaps(ax.get_window_extent(renderer)), (legend, ax.get_title())


def test_trajectory_has_an_alignment_panel_thresholds_and_an_outside_legend(figures):
    pre = [(s, 2.0 + s / 1000) for s in range(25, 401, 25)]
    series = [("pretrain (CE)", {"read": pre, "controls": [(s, v - 0.3) for s, v in pre]}),
              ("dpo", {"read": [(5, 3.0), (60, 3.4)], "controls": [(60, math.nan)]}),
              ("g0.00", {"read": [(60, 2.9)], "controls": [(60, 2.5)]})]
    plots.plot_phase_trajectories(series, "unused.png", "t", "relative RSF", pretrain="pretrain (CE)",
                                  thresholds=(plots.ISOTROPIC, (2.0, "concentrated above (2)")))
    (fig,) = figures
    pre_ax, align_ax = fig.axes
    assert pre_ax.get_xlim()[1] >= 400
    assert 60 <= align_ax.get_xlim()[1] < 100  # 60 alignment steps fill their own panel
    assert pre_ax.get_xlim()[0] == align_ax.get_xlim()[0] == 0
    for ax in (pre_ax, align_ax):
        assert _hlines(ax) == {"isotropic (1.0)": 1.0, "concentrated above (2)": 2.0}
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[:3] == ["pretrain (CE)", "dpo", "g0.00"] and "concentrated above (2)" in labels
    _legend_clear_of_axes(fig)


def test_alignment_only_trajectory_is_one_panel(figures):
    plots.plot_phase_trajectories([("dpo", {"read": [(10, 3.0)]})], "unused.png", "t", "y")
    assert len(figures[0].axes) == 1


def test_per_role_plots_training_curves_and_k_curves_keep_legends_off_the_data(figures):
    rows = [{"step": s, "rsf_in/L0/q": 1 + s / 10, "rsf_in/L1/q": 2.0, "rsf_in/L0/v": 3.0,
             "train/loss": 5 - s / 10, "pref/accuracy": 0.5 + s / 100} for s in range(1, 11)]
    rows[4]["rsf_in/L0/q"] = math.nan  # a gap, not a crash
    plots.plot_rsf_over_steps(rows, "rsf_in", "unused.png", thresholds=(plots.ISOTROPIC, (2.0, "threshold")))
    plots.plot_training_curves([("p", rows)], "unused.png", "training")
    plots.plot_rsf_k_curve({"q": ([1, 2, 4], [3.0, 2.0, 1.5])}, "unused.png")
    roles_fig, training_fig, k_fig = figures
    for fig in figures:
        _legend_clear_of_axes(fig)
    assert all(_hlines(ax) == {"isotropic (1.0)": 1.0, "threshold": 2.0} for ax in roles_fig.axes if ax.axison)
    accuracy_ax = [ax for ax in training_fig.axes if ax.get_title() == "preference accuracy"][0]
    assert _hlines(accuracy_ax) == {"chance (0.5)": 0.5}
    assert _hlines(k_fig.axes[0]) == {"isotropic (1.0)": 1.0}
    assert [t.get_text() for t in k_fig.axes[0].get_xticklabels()] == ["1", "2", "4"]


def test_spectra_skip_non_finite_covariances(figures):
    state = {"cov_in/L0/attn_in/sum_outer": torch.eye(4), "cov_in/L1/attn_in/sum_outer": torch.full((4, 4), math.nan),
             "cov_out/L0/o/sum_outer": torch.diag(torch.tensor([4.0, 1.0, 1.0]))}
    plots.plot_spectra(state, "unused.png")
    (fig,) = figures
    assert [[line.get_label() for line in ax.get_lines()] for ax in fig.axes] == [["L0/attn_in"], ["L0/o"]]
    _legend_clear_of_axes(fig)
    with pytest.raises(ValueError, match="no finite"):
        plots.plot_spectra({"cov_in/L0/attn_in/sum_outer": torch.full((2, 2), math.inf)}, "unused.png")
