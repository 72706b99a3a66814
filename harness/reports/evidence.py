"""The write side's evidence, read from a pipeline's saved files, so each write-side verdict can name the one it
rests on and show its k-curve:

(i)   each phase's own delta: relative RSF_out of the phase's cumulative delta against the prediction subspace,
      against k. ``dW`` = the final checkpoint minus the phase's ``W0`` (the W0 file its final snapshot names by
      digest, else the checkpoint the phase started from: the pretraining checkpoint for an alignment phase, the
      starting model for pretraining), ``diag(g_post) dW`` behind a post-norm and the final checkpoint's
      unembedding, as the live ``rsf_out_pred`` at the phase's last step (so the curve at ``k`` is that number).
(ii)  the whole pretraining delta of the checkpoint a run starts from: ``RUN/init_delta/init.json``, written by
      the pipeline with ``harness compare init START`` (weightgeom.harness.compare.init) when a run starts
      from a real checkpoint (init_from or model.source); a run trained from scratch has none (its CE phase's
      delta already is the whole pretraining delta).
(iii) the mechanism: the live ``mass_pred`` of each phase's own ``C_delta`` (final metric row) and its k-curve
      from the final snapshot's ``curve_mass/L{i}/{r}/{energy,trace}``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from weightgeom.core.checkpoint import latest_checkpoint
from weightgeom.core.model_sources import resolve_model
from weightgeom.core.models import load_local_model
from weightgeom.harness.reports.phases import PRETRAIN, Phase
from weightgeom.hooks import geometry as geo
from weightgeom.hooks import keys
from weightgeom.hooks.reference import DIGEST_KEY, file_name
from weightgeom.hooks.roles import WRITE_ROLES, resolve_tracked, unembedding

INIT_DELTA = "init_delta"  # RUN/init_delta/: `harness compare init` of the run's starting checkpoint
INIT_SEEDS = (0, 1, 2)  # the initialisations the pipeline compares the starting checkpoint against
DEFAULT_KS = (1, 2, 4, 8, 16, 32)

Curves = dict[str, dict[int, float]]  # role -> {k: mean over layers}


@dataclass
class PretrainingDelta:
    """(ii): the starting checkpoint minus random initialisations of its config, one value per seed:
    ``values[i]`` / ``z[i]`` the mean over o and down of seed i's layer-mean relative RSF_out(pred) / z;
    ``curves[role] = {k: (mean, sd)}`` over seeds."""

    start: str
    seeds: list[int]
    k: int
    values: list[float]
    z: list[float]
    per_role: dict[str, tuple[float, float]]  # role -> (mean, sd) over seeds
    curves: dict[str, dict[int, tuple[float, float]]] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def z_mean(self) -> float:
        return sum(self.z) / len(self.z)

    def headline_curve(self) -> dict[int, float]:
        """``{k: mean over o, down and seeds}``."""
        return mean_curve({role: {k: m for k, (m, _) in c.items()} for role, c in self.curves.items()})


@dataclass
class WriteEvidence:
    """Everything the write-side verdicts may rest on: (i) ``delta_curves[phase]``, (ii) ``pretraining``,
    (iii) ``mass_curves[phase]`` (the headline numbers of (i) and (iii) are in the phases' metric rows);
    ``start``: the checkpoint the run started from (None: a random init, trained from scratch)."""

    start: str | None = None
    pretraining: PretrainingDelta | None = None
    delta_curves: dict[str, Curves] = field(default_factory=dict)
    mass_curves: dict[str, Curves] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def mean_curve(curves: Curves, roles: tuple[str, ...] = WRITE_ROLES) -> dict[int, float]:
    """``{k: mean over roles}`` over the k every role of ``roles`` in ``curves`` has."""
    present = [curves[r] for r in roles if curves.get(r)]
    if not present:
        return {}
    ks = sorted(set.intersection(*(set(c) for c in present)))
    return {k: sum(c[k] for c in present) / len(present) for k in ks}


def run_start(cfg: dict) -> str | None:
    """The checkpoint a pipeline started from (``init_from``, else ``model.source`` unless "tiny"), as written
    in its config; None for a model trained from a random initialisation."""
    source = cfg.get("init_from") or ((cfg.get("model") or {}).get("source"))
    return None if source in (None, "tiny") else str(source)


def write_evidence(run_dir: Path, cfg: dict, phases: list[Phase]) -> WriteEvidence:
    """(i), (ii) and (iii) from ``run_dir``'s files; whatever a file does not hold is a note."""
    run_dir = Path(run_dir)
    inst = cfg.get("instruments") or {}
    ks = tuple(inst.get("k_curve") or DEFAULT_KS)
    evidence = WriteEvidence(start=run_start(cfg))
    evidence.pretraining = read_pretraining_delta(run_dir / INIT_DELTA / "init.json")
    if evidence.pretraining is not None and evidence.start:
        evidence.pretraining.start = evidence.start  # as the recipe names it (a short name, not the cache path)
    for phase in phases:
        if phase.path is None:
            continue
        curves, note = phase_delta_curves(run_dir, cfg, phase, ks)
        if curves:
            evidence.delta_curves[phase.name] = curves
        elif note:
            evidence.notes.append(note)
        mass = snapshot_mass_curves(final_snapshot(phase.path), ks)
        if mass:
            evidence.mass_curves[phase.name] = mass
    return evidence


def read_pretraining_delta(path: Path) -> PretrainingDelta | None:
    """(ii) from an ``init.json`` of ``harness compare init`` (None when absent)."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    summary = data.get("summary") or {}
    per_role = {r: summary.get(keys.layer_mean("rsf_out_pred", r)) for r in WRITE_ROLES}
    z_role = {r: summary.get(keys.layer_mean("z_out_pred", r)) for r in WRITE_ROLES}
    roles = [r for r in WRITE_ROLES if per_role[r] is not None]
    if not roles:
        return None
    n = len(data["seeds"])
    values = [sum(per_role[r]["values"][i] for r in roles) / len(roles) for i in range(n)]
    zs = [sum(z_role[r]["values"][i] for r in roles) / len(roles) if all(z_role[r] for r in roles) else math.nan
          for i in range(n)]
    curves = {role: {int(k): (m, s) for k, m, s in zip(c["ks"], c["mean"], c["sd"])}
              for role, c in ((data.get("curves") or {}).get("out") or {}).items() if role in roles}
    return PretrainingDelta(str(data.get("after_dir")), list(data["seeds"]), int(data.get("k") or 0), values, zs,
                            {r: (per_role[r]["mean"], per_role[r]["sd"]) for r in roles}, curves)


def final_snapshot(phase_dir: Path) -> Path | None:
    """The newest ``instruments/step_N.safetensors`` of a phase (None when it saved none)."""
    found = sorted(Path(phase_dir).glob("instruments/step_*.safetensors"))
    return found[-1] if found else None


def snapshot_mass_curves(snapshot: Path | None, ks: tuple[int, ...]) -> Curves:
    """(iii): ``{role: {k: relative mass of C_delta in the top-k prediction subspace, mean over layers}}`` from a
    snapshot's ``curve_mass/L{i}/{r}/{energy,trace}`` (m from ``cov_out/L{i}/{r}/sum_outer``); layers with a
    non-finite number are left out."""
    if snapshot is None:
        return {}
    per_role: dict[str, list[dict[int, float]]] = {}
    with safe_open(str(snapshot), framework="pt") as f:
        names = set(f.keys())
        for name in sorted(names):
            parsed = keys.parse_state_key(name)
            if parsed is None or parsed[0] != keys.CURVE_MASS or parsed[3] != "energy":
                continue
            matrix = keys.matrix_key(parsed[1], parsed[2])
            cov = keys.state_key(keys.COV_OUT, matrix, "sum_outer")
            trace_key = keys.state_key(keys.CURVE_MASS, matrix, "trace")
            if cov not in names or trace_key not in names:
                continue
            m = f.get_slice(cov).get_shape()[0]
            energy, trace = f.get_tensor(name).double(), float(f.get_tensor(trace_key))
            if not (bool(torch.isfinite(energy).all()) and math.isfinite(trace)) or trace <= 0:
                continue
            cumulative = torch.cumsum(energy, 0)
            per_role.setdefault(parsed[2], []).append(
                {k: float(cumulative[k - 1]) / trace * m / k for k in ks if k <= energy.shape[0] and k < m})
    return _role_means(per_role)


def _role_means(per_role: dict[str, list[dict[int, float]]]) -> Curves:
    out = {}
    for role in WRITE_ROLES:
        curves = [c for c in per_role.get(role, []) if c]
        if curves:
            common = sorted(set.intersection(*(set(c) for c in curves)))
            out[role] = {k: sum(c[k] for c in curves) / len(curves) for k in common}
    return out


def phase_start(run_dir: Path, cfg: dict, phase: Phase) -> Path | None:
    """The checkpoint a phase started from: for an alignment phase the pretraining's final checkpoint (or the
    run's starting model without pretraining), for pretraining the run's starting model (None: a random init)."""
    start = run_start(cfg)
    cache = (cfg.get("tokenizer") or {}).get("cache_dir")
    if phase.name != PRETRAIN and "pretrain" in (cfg.get("stages") or []):
        return latest_checkpoint(Path(run_dir) / "pretrain")
    if start is None:
        return None
    try:
        return resolve_model(start, cache, progress=False)
    except (FileNotFoundError, ValueError, ImportError):
        return None


def phase_delta_curves(run_dir: Path, cfg: dict, phase: Phase, ks: tuple[int, ...]) -> tuple[Curves, str | None]:
    """(i): ``{role: {k: relative RSF_out(pred) of the phase's final cumulative delta, mean over layers}}``, or
    ``({}, why not)``."""
    final = latest_checkpoint(phase.path)
    if final is None:
        return {}, f"{phase.name}: no checkpoint, so no k-curve of its delta"
    snapshot = final_snapshot(phase.path)
    w0_file = None
    if snapshot is not None:
        with safe_open(str(snapshot), framework="pt") as f:
            if DIGEST_KEY in set(f.keys()):
                w0_file = phase.path / "instruments" / file_name(bytes(f.get_tensor(DIGEST_KEY).tolist()))
    start = None
    if w0_file is None or not w0_file.is_file():
        start = phase_start(run_dir, cfg, phase)
        if start is None:
            return {}, (f"{phase.name}: neither its W0 file nor its starting checkpoint is on disk, so no k-curve of "
                        "its delta")
    model = load_local_model(final)
    tracked = resolve_tracked(model, WRITE_ROLES)
    layers = (cfg.get("instruments") or {}).get("layers")
    if layers is not None:
        tracked = [tm for tm in tracked if tm.layer in layers]
    W_U, gain, layernorm = unembedding(model)
    d = W_U.shape[1]
    top = min(max(ks), d - 1)
    V, _ = geo.prediction_subspace(W_U, gain, k=top, layernorm=layernorm)
    reference = _reference_weights(w0_file if start is None else None, start, [tm.key for tm in tracked])
    per_role: dict[str, list[dict[int, float]]] = {}
    for tm in tracked:
        w0 = reference(tm.key)
        if w0 is None:
            continue
        dW = tm.weight().double() - w0.double()
        gain_post = tm.post_norm_gain()
        if gain_post is not None:
            dW = gain_post.double()[:, None] * dW
        usable = [k for k in ks if k < d]
        if usable and dW.norm() > 0:
            per_role.setdefault(tm.role, []).append(geo.rsf_curve(dW, V, usable, side="out"))
    del model
    return _role_means(per_role), None


def _reference_weights(w0_file: Path | None, start: Path | None, matrices: list[str]):
    """``key -> W0 (out, in)``: from the phase's W0 file, or from its starting checkpoint's tracked weights."""
    if w0_file is not None:
        handle = safe_open(str(w0_file), framework="pt")
        names = set(handle.keys())
        return lambda key: (handle.get_tensor(name) if (name := keys.state_key(keys.WEIGHTS, key, "W0")) in names
                            else None)
    weights = {tm.key: tm.weight() for tm in resolve_tracked(load_local_model(start), WRITE_ROLES)
               if tm.key in matrices}
    return weights.get

