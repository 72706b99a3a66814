"""The asymmetry claims, judged from the final geometry of each phase with stated rules.

Every claim is always reported, in the order of :data:`CLAIMS`, with one of three outcomes: HELD,
DID NOT HOLD, or NOT MEASURED. NOT MEASURED is the outcome whenever a number or a comparison the
rule needs is missing or non-finite (no grade-1 objective, no CE pretraining phase, a control role
not instrumented, a diverged phase): a claim is never HELD on a partial comparison.

The write-side claims name the evidence each verdict rests on (``Verdict.basis``) and carry its k-curve
(``Verdict.curve``): (i) a phase's own delta, (ii) the whole pretraining delta of the checkpoint a run started
from against random initialisations, (iii) the mechanism, the mass of a phase's ``C_delta`` in the prediction
subspace (harness/reports/evidence.py reads them from the run's files).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from weightgeom.harness.reports.evidence import WriteEvidence, mean_curve
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
    "ce_mechanism": "The mechanism: CE's per-token delta lies in the prediction subspace (C_delta's mass there)",
    "write_mechanism": "Alignment's delta lies less in the prediction subspace than CE's (C_delta's mass)",
}
RULES = {
    "read_concentrates": f"held if relative RSF_in (mean of q, k) > {CONCENTRATED} with z > {Z_MIN} on every grade-1 "
                         "(DPO-like) objective",
    "read_specific": f"held if, on every grade-1 objective, the read-pathway mean (q, k) of relative RSF_in exceeds "
                     f"the controls' mean (v, gate, up) by more than {SPECIFIC_EXCESS} and by more than "
                     f"{SPECIFIC_SPREAD:g} x the controls' standard deviation",
    "write_isotropic": f"held if relative RSF_out(pred) (mean of o, down) < {NEAR_ISOTROPIC} and below CE's on every "
                       "grade-1 objective (CE's: the number ce_prediction rests on)",
    "ce_prediction": f"held if CE's relative RSF_out(pred) (mean of o, down) > {CONCENTRATED} with z > {Z_MIN}; on the "
                     "whole pretraining delta against init when the run started from a checkpoint (every seed), "
                     "else on the CE phase's delta",
    "grade_dependence": f"held if Spearman rho(grade, relative RSF_out(pred)) <= {GRADE_RHO} and the g=0 value "
                        f"exceeds the g=1 value by >= {GRADE_DROP}, over >= 3 graded objectives",
    "ce_mechanism": f"held if the CE phase's relative mass of C_delta in the prediction subspace (mean of o, down) "
                    f"> {CONCENTRATED} with z > {Z_MIN}",
    "write_mechanism": "held if every grade-1 objective's relative mass of C_delta in the prediction subspace (mean "
                       "of o, down) is below the CE phase's",
}
# What each write-side verdict can rest on (Verdict.basis names one, with its particulars).
BASIS_PHASE = "(i) the phases' own deltas"
BASIS_INIT = "(ii) the whole pretraining delta against random initialisations"
BASIS_MASS = "(iii) the mechanism: the mass of each phase's C_delta in the prediction subspace"


@dataclass
class Verdict:
    id: str  # a key of CLAIMS
    claim: str
    held: bool | None  # None: NOT MEASURED on this run
    evidence: str
    rule: str
    basis: str = ""  # write-side claims: the evidence the verdict rests on ((i), (ii) or (iii), with particulars)
    curve: dict[int, float] = field(default_factory=dict)  # that evidence's k-curve (mean of o, down)

    @property
    def status(self) -> str:
        return {True: "HELD", False: "DID NOT HOLD", None: "NOT MEASURED"}[self.held]


def _verdict(claim_id: str, held: bool | None, evidence: str, basis: str = "",
             curve: dict[int, float] | None = None) -> Verdict:
    return Verdict(claim_id, CLAIMS[claim_id], held, evidence, RULES[claim_id], basis, dict(curve or {}))


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


@dataclass(frozen=True)
class CEWrite:
    """What CE pretraining wrote on the write side, from the evidence ``ce_prediction`` rests on: ``value`` and
    ``z`` (relative RSF_out(pred) and its z, mean of o, down; for (ii) the mean over seeds), ``held`` by the
    rule (for (ii): on every seed), the ``basis`` named and its k-curve, and the other evidence beside it."""

    value: float
    z: float
    held: bool | None
    basis: str
    curve: dict[int, float]
    evidence: str
    label: str  # the basis in a few words, for the claims that compare against CE's number


def _phase_value(phase: Phase, family: str = "rsf_out_pred") -> tuple[float, float]:
    z_family = {"rsf_out_pred": "z_out_pred", "mass_pred": "mass_pred_z"}[family]
    return mean_over(phase.final, family, WRITE_ROLES), mean_over(phase.final, z_family, WRITE_ROLES)


def _mass_text(phase: Phase) -> str:
    v, z = _phase_value(phase, "mass_pred")
    return f"{fmt(v)} (z {fmt(z)})" if finite(v) else "not measured (no live mass_pred in this phase's rows)"


def _ce_write(ce: Phase | None, ev: WriteEvidence) -> CEWrite | None:
    """The number 'CE pretraining's write side' means in this run (docs/reports.md): the whole pretraining delta
    against init (ii) when the run started from a checkpoint and it was measured, else the CE phase's delta (i)."""
    parts = []
    if ce is not None:
        v, z = _phase_value(ce)
        label = ("continued CE's delta" if ev.start
                 else "the CE phase's delta (the whole pretraining: from a random init)")
        parts.append(f"(i) {label}: {fmt(v)} (z {fmt(z)})")
        parts.append(f"(iii) CE's C_delta mass: {_mass_text(ce)}")
    pre = ev.pretraining
    if pre is not None:
        span = f"{fmt(min(pre.values))} to {fmt(max(pre.values))}"
        text = (f"(ii) {pre.start} - random init, seeds {', '.join(map(str, pre.seeds))}: {fmt(pre.mean)} "
                f"(z {fmt(pre.z_mean)}; per seed {span})")
        held = (all(v > CONCENTRATED and z > Z_MIN for v, z in zip(pre.values, pre.z))
                if finite(*pre.values, *pre.z) else None)
        basis = f"{BASIS_INIT}: {pre.start} (seeds {', '.join(map(str, pre.seeds))})"
        return CEWrite(pre.mean, pre.z_mean, held, basis, pre.headline_curve(), "; ".join([text, *parts]),
                       f"(ii) {pre.start} - init")
    if ce is None:
        return None
    v, z = _phase_value(ce)
    if ev.start:
        basis = (f"{BASIS_PHASE}: continued CE only (the whole pretraining delta of {ev.start} against init was not "
                 "measured: harness compare init START --out RUN/init_delta)")
    else:
        basis = f"{BASIS_PHASE}: the CE phase's delta, the whole pretraining (the model started from a random init)"
    held = (v > CONCENTRATED and z > Z_MIN) if finite(v, z) else None
    label = "(i) continued CE's delta" if ev.start else "(i) the CE phase's delta"
    return CEWrite(v, z, held, basis, mean_curve(ev.delta_curves.get(ce.name, {})), "; ".join(parts), label)


