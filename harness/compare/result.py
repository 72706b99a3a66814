"""What :func:`weightgeom.harness.compare.analysis.compare` returns: one ``MatrixResult`` per tracked
(layer, role) matrix inside a ``CompareResult``, with the live metrics' key names (:meth:`CompareResult.metrics`).

Its own module so that the analysis (which fills it) and the report (which renders it) both import it and
neither imports the other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from weightgeom.hooks import keys
from weightgeom.hooks.roles import ROLES

# The families that get a mean over layers, named as the live metrics name them.
_MEAN_FAMILIES = ("rsf_in", "z_in", "rsf_out_pred", "z_out_pred", "rsf_out_pred_alt")


@dataclass
class MatrixResult:
    """One (layer, role) matrix. RSF values are *relative* (RSF / (k / dim), 1.0 = isotropic) and
    None where not measured: no delta, no ``C_a`` for the input group, or not a write role."""

    layer: int
    role: str
    shape: tuple[int, int]  # (out, in)
    delta_norm: float  # ||dW||_F
    relative_delta: float | None  # ||dW||_F / ||W_base||_F (None when W_base is 0)
    rsf_in: float | None = None
    z_in: float | None = None
    gap_in: float | None = None  # eigengap (l_k - l_{k+1}) / l_k of C_a at k_in
    k_in: int | None = None
    rsf_out_pred: float | None = None
    z_out_pred: float | None = None
    rsf_out_pred_alt: float | None = None  # against the other checkpoint's prediction subspace
    k_out: int | None = None
    curve_in: dict[int, float] = field(default_factory=dict)  # {k: relative RSF_in}
    curve_out: dict[int, float] = field(default_factory=dict)  # {k: relative RSF_out (pred)}

    @property
    def key(self) -> str:
        return f"L{self.layer}/{self.role}"

    @property
    def no_delta(self) -> bool:
        return self.delta_norm == 0.0


@dataclass
class CompareResult:
    """Everything :func:`compare` measured. ``no_delta`` is True when every tracked matrix is
    identical in BASE and AFTER: there is nothing to analyse and no RSF is reported."""

    base_dir: str
    after_dir: str
    model_type: str
    k: int
    k_curve: tuple[int, ...]
    unembed: str  # whose W_U the prediction subspace came from: "after" or "base"
    zscores: bool
    seed: int
    matrices: list[MatrixResult]
    c_a_source: str | None = None  # None when nothing was measured (no delta)
    c_a_tokens: dict[str, int] = field(default_factory=dict)  # tokens behind each group's C_a
    c_a_file: str | None = None  # measured C_a saved in snapshot format (reusable as c_a=)
    gap_pred: float | None = None  # eigengap of the squared singular values of W_U diag(g) at k
    pred_overlap: float | None = None  # ||V_after^T V_base||_F^2 / k: 1 = same k-subspace
    notes: list[str] = field(default_factory=list)

    @property
    def no_delta(self) -> bool:
        return all(m.no_delta for m in self.matrices)

    @property
    def layers(self) -> list[int]:
        return sorted({m.layer for m in self.matrices})

    @property
    def roles(self) -> list[str]:
        present = {m.role for m in self.matrices}
        return [r for r in ROLES if r in present]

    def metrics(self) -> dict[str, float]:
        """Flat dict with the live metrics' keys (``rsf_in/L0/q``, ``z_out_pred/all/o``, ``gap_pred``, ...)
        plus ``rsf_out_pred_alt/...`` (the other W_U) and ``delta_norm/L{i}/{r}``."""
        out: dict[str, float] = {}
        for m in self.matrices:
            out[keys.metric("delta_norm", m.layer, m.role)] = m.delta_norm
            for name in ("rsf_in", "z_in", "gap_in", "rsf_out_pred", "z_out_pred", "rsf_out_pred_alt"):
                value = getattr(m, name)
                if value is not None:
                    out[keys.metric(name, m.layer, m.role)] = value
        for family in _MEAN_FAMILIES:
            for role, value in self.layer_means(family).items():
                out[keys.layer_mean(family, role)] = value
        if self.gap_pred is not None:
            out["gap_pred"] = self.gap_pred
        return out

    def layer_means(self, name: str) -> dict[str, float]:
        """``{role: mean over layers}`` of a MatrixResult field, over the layers where it is measured."""
        values: dict[str, list[float]] = {}
        for m in self.matrices:
            value = getattr(m, name)
            if value is not None:
                values.setdefault(m.role, []).append(value)
        return {r: sum(values[r]) / len(values[r]) for r in self.roles if r in values}

    def curve_means(self, side: str) -> dict[str, tuple[list[int], list[float]]]:
        """``{role: (ks, mean relative RSF over layers)}`` for side "in" or "out", over the k that
        every measured layer has."""
        name = "curve_in" if side == "in" else "curve_out"
        out = {}
        for role in self.roles:
            curves = [getattr(m, name) for m in self.matrices if m.role == role and getattr(m, name)]
            if curves:
                ks = sorted(set.intersection(*(set(c) for c in curves)))
                out[role] = (ks, [sum(c[k] for c in curves) / len(curves) for k in ks])
        return out

    def to_dict(self) -> dict:
        data = asdict(self)
        data["no_delta"] = self.no_delta
        data["metrics"] = self.metrics()
        return data
