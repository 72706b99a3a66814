"""The asymmetry claims, judged from the final geometry of each phase with stated rules.

Every claim is always reported, in the order of :data:`CLAIMS`, with one of three outcomes: HELD,
DID NOT HOLD, or NOT MEASURED. NOT MEASURED is the outcome whenever a number or a comparison the
rule needs is missing or non-finite (no grade-1 objective, no CE pretraining phase, a control role
not instrumented, a diverged phase): a claim is never HELD on a partial comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from weightgeom.harness.reports.phases import Phase, mean_over, role_means
from weightgeom.hooks.roles import WRITE_ROLES

READ_ROLES = ("q", "k")  # the paper's read pathway
CONTROL_ROLES = ("v", "gate", "up")  # read the same inputs as q/k (v) or the MLP's (gate, up): the comparisons
# Thresholds (relative RSF: 1.0 = isotropic). Stated in the report next to every verdict.
CONCENTRATED = 2.0  # relative RSF above this, with z above Z_MIN, counts as concentrated
NEAR_ISOTROPIC = 2.0  # relative RSF below this counts as near-isotropic
Z_MIN = 3.0
SPECIFIC_EXCESS = 1.0  # read-pathway mean above the controls' mean by more than this (relative RSF units)
SPECIFIC_SPREAD = 2.0  # ... and by more than this many standard deviations of the controls' role means
GRADE_RHO = -0.5  # Spearman correlation of write-side RSF with the grade, at most this
GRADE_DROP = 0.25  # and the g=0 value above the g=1 value by at least this (relative RSF units)

CLAIMS = {
    "read_concentrates": "Read pathway (W_Q, W_K) concentrates along the top C_a directions under alignment",
    "read_specific": "That concentration is specific to the read pathway: W_Q, W_K above the W_V, gate, up "
                     "controls under alignment",
    "write_isotropic": "Write pathway (W_O, W_down) stays near-isotropic w.r.t. the prediction subspace under "
                       "alignment, below CE pretraining",
    "ce_prediction": "CE pretraining writes prediction geometry: W_O / W_down deltas concentrate in the "
                     "unembedding's top subspace",
    "grade_dependence": "Grade dependence: the more contrastive the objective, the less write-side prediction "
                        "geometry",
}
RULES = {
    "read_concentrates": f"held if relative RSF_in (mean of q, k) > {CONCENTRATED} with z > {Z_MIN} on every grade-1 "
                         "(DPO-like) objective",
    "read_specific": f"held if, on every grade-1 objective, the read-pathway mean (q, k) of relative RSF_in exceeds "
                     f"the controls' mean (v, gate, up) by more than {SPECIFIC_EXCESS} and by more than "
                     f"{SPECIFIC_SPREAD:g} x the controls' standard deviation",
    "write_isotropic": f"held if relative RSF_out(pred) (mean of o, down) < {NEAR_ISOTROPIC} and below CE's on every "
                       "grade-1 objective",
    "ce_prediction": f"held if CE's relative RSF_out(pred) (mean of o, down) > {CONCENTRATED} with z > {Z_MIN}",
    "grade_dependence": f"held if Spearman rho(grade, relative RSF_out(pred)) <= {GRADE_RHO} and the g=0 value "
                        f"exceeds the g=1 value by >= {GRADE_DROP}, over >= 3 graded objectives",
}


@dataclass
class Verdict:
    id: str  # a key of CLAIMS
    claim: str
    held: bool | None  # None: NOT MEASURED on this run
    evidence: str
    rule: str

    @property
    def status(self) -> str:
        return {True: "HELD", False: "DID NOT HOLD", None: "NOT MEASURED"}[self.held]


def _verdict(claim_id: str, held: bool | None, evidence: str) -> Verdict:
    return Verdict(claim_id, CLAIMS[claim_id], held, evidence, RULES[claim_id])


def fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if math.isnan(value):
        return "NaN"
    return f"{value:.2f}"


def finite(*values: float | None) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def spearman(x: list[float], y: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r

    if len(x) < 3:
        return math.nan
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else math.nan


@dataclass(frozen=True)
class Specificity:
    """Relative RSF_in of the read pathway against its controls in one phase's final row."""

    read: dict[str, float]  # role -> layer mean
    controls: dict[str, float]

    @property
    def read_mean(self) -> float:
        return sum(self.read.values()) / len(self.read) if self.read else math.nan

    @property
    def control_mean(self) -> float:
        return sum(self.controls.values()) / len(self.controls) if self.controls else math.nan

    @property
    def control_sd(self) -> float:
        """Population standard deviation of the controls' role means (0 for one control)."""
        vals = list(self.controls.values())
        if not vals:
            return math.nan
        mean = sum(vals) / len(vals)
        return math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))

    @property
    def excess(self) -> float:
        return self.read_mean - self.control_mean

    @property
    def specific(self) -> bool | None:
        """The rule of ``RULES["read_specific"]``; None when a number it needs is missing or non-finite."""
        if not (self.read and self.controls and finite(self.read_mean, self.control_mean, self.control_sd)):
            return None
        return self.excess > SPECIFIC_EXCESS and self.excess > SPECIFIC_SPREAD * self.control_sd


