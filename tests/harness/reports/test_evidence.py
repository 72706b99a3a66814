"""The write side's evidence in the asymmetry report, on real (tiny) pipeline runs: (i) each phase's delta
k-curve is the live final ``rsf_out_pred`` at k (from the phase's W0 file, or its starting checkpoint when the
W0 file is not kept); (iii) the mass k-curve is the live final ``mass_pred`` at k; (ii) a run that starts from a
checkpoint gets ``RUN/init_delta/`` from the pipeline, and its CE verdict rests on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from weightgeom.core.sinks import read_metrics
from weightgeom.harness.cli import main
from weightgeom.harness.reports.claims import BASIS_INIT, BASIS_MASS, BASIS_PHASE
from weightgeom.harness.reports.evidence import INIT_DELTA, write_evidence
from weightgeom.harness.reports.phases import PRETRAIN, load_phases, read_config

pytestmark = pytest.mark.slow
K = 4
OBJECTIVES = "[{name: dpo, loss: trl, loss_type: sigmoid}, {name: g1.00, loss: graded, grade: 1.0}]"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, tokenizer_cache) -> Path:
    """The smoke pipeline trained from scratch: pretraining, TRL's DPO and our g1.00, the report."""
    out = tmp_path_factory.mktemp("scratch")
    assert main(["run", "asymmetry_smoke", f"output_dir={out}", "name=run", f"tokenizer.cache_dir={tokenizer_cache}",
                 f"align.objectives={OBJECTIVES}", "--no-progress"]) == 0
    return out / "run"


def _live(phase_dir: Path) -> dict:
    return [r for r in read_metrics(phase_dir / "metrics.jsonl") if "rsf_out_pred/all/o" in r][-1]


def test_k_curves_of_the_evidence_are_the_live_numbers_at_k(scratch):
    cfg = read_config(scratch)
    phases = load_phases(scratch)
    ev = write_evidence(scratch, cfg, phases)
    assert ev.start is None and ev.pretraining is None and not ev.notes
    for phase in phases:
        live = _live(phase.path)
        for role in ("o", "down"):
            # (i) from the W0 file (pretrain, g1.00) or from the starting checkpoint (TRL's dpo keeps no W0 file)
            assert ev.delta_curves[phase.name][role][K] == pytest.approx(live[f"rsf_out_pred/all/{role}"],
                                                                         rel=1e-4), (phase.name, role)
            # (iii) from the final snapshot's curve_mass energies
            assert ev.mass_curves[phase.name][role][K] == pytest.approx(live[f"mass_pred/all/{role}"],
                                                                        rel=1e-4), (phase.name, role)
        assert sorted(ev.delta_curves[phase.name]["o"]) == [1, 2, 4, 8, 16]  # k below the width 32
    report = (scratch / "report" / "report.md").read_text()
    verdicts = {v["id"]: v for v in json.loads((scratch / "report" / "verdicts.json").read_text())}
    ce = verdicts["ce_prediction"]
    assert ce["basis"].startswith(BASIS_PHASE) and "random init" in ce["basis"]
    assert ce["curve"]["4"] == pytest.approx(sum(_live(scratch / "pretrain")[f"rsf_out_pred/all/{r}"]
                                                 for r in ("o", "down")) / 2, rel=1e-4)
    assert verdicts["ce_mechanism"]["basis"].startswith(BASIS_MASS)
    assert "## The write side's evidence" in report and "  - Rests on (i)" in report
    assert "Not needed: the model was trained from a random initialisation" in report
    assert (scratch / "report" / "write_evidence.png").is_file()
    assert not (scratch / INIT_DELTA).exists()  # from scratch: no starting checkpoint to compare with init


def test_a_run_from_a_checkpoint_rests_the_ce_claim_on_the_whole_pretraining_delta(scratch, tmp_path,
                                                                                 tokenizer_cache):
    start = scratch / "pretrain" / "checkpoints" / "step_0000030"
    assert main(["run", "asymmetry_smoke", f"output_dir={tmp_path}", "name=run", f"init_from={start}",
                 f"tokenizer.cache_dir={tokenizer_cache}", "train.steps=4", "train.eval_every=0",
                 "align.train.steps=2", "align.objectives=[{name: g1.00, loss: graded, grade: 1.0}]",
                 "--no-progress"]) == 0
    run = tmp_path / "run"
    init = json.loads((run / INIT_DELTA / "init.json").read_text())
    assert init["seeds"] == [0, 1, 2] and init["after_dir"] == str(start) and init["k"] == K
    assert "rsf_in/all/q" not in init["summary"]  # the write side only
    verdicts = {v["id"]: v for v in json.loads((run / "report" / "verdicts.json").read_text())}
    ce = verdicts["ce_prediction"]
    assert ce["basis"].startswith(BASIS_INIT) and str(start) in ce["basis"]
    summary = init["summary"]
    expected = [(o + d) / 2 for o, d in zip(summary["rsf_out_pred/all/o"]["values"],
                                            summary["rsf_out_pred/all/down"]["values"])]
    assert f"(ii) {start} - random init, seeds 0, 1, 2" in ce["evidence"]  # as init_from names it
    assert ce["held"] == all(v > 2.0 for v in expected) and "(i) continued CE's delta" in ce["evidence"]
    assert ce["curve"]["4"] == pytest.approx(sum(expected) / 3)
    report = (run / "report" / "report.md").read_text()
    assert f"[{INIT_DELTA}/report.md](../{INIT_DELTA}/report.md)" in report
    # pretraining from the checkpoint: (i) from the phase's W0 file; its starting checkpoint gives the same
    phases = load_phases(run)
    live = _live(run / "pretrain")
    ev = write_evidence(run, read_config(run), phases)
    assert ev.delta_curves[PRETRAIN]["o"][K] == pytest.approx(live["rsf_out_pred/all/o"], rel=1e-4)
    for w0 in (run / "pretrain" / "instruments").glob("W0-*.safetensors"):
        w0.unlink()
    again = write_evidence(run, read_config(run), phases)
    assert again.delta_curves[PRETRAIN]["o"][K] == pytest.approx(live["rsf_out_pred/all/o"], rel=1e-4)
    # a resumed pipeline keeps RUN/init_delta
    stamp = (run / INIT_DELTA / "init.json").stat().st_mtime_ns
    assert main(["run", "asymmetry_smoke", f"output_dir={tmp_path}", "name=run", f"init_from={start}",
                 f"tokenizer.cache_dir={tokenizer_cache}", "train.steps=4", "train.eval_every=0",
                 "align.train.steps=2", "align.objectives=[{name: g1.00, loss: graded, grade: 1.0}]",
                 "--no-progress", "--resume", "latest"]) == 0
    assert (run / INIT_DELTA / "init.json").stat().st_mtime_ns == stamp
