"""Reports from saved files: tables hold the logged numbers, plots are real PNGs, k-curves recomputed
from a snapshot match the geometry functions; the summary, the health block and the verdicts render
as stated, diverged runs give notes instead of tracebacks, and re-rendering is byte-identical."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from safetensors.torch import save_file

from tests.conftest import REPO
from tests.synthetic_runs import pipeline
from weightgeom.core.sinks import build_sinks
from weightgeom.harness.reports.asymmetry import write_asymmetry_report
from weightgeom.harness.reports.markdown import markdown_table
from weightgeom.harness.reports.run_report import k_curves, write_run_report
from weightgeom.hooks import geometry as geo

PNG = b"\x89PNG\r\n\x1a\n"


def test_markdown_table_formats_three_significant_figures():
    table = markdown_table(["a", "b"], [["x", 3.14159], ["y", None], ["z", float("nan")], ["w", float("-inf")]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x | 3.14 |", "| y | - |", "| z | NaN |", "| w | -inf |"]


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


def test_recorded_k_curves_give_the_curves_of_the_delta_they_were_recorded_from():
    """A snapshot written now holds, instead of the delta, its energy along each top eigenvector of C_a
    (curve_in/...): the report's curve from those equals the one recomputed from the delta itself."""
    legacy = _planted_snapshot()
    dW = legacy.pop("weights/L0/q/delta").double()
    _, evecs = geo.sym_eigh(legacy["cov_in/L0/attn_in/sum_outer"].double())
    recorded = {**legacy, "curve_in/L0/q/energy": (dW @ evecs[:, :8]).square().sum(0),
                "curve_in/L0/q/sq_norm": dW.square().sum()}
    ks, values = k_curves(recorded, [1, 4, 8])["q"]
    expected = k_curves(_planted_snapshot(), [1, 4, 8])["q"]
    assert ks == expected[0] and values == pytest.approx(expected[1], rel=1e-6)


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
    for name in ("training.png", "rsf_in.png", "rsf_out_pred.png", "spectra.png", "rsf_k_curve.png"):
        assert (tmp_path / "report" / name).read_bytes()[:8] == PNG, name
        assert f"({name})" in report
    _, evecs = geo.sym_eigh(snap["cov_in/L0/attn_in/sum_outer"])
    expected = geo.rsf_curve(snap["weights/L0/q/delta"].double(), evecs, [1, 4], side="in")
    assert f"| q | {expected[1]:.3g} | {expected[4]:.3g} |" in report


def test_run_report_of_a_diverged_run_notes_non_finite_values_instead_of_crashing(tmp_path):
    (tmp_path / "config.yaml").write_text("instruments: {k: 4, k_curve: [1, 4]}\n")
    sinks = build_sinks(tmp_path, ["jsonl"])
    for step, loss in ((1, 4.0), (2, float("nan")), (3, float("inf"))):
        sinks.log({"phase": "pretrain", "train/loss": loss, "rsf_in/L0/q": 2.0 if step < 3 else float("nan"),
                   "rsf_in/all/q": 2.0, "z_in/all/q": 5.0}, step)
    sinks.close()
    snap = {k: v.contiguous() for k, v in _planted_snapshot().items()}
    snap["cov_in/L0/attn_in/sum_outer"] = torch.full_like(snap["cov_in/L0/attn_in/sum_outer"], float("nan"))
    (tmp_path / "instruments").mkdir()
    save_file(snap, str(tmp_path / "instruments" / "step_0000003.safetensors"))
    report = write_run_report(tmp_path).read_text()  # eigh of a NaN matrix raised before
    assert "## Health: 2 warnings" in report
    assert "non-finite values (NaN or inf) in 1 training metrics (train/loss from step 2)" in report
    assert "cov_in/L0/attn_in/sum_outer" in report.split("## Covariance spectra")[1]
    assert (tmp_path / "report" / "spectra.png").read_bytes()[:8] == PNG  # the finite C_delta is still drawn
    health = json.loads((tmp_path / "report" / "health.json").read_text())
    assert [w["check"] for w in health["warnings"]] == ["non_finite", "non_finite"]
    assert "| q | NaN | 2 | 5 |" in report  # the last geometry row: a non-finite value shown as such