def specificity(phase: Phase) -> Specificity:
    return Specificity(role_means(phase.final, "rsf_in", READ_ROLES), role_means(phase.final, "rsf_in", CONTROL_ROLES))


def _missing(phases: list[Phase], what: str) -> str:
    return f"{what} of " + ", ".join(p.name for p in phases) + " missing or non-finite"


def verdicts(phases: list[Phase]) -> list[Verdict]:
    """One :class:`Verdict` per claim of :data:`CLAIMS`, in that order."""
    ce = next((p for p in phases if p.kind == "ce"), None)
    dpo = [p for p in phases if p.grade == 1.0]  # DPO-like: a grade-1 contrast (a mixture has no grade)
    no_dpo = "no grade-1 (DPO-like) objective in this run"
    no_ce = "no CE pretraining phase in this run (alignment started from init_from)"
    out = []

    if dpo:
        vals = [(p.name, mean_over(p.final, "rsf_in", READ_ROLES), mean_over(p.final, "z_in", READ_ROLES))
                for p in dpo]
        evidence = "; ".join(f"{n}: relative RSF_in {fmt(v)} (z {fmt(z)})" for n, v, z in vals)
        measured = all(finite(v, z) for _, v, z in vals)
        out.append(_verdict("read_concentrates",
                            all(v > CONCENTRATED and z > Z_MIN for _, v, z in vals) if measured else None,
                            evidence if measured else evidence + "; " + _missing(dpo, "RSF_in or z_in (q, k)")))
        specs = [(p.name, specificity(p)) for p in dpo]
        evidence = "; ".join(
            f"{n}: read (q, k) {fmt(s.read_mean)} vs controls ({', '.join(s.controls) or 'none'}) "
            f"{fmt(s.control_mean)} "
            f"(sd {fmt(s.control_sd)}), excess {fmt(s.excess)}" for n, s in specs)
        flags = [s.specific for _, s in specs]
        out.append(_verdict("read_specific", all(flags) if None not in flags else None,
                            evidence if None not in flags else
                            evidence + "; read or control roles (v, gate, up in instruments.input_roles) not measured"))
        writes = [(p.name, mean_over(p.final, "rsf_out_pred", WRITE_ROLES)) for p in dpo]
        ce_val = mean_over(ce.final, "rsf_out_pred", WRITE_ROLES) if ce else None
        evidence = "; ".join(f"{n}: relative RSF_out(pred) {fmt(v)}" for n, v in writes)
        if ce is None:
            out.append(_verdict("write_isotropic", None, evidence + f"; {no_ce}, so 'below CE's' cannot be checked"))
        elif not finite(ce_val, *(v for _, v in writes)):
            out.append(_verdict("write_isotropic", None, evidence + f" (CE: {fmt(ce_val)}); "
                                + _missing([*dpo, ce], "RSF_out(pred) (o, down)")))
        else:
            out.append(_verdict("write_isotropic", all(v < NEAR_ISOTROPIC and v < ce_val for _, v in writes),
                                evidence + f" (CE: {fmt(ce_val)})"))
    else:
        out += [_verdict(c, None, no_dpo) for c in ("read_concentrates", "read_specific", "write_isotropic")]

    if ce is None:
        out.append(_verdict("ce_prediction", None, no_ce))
    else:
        v, z = mean_over(ce.final, "rsf_out_pred", WRITE_ROLES), mean_over(ce.final, "z_out_pred", WRITE_ROLES)
        evidence = f"CE relative RSF_out(pred) {fmt(v)} (z {fmt(z)})"
        out.append(_verdict("ce_prediction", (v > CONCENTRATED and z > Z_MIN) if finite(v, z) else None,
                            evidence if finite(v, z) else evidence + "; " + _missing([ce], "RSF_out(pred) or z")))

    graded = sorted((p for p in phases if p.grade is not None and p.kind in ("graded", "dpo", "likelihood")),
                    key=lambda p: p.grade)
    if len(graded) >= 3:
        xs = [p.grade for p in graded]
        ys = [mean_over(p.final, "rsf_out_pred", WRITE_ROLES) for p in graded]
        evidence = ", ".join(f"g={x:g}: {fmt(y)}" for x, y in zip(xs, ys))
        if not finite(*ys):
            out.append(_verdict("grade_dependence", None, evidence + "; " + _missing(graded, "RSF_out(pred)")))
        else:
            rho, drop = spearman(xs, ys), ys[0] - ys[-1]
            out.append(_verdict("grade_dependence", finite(rho) and rho <= GRADE_RHO and drop >= GRADE_DROP,
                                evidence + f"; Spearman rho {fmt(rho)}, g0 - g1 = {fmt(drop)}"))
    else:
        out.append(_verdict("grade_dependence", None, f"{len(graded)} graded objective(s) in this run; the rule "
                                                      "needs 3 or more"))
    return out