def verdicts(phases: list[Phase], evidence: WriteEvidence | None = None) -> list[Verdict]:
    """One :class:`Verdict` per claim of :data:`CLAIMS`, in that order. ``evidence``: the write side's evidence
    read from the run's files (harness/reports/evidence.py); without it the write-side claims rest on the phases'
    metric rows alone (a run trained from scratch, no k-curves)."""
    ev = evidence or WriteEvidence()
    ce = next((p for p in phases if p.kind == "ce"), None)
    dpo = [p for p in phases if p.grade == 1.0]  # DPO-like: a grade-1 contrast (a mixture has no grade)
    no_dpo = "no grade-1 (DPO-like) objective in this run"
    no_ce = "no CE pretraining phase in this run (alignment started from init_from)"
    ce_write = _ce_write(ce, ev)
    out = []

    if dpo:
        vals = [(p.name, mean_over(p.final, "rsf_in", READ_ROLES), mean_over(p.final, "z_in", READ_ROLES))
                for p in dpo]
        evidence_text = "; ".join(f"{n}: relative RSF_in {fmt(v)} (z {fmt(z)})" for n, v, z in vals)
        measured = all(finite(v, z) for _, v, z in vals)
        out.append(_verdict("read_concentrates",
                            all(v > CONCENTRATED and z > Z_MIN for _, v, z in vals) if measured else None,
                            evidence_text if measured else evidence_text + "; "
                            + _missing(dpo, "RSF_in or z_in (q, k)")))
        specs = [(p.name, specificity(p)) for p in dpo]
        evidence_text = "; ".join(
            f"{n}: read (q, k) {fmt(s.read_mean)} vs controls ({', '.join(s.controls) or 'none'}) "
            f"{fmt(s.control_mean)} "
            f"(sd {fmt(s.control_sd)}), excess {fmt(s.excess)}" for n, s in specs)
        flags = [s.specific for _, s in specs]
        out.append(_verdict("read_specific", all(flags) if None not in flags else None,
                            evidence_text if None not in flags else
                            evidence_text + "; read or control roles (v, gate, up in instruments.input_roles) not "
                            "measured"))
        out.append(_write_isotropic(dpo, ce, ce_write, ev, no_ce))
    else:
        out += [_verdict(c, None, no_dpo) for c in ("read_concentrates", "read_specific", "write_isotropic")]

    if ce_write is None:
        out.append(_verdict("ce_prediction", None, no_ce))
    else:
        measured = finite(ce_write.value, ce_write.z) and ce_write.held is not None
        text = ce_write.evidence if measured else ce_write.evidence + "; RSF_out(pred) or z missing or non-finite"
        out.append(_verdict("ce_prediction", ce_write.held if measured else None, text, ce_write.basis,
                            ce_write.curve))

    out.append(_grade_dependence(phases, ev))
    out += _mechanism(ce, dpo, ev, no_ce, no_dpo)
    return out


