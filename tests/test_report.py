"""Run report from saved files: tables hold the logged numbers, plots are real PNGs, k-curves
recomputed from a snapshot match the geometry functions."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from hooks import geometry as geo
from harness.report import k_curves, markdown_table, write_run_report
from core.sinks import build_sinks

PNG = b"\x89PNG\r\n\x1a\n"


def test_markdown_table_formats_three_significant_figures():
    table = markdown_table(["a", "b"], [["x", 3.14159], ["y", None], ["z", float("nan")]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x | 3.14 |", "| y | - |", "| z | - |"]


def _planted_snapshot(n=16, m=12, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    evals = torch.tensor([10.0] * k + [1.0] * (n - k), dtype=torch.float64)
    C = basis @ torch.diag(evals) @ basis.T
    dW = torch.randn(m, k, generator=g, dtype=torch.float64) @ basis[:, :k].T  # inside the top-k subspace
    return {"cov_in/L0/attn_in/sum_outer": C * 100, "cov_in/L0/attn_in/count": torch.tensor(100.0),
            "weights/L0/q/delta": dW.float(), "cov_out/L0/o/sum_outer": torch.eye(m, dtype=torch.float64)}


def test_k_curve_of_a_planted_delta():
    curves = k_curves(_planted_snapshot(), [1, 4, 8])
    ks, values = curves["q"]
    assert ks == [1, 4, 8]
    assert abs(values[1] - 16 / 4) < 1e-6  # all energy in the top-4 subspace: relative RSF = n / k
    assert abs(values[2] - 16 / 8) < 1e-6


def test_run_report_renders_logged_numbers_and_plots(tmp_path):
    (tmp_path / "config.yaml").write_text("instruments: {k: 4, k_curve: [1, 4]}\n")
    sinks = build_sinks(tmp_path, ["jsonl"])
    for step in (1, 2, 3):
        sinks.log({"phase": "pretrain", "train/loss": 5.0 - step, "rsf_in/L0/q": 1.0 + step,
                   "rsf_in/L1/q": 2.0 * step, "rsf_in/all/q": 1.5 * step + 0.5, "z_in/all/q": 7.25,
                   "rsf_out_pred/L0/o": 0.5}, step)
    sinks.close()
    snap = {k: v.contiguous() for k, v in _planted_snapshot().items()}
    (tmp_path / "instruments").mkdir()
    save_file(snap, str(tmp_path / "instruments" / "step_0000003.safetensors"))
    report = write_run_report(tmp_path).read_text()
    assert "| q | 4 | 6 | 5 | 7.25 |" in report  # L0, L1, mean, z at the last step
    assert "| o | 0.5 | - | - |" in report
    for name in ("loss.png", "rsf_in.png", "rsf_out_pred.png", "spectra.png", "rsf_k_curve.png"):
        assert (tmp_path / "report" / name).read_bytes()[:8] == PNG, name
        assert f"({name})" in report
    _, evecs = geo.sym_eigh(snap["cov_in/L0/attn_in/sum_outer"])
    expected = geo.rsf_curve(snap["weights/L0/q/delta"].double(), evecs, [1, 4], side="in")
    assert f"| q | {expected[1]:.3g} | {expected[4]:.3g} |" in report
