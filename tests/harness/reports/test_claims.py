"""Verdict logic: every claim is always reported; a missing or non-finite comparison is NOT MEASURED,
never HELD; read-pathway specificity follows its stated rule."""

from __future__ import annotations

import math

from tests.synthetic_runs import geometry
from weightgeom.harness.reports.claims import CLAIMS, SPECIFIC_EXCESS, Specificity, verdicts
from weightgeom.harness.reports.phases import Phase

CONTROLS = {"v": 2.0, "gate": 2.2, "up": 1.8}


def _phases(pretrain: bool = True, read: dict | None = None, write_dpo: float = 1.2, ce_write: float = 4.0,
            z: float = 8.0) -> list[Phase]:
    read = read or {"q": 6.0, "k": 5.0, **CONTROLS}
    phases = []
    if pretrain:
        ce_row = {"step": 10, **geometry(read, {"o": ce_write, "down": ce_write})}
        phases.append(Phase("pretrain (CE)", "ce", None, [ce_row]))
    for name, kind, grade, write in (("dpo", "trl", 1.0, write_dpo), ("g0.00", "graded", 0.0, 1.6),
                                     ("g0.50", "graded", 0.5, 1.3), ("g1.00", "graded", 1.0, write_dpo)):
        phases.append(Phase(name, kind, grade, [{"step": 4, **geometry(read, {"o": write, "down": write}, z=z)}]))
    return phases


def by_id(found):
    return {v.id: v for v in found}


def test_every_claim_is_reported_in_order_and_holds_on_planted_numbers():
    found = verdicts(_phases())
    assert [v.id for v in found] == list(CLAIMS)
    assert [v.status for v in found] == ["HELD"] * 5
    assert all(v.rule.startswith("held if") for v in found)


def test_alignment_without_ce_is_not_measured_on_the_ce_comparisons():
    found = by_id(verdicts(_phases(pretrain=False)))
    assert len(found) == len(CLAIMS)
    write = found["write_isotropic"]
    assert write.held is None and write.status == "NOT MEASURED"  # 1.2 < 2.0, but there is no CE to be below
    assert "dpo: relative RSF_out(pred) 1.20" in write.evidence and "no CE pretraining phase" in write.evidence
    assert found["ce_prediction"].held is None and "no CE pretraining phase" in found["ce_prediction"].evidence
    assert found["read_concentrates"].held is True  # needs no CE


def test_read_pathway_specificity_against_the_controls():
    # the default run's numbers from the issue: q, k barely above v, gate, up (DPO: q 9.61, v 9.35, gate 9.04)
    default = {"q": 9.61, "k": 9.50, "v": 9.35, "gate": 9.04, "up": 9.20}
    found = by_id(verdicts(_phases(read=default)))
    spec = found["read_specific"]
    assert spec.held is False
    assert "read (q, k) 9.55 vs controls (v, gate, up) 9.20 (sd 0.13), excess 0.36" in spec.evidence
    assert found["read_concentrates"].held is True  # concentrated, just not specifically
    s = Specificity({"q": 6.0, "k": 5.0}, CONTROLS)
    assert abs(s.excess - 3.5) < 1e-12 and abs(s.control_sd - math.sqrt(0.08 / 3)) < 1e-12 and s.specific
    # above the controls by less than the stated excess: not specific
    assert not Specificity({"q": 2.0 + SPECIFIC_EXCESS - 0.01}, {"v": 2.0}).specific
    # the spread rule: excess 1.5, but controls spread with sd 1.0 -> 2 sd = 2.0 > 1.5
    assert not Specificity({"q": 4.5}, {"v": 2.0, "gate": 4.0}).specific
    # controls not instrumented: not measured
    found = by_id(verdicts(_phases(read={"q": 6.0, "k": 5.0})))
    assert found["read_specific"].held is None and "not measured" in found["read_specific"].evidence


def test_non_finite_numbers_make_a_claim_not_measured():
    phases = _phases()
    phases[1].rows[-1]["rsf_in/all/q"] = math.nan  # dpo diverged
    phases[0].rows[-1]["z_out_pred/all/o"] = math.inf
    found = by_id(verdicts(phases))
    assert found["read_concentrates"].held is None and "NaN" in found["read_concentrates"].evidence
    assert found["read_specific"].held is None
    assert found["ce_prediction"].held is None
    assert found["write_isotropic"].held is True and found["grade_dependence"].held is True  # untouched numbers
    phases[2].rows[-1]["rsf_out_pred/all/down"] = math.nan  # g0.00
    assert by_id(verdicts(phases))["grade_dependence"].held is None


def test_claims_without_their_phases_are_not_measured():
    ce_only = _phases()[:1]
    found = by_id(verdicts(ce_only))
    assert [found[c].held for c in ("read_concentrates", "read_specific", "write_isotropic")] == [None] * 3
    assert found["ce_prediction"].held is True
    assert found["grade_dependence"].held is None and "0 graded" in found["grade_dependence"].evidence