def _write_isotropic(dpo: list[Phase], ce: Phase | None, ce_write: CEWrite | None, ev: WriteEvidence,
                     no_ce: str) -> Verdict:
    writes = [(p.name, mean_over(p.final, "rsf_out_pred", WRITE_ROLES)) for p in dpo]
    text = "; ".join(f"{n}: relative RSF_out(pred) {fmt(v)}" for n, v in writes)
    masses = "; ".join(f"{p.name} {_mass_text(p)}" for p in dpo)
    curve = mean_curve(ev.delta_curves.get(dpo[0].name, {}))
    basis = (f"{BASIS_PHASE}: the grade-1 objectives' deltas (k-curve: {dpo[0].name}) against CE's number, "
             f"{ce_write.label if ce_write else 'none'}")
    if ce_write is None:
        return _verdict("write_isotropic", None, text + f"; {no_ce}, so 'below CE's' cannot be checked", basis, curve)
    text += f" (CE: {fmt(ce_write.value)}, {ce_write.label}); (iii) C_delta mass: {masses}"
    if not finite(ce_write.value, *(v for _, v in writes)):
        return _verdict("write_isotropic", None, text + "; " + _missing([*dpo, *([ce] if ce else [])],
                                                                        "RSF_out(pred) (o, down)"), basis, curve)
    return _verdict("write_isotropic", all(v < NEAR_ISOTROPIC and v < ce_write.value for _, v in writes), text,
                    basis, curve)


def _grade_dependence(phases: list[Phase], ev: WriteEvidence) -> Verdict:
    graded = sorted((p for p in phases if p.grade is not None and p.kind in ("graded", "dpo", "likelihood")),
                    key=lambda p: p.grade)
    if len(graded) < 3:
        return _verdict("grade_dependence", None, f"{len(graded)} graded objective(s) in this run; the rule needs 3 "
                                                  "or more")
    xs = [p.grade for p in graded]
    ys = [mean_over(p.final, "rsf_out_pred", WRITE_ROLES) for p in graded]
    text = ", ".join(f"g={x:g}: {fmt(y)}" for x, y in zip(xs, ys))
    masses = ", ".join(f"g={p.grade:g}: {_mass_text(p)}" for p in graded)
    basis = (f"{BASIS_PHASE}: the graded objectives' deltas (g = {', '.join(f'{x:g}' for x in xs)}; k-curve: "
             f"{graded[-1].name})")
    curve = mean_curve(ev.delta_curves.get(graded[-1].name, {}))
    if not finite(*ys):
        return _verdict("grade_dependence", None, text + "; " + _missing(graded, "RSF_out(pred)"), basis, curve)
    rho, drop = spearman(xs, ys), ys[0] - ys[-1]
    return _verdict("grade_dependence", finite(rho) and rho <= GRADE_RHO and drop >= GRADE_DROP,
                    text + f"; Spearman rho {fmt(rho)}, g0 - g1 = {fmt(drop)}; (iii) C_delta mass: {masses}", basis,
                    curve)


def _mechanism(ce: Phase | None, dpo: list[Phase], ev: WriteEvidence, no_ce: str, no_dpo: str) -> list[Verdict]:
    """``ce_mechanism`` and ``write_mechanism``: (iii), the live mass of each phase's C_delta."""
    if ce is None:
        return [_verdict("ce_mechanism", None, no_ce), _verdict("write_mechanism", None, no_ce)]
    v, z = _phase_value(ce, "mass_pred")
    basis = f"{BASIS_MASS}: the CE phase's C_delta over the whole phase"
    curve = mean_curve(ev.mass_curves.get(ce.name, {}))
    text = f"CE relative mass {fmt(v)} (z {fmt(z)})"
    if finite(v, z):
        out = [_verdict("ce_mechanism", v > CONCENTRATED and z > Z_MIN, text, basis, curve)]
    else:
        out = [_verdict("ce_mechanism", None, text + "; mass_pred missing or non-finite (a run from before the live "
                                                     "metric, or no prediction subspace)", basis, curve)]
    if not dpo:
        return out + [_verdict("write_mechanism", None, no_dpo)]
    masses = [(p.name, mean_over(p.final, "mass_pred", WRITE_ROLES)) for p in dpo]
    text = "; ".join(f"{n}: relative mass {fmt(m)}" for n, m in masses) + f" (CE: {fmt(v)})"
    basis = f"{BASIS_MASS}: the grade-1 objectives' C_delta (k-curve: {dpo[0].name}) against CE's"
    curve = mean_curve(ev.mass_curves.get(dpo[0].name, {}))
    if not finite(v, *(m for _, m in masses)):
        return out + [_verdict("write_mechanism", None, text + "; " + _missing([*dpo, ce], "mass_pred (o, down)"),
                               basis, curve)]
    return out + [_verdict("write_mechanism", all(m < v for _, m in masses), text, basis, curve)]
