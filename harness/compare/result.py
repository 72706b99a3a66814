"""What :func:`weightgeom.harness.compare.analysis.compare` returns: one ``MatrixResult`` per tracked
(layer, role) matrix inside a ``CompareResult``, with the live metrics' key names (:meth:`CompareResult.metrics`).

Its own module so that the analysis (which fills it) and the report (which renders it) both import it and
neither imports the other.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from weightgeom.hooks import keys
from weightgeom.hooks.roles import ROLES

# The families that get a mean over layers, named as the live metrics name them.
_MEAN_FAMILIES = ("rsf_in", "z_in", "rsf_out_pred", "z_out_pred", "rsf_out_pred_alt")
MASS, MASS_Z = "mass_pred", "mass_pred_z"  # the live mechanism metric's families; here the loss is the key's stat


@dataclass
class MassResult:
    """The mechanism metric for one loss: the relative mass of that loss's ``C_delta`` (measured on one
    checkpoint) in the top-k prediction subspace, per write matrix (``L{i}/{r}``), its exact z-score against
    Haar-random k-subspaces and its k-curve (``{k: relative mass}``). 1.0 = no preference, ``m / k`` = all
    of ``delta`` lies where the unembedding reads."""

    loss: str  # as named: ce, dpo, g0.5, mix0.5, ...
    model: str  # which checkpoint's C_delta: "after" or "base"
    source: str  # one line: the model, the data, tokens or pairs, the reference model
    tokens: int  # tokens counted into each C_delta
    k: int
    mass: dict[str, float] = field(default_factory=dict)
    z: dict[str, float] = field(default_factory=dict)
    curve: dict[str, dict[int, float]] = field(default_factory=dict)

    def role_means(self, values: dict[str, float] | None = None) -> dict[str, float]:
        """``{role: mean over layers}`` of ``values`` (default: the relative mass)."""
        values = self.mass if values is None else values
        by_role: dict[str, list[float]] = {}
        for key, value in values.items():
            by_role.setdefault(key.rsplit("/", 1)[1], []).append(value)
        return {r: sum(v) / len(v) for r in ROLES if (v := by_role.get(r))}

    def curve_means(self) -> dict[str, tuple[list[int], list[float]]]:
        """``{role: (ks, mean relative mass over layers)}`` over the k every layer has."""
        by_role: dict[str, list[dict[int, float]]] = {}
        for key, curve in self.curve.items():
            if curve:
                by_role.setdefault(key.rsplit("/", 1)[1], []).append(curve)
        out = {}
        for role in ROLES:
            curves = by_role.get(role)
            if curves:
                ks = sorted(set.intersection(*(set(c) for c in curves)))
                out[role] = (ks, [sum(c[k] for c in curves) / len(curves) for k in ks])
        return out

    def metrics(self) -> dict[str, float]:
        """``mass_pred/L{i}/{r}/{loss}``, ``mass_pred_z/...`` and their layer means ``mass_pred/all/{r}/{loss}``."""
        out: dict[str, float] = {}
        for family, values in ((MASS, self.mass), (MASS_Z, self.z)):
            for key, value in values.items():
                layer, role = key.split("/")
                out[keys.metric(family, int(layer[1:]), role, self.loss)] = value
            for role, value in self.role_means(values).items():
                out[keys.metric(family, None, role, self.loss)] = value
        return out


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
    mass: dict[str, MassResult] = field(default_factory=dict)  # the mechanism metric, per loss (options.mass)
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
        for mass in self.mass.values():
            out.update(mass.metrics())
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


def spread(values: list[float]) -> dict:
    """``{"mean", "sd", "min", "max", "values"}`` of a list (sd: the sample standard deviation, 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "sd": sd, "min": min(values), "max": max(values), "values": list(values)}


@dataclass
class InitResult:
    """``compare_init``: AFTER against random initialisations of its own config, one :class:`CompareResult` per
    seed (the whole delta that training wrote), and the spread the initialisation adds."""

    after_dir: str
    model_type: str
    initializer_range: float | None  # the config's, which the family's _init_weights used
    seeds: tuple[int, ...]
    results: list[CompareResult]
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, dict]:
        """``{metric key: spread over seeds}`` for every key that every seed measured (:func:`spread`)."""
        per_seed = [r.metrics() for r in self.results]
        common = set.intersection(*(set(m) for m in per_seed))
        return {key: spread([m[key] for m in per_seed]) for key in sorted(common)}

    def curve_summary(self, side: str) -> dict[str, tuple[list[int], list[float], list[float]]]:
        """``{role: (ks, mean over seeds, sd over seeds)}`` of the layer-mean k-curve of side "in" or "out"."""
        curves = [r.curve_means(side) for r in self.results]
        out = {}
        for role in curves[0]:
            if all(role in c for c in curves):
                ks = sorted(set.intersection(*(set(c[role][0]) for c in curves)))
                stats = [spread([dict(zip(*c[role]))[k] for c in curves]) for k in ks]
                out[role] = (ks, [s["mean"] for s in stats], [s["sd"] for s in stats])
        return out

    def to_dict(self) -> dict:
        return {"after_dir": self.after_dir, "model_type": self.model_type,
                "initializer_range": self.initializer_range, "seeds": list(self.seeds), "k": self.results[0].k,
                "unembed": self.results[0].unembed, "summary": self.summary(),
                "curves": {side: {role: {"ks": ks, "mean": mean, "sd": sd}
                                  for role, (ks, mean, sd) in self.curve_summary(side).items()}
                           for side in ("in", "out")},
                "notes": self.notes, "per_seed": [r.to_dict() for r in self.results]}


@dataclass
class SeriesRow:
    """One checkpoint of a series after the first: the cumulative delta (from the first checkpoint) and the
    incremental one (from the previous checkpoint; the same as the cumulative for the second)."""

    index: int
    path: str
    step: int | None  # from the folder's name (step_N, checkpoint-N, ...), None when it holds no number
    cumulative: CompareResult
    incremental: CompareResult


@dataclass
class SeriesResult:
    """``compare_series``: an ordered list of checkpoints, one :class:`SeriesRow` per checkpoint after the first;
    ``first_mass``: the mechanism metric of the first checkpoint (when ``mass`` was asked for)."""

    paths: list[str]
    steps: list[int | None]
    rows: list[SeriesRow]
    first_mass: dict[str, MassResult] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def jsonl_rows(self) -> list[dict]:
        """One dict per checkpoint and kind (``cumulative``, ``incremental``): index, path, step and the flat
        metrics (the live metrics' keys, :meth:`CompareResult.metrics`)."""
        out = []
        if self.first_mass:
            metrics: dict[str, float] = {}
            for mass in self.first_mass.values():
                metrics.update(mass.metrics())
            out.append({"index": 0, "path": self.paths[0], "step": self.steps[0], "kind": "first",
                        "metrics": metrics})
        for row in self.rows:
            for kind in ("cumulative", "incremental"):
                result = getattr(row, kind)
                out.append({"index": row.index, "path": row.path, "step": row.step, "kind": kind,
                            "base": result.base_dir, "no_delta": result.no_delta, "metrics": result.metrics()})
        return out