def test_run_report_summary_reads_run_info_when_present(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"seed": 3, "instruments": {"k": 4, "every_n": 5},
                                                          "train": {"batch_size": 2, "grad_accum": 2},
                                                          "data": {"seq_len": 16}}))
    sinks = build_sinks(tmp_path, ["jsonl"])
    for step in (1, 2, 3):
        sinks.log({"phase": "pretrain", "train/loss": 5.0 - step}, step)
    sinks.close()
    report = write_run_report(tmp_path).read_text()
    assert "| seed | 3 | config.yaml |" in report
    assert "| versions | not recorded | run_info.json absent |" in report
    assert "| parameters | not recorded |" in report
    assert "| pretrain | 3 | 192 tokens (3 steps x 4 blocks x 16) |" in report
    (tmp_path / "run_info.json").write_text(json.dumps({"versions": {"torch": "2.13.0", "trl": "1.16.0"},
                                                        "n_params": 123456, "tokens_seen": 999,
                                                        "started": "2026-01-01T00:00:00Z"}))
    report = write_run_report(tmp_path).read_text()
    assert "| versions | torch 2.13.0, trl 1.16.0 | run_info.json |" in report
    assert "| parameters | 123,456 | run_info.json |" in report
    assert "| pretrain | 3 | 999 tokens (run_info.json) |" in report
    assert "| started / finished | 2026-01-01T00:00:00Z / not recorded |" in report
    (tmp_path / "run_info.json").write_text("{not json")
    assert "run_info.json is not valid JSON" in write_run_report(tmp_path).read_text()


def test_asymmetry_report_of_a_memorising_run_warns_at_the_top(tmp_path):
    run = pipeline(tmp_path / "mem", memorising=True)
    report = write_asymmetry_report(run).read_text()
    health = report.index("## Health: 1 warning")
    assert report.index("## Run summary") < health < report.index("## Verdicts")
    assert "> **WARNING (memorisation, pretrain (CE))**: eval/loss rose from its minimum 2.3 (step 1000)" in report
    data = json.loads((run / "report" / "health.json").read_text())
    assert [(w["check"], w["phase"]) for w in data["warnings"]] == [("memorisation", "pretrain (CE)")]
    healthy = pipeline(tmp_path / "ok")
    report = write_asymmetry_report(healthy).read_text()
    assert "## Health: no warnings" in report
    assert json.loads((healthy / "report" / "health.json").read_text())["warnings"] == []


def test_asymmetry_report_of_an_alignment_only_run_does_not_hold_the_ce_claims(tmp_path):
    run = pipeline(tmp_path / "byo", pretrain=False, k=6, align_accuracy=0.5)
    report = write_asymmetry_report(run).read_text()
    found = {v["id"]: v for v in json.loads((run / "report" / "verdicts.json").read_text())}
    assert list(found) == ["read_concentrates", "read_specific", "write_isotropic", "ce_prediction",
                           "grade_dependence", "ce_mechanism", "write_mechanism"]
    assert found["write_isotropic"]["held"] is None and found["ce_prediction"]["held"] is None
    assert found["ce_mechanism"]["held"] is None and found["write_mechanism"]["held"] is None
    assert "- **NOT MEASURED**: Write pathway" in report and "- **NOT MEASURED**: CE pretraining" in report
    assert "CE: n/a" not in report
    assert "| objective | covariance | top-1 share | top-6 share |" in report  # the run's k, not 8
    assert "| initialised from | /models/base |" in report
    assert "WARNING (preference at chance, dpo)" in report  # accuracy 0.5 over 5 x 8 pairs


def test_asymmetry_report_rerenders_byte_identically_and_links_the_definitions(tmp_path):
    run = pipeline(tmp_path / "run")
    write_asymmetry_report(run)
    first = {n: (run / "report" / n).read_bytes() for n in ("report.md", "verdicts.json", "health.json")}
    write_asymmetry_report(run)
    assert {n: (run / "report" / n).read_bytes() for n in first} == first
    link = re.search(r"\[docs/metrics\.md\]\(([^)]+)\)", first["report.md"].decode()).group(1)
    assert (run / "report" / link).resolve() == (REPO / "docs" / "metrics.md")
    for name in ("training.png", "trajectory_rsf_in.png", "trajectory_rsf_out_pred.png"):
        assert (run / "report" / name).read_bytes()[:8] == PNG, name


def test_asymmetry_report_of_a_diverged_phase_says_not_measured(tmp_path):
    run = pipeline(tmp_path / "run")
    rows = [json.loads(line) for line in (run / "align" / "g1.00" / "metrics.jsonl").read_text().splitlines()]
    for row in rows:  # the g1.00 run diverged: every number from step 20 on is null (NaN)
        if row["step"] >= 20:
            row.update({k: None for k in row if k not in ("step", "phase")})
    (run / "align" / "g1.00" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = write_asymmetry_report(run).read_text()
    found = {v["id"]: v["held"] for v in json.loads((run / "report" / "verdicts.json").read_text())}
    assert found == {"read_concentrates": None, "read_specific": None, "write_isotropic": None,
                     "ce_prediction": True, "grade_dependence": None,
                     "ce_mechanism": None, "write_mechanism": None}  # these synthetic rows hold no mass_pred
    assert "> **WARNING (non-finite, g1.00)**: non-finite values (NaN or inf) in 3 training metrics" in report
    assert "g1.00: relative RSF_in NaN (z NaN)" in report
