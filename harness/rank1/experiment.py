"""The paper's causal test: closed-form rank-1 interventions with matched direction controls.

The asymmetry report measures *where* alignment writes (relative RSF, a correlation). This module
asks what an edit in a given direction *does*. At the base (pretrained) weights, for a chosen layer
and role ``W`` (out x in), with ``G`` the mean gradient of the alignment objective (sigmoid DPO,
reference = base) over the training pairs:

* read pathway (q, k; also v, gate, up): input-side edits ``dW = -eps (G v/||G v||) v^T`` along the
  top eigenvectors ``v`` of ``C_a`` (the role's input covariance);
* write pathway (o, down): output-side edits ``dW = -eps u (u^T G)/||u^T G||`` along the top
  prediction-subspace directions ``u`` (right singular vectors of ``W_U diag(g)``, LayerNorm models
  with the all-ones direction projected out) and along the top eigenvectors of ``C_delta``.

Each edit is the steepest-descent rank-1 edit of Frobenius norm ``eps`` given its direction
(:mod:`weightgeom.harness.rank1.edits`). Every tested direction is compared with control families
(:mod:`weightgeom.harness.rank1.directions`): Haar-random directions, directions matched on the quadratic form
that picked it (``C_a`` variance; ``C_delta`` variance; squared prediction singular value), lower
principal directions, and the same direction measured in another layer, each edited by the same
rule. Measured on held-out data (:mod:`weightgeom.harness.rank1.measure`): the change of the DPO loss, reward
margin and accuracy (reference = base), of CE on held-out pretraining text, and KL(base || edited).
Next to them: the first-order prediction ``<G, dW>`` and the K-FAC second-order prediction.

Entry points: :func:`run_rank1` (a checkpoint directory), :func:`rank1_experiment` (a model in
memory and tokenized data), :func:`write_rank1_report` and :func:`rank1_section`
(:mod:`weightgeom.harness.rank1.report`), and the ``harness rank1`` command (:mod:`weightgeom.harness.rank1.cli`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from weightgeom.core.config import Rank1Config
from weightgeom.core.data import tokenize_pairs
from weightgeom.core.models import load_local_model
from weightgeom.core.sinks import json_safe
from weightgeom.core.tokenizer import load_tokenizer
from weightgeom.harness.rank1.directions import family_generator, haar_directions, lower_ranks, variance_matched
from weightgeom.harness.rank1.edits import (
    Rank1Edit,
    edited_weight,
    first_order,
    input_side_edit,
    kfac_second_order,
    output_side_edit,
)
from weightgeom.harness.rank1.measure import HeldOut, Statistics, evaluate, measure_statistics, prepare_heldout
from weightgeom.hooks import geometry as geo
from weightgeom.hooks.roles import GROUP_OF_ROLE, WRITE_ROLES, TrackedMatrix, resolve_tracked, unembedding
from weightgeom.trainers.losses import check_beta

FAMILIES = ("haar", "matched", "lower", "layer")
# Metrics that get a z-score against every control family.
Z_METRICS = ("dpo_loss_unit", "dpo_loss", "margin_unit", "ce_unit", "kl_unit", "pred1_unit")
RESULT_VERSION = 1


@dataclass
class Direction:
    """One direction to edit along, with where it came from. ``vector`` is not serialised."""

    id: str
    layer: int
    role: str
    side: str  # "in" (input-side edit) or "out" (output-side edit)
    family: str  # "tested" or one of FAMILIES
    source: str  # "C_a", "C_delta", "pred" (an eigen/singular direction), or "haar"
    rank: int | None  # 0-based eigen/singular rank in its source
    tested: str | None  # the tested direction a matched / layer control belongs to
    vector: Tensor = field(repr=False)
    origin_layer: int | None = None  # layer family: the layer the direction was measured in
    overlap: float | None = None  # |<w, t>| with its tested direction (matched / layer)
    quad: dict[str, float] = field(default_factory=dict)  # w^T Q w for each Q of its side
    metrics: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict:
        """A JSON-ready dict of every field but the vector."""
        out = {}
        for f in fields(self):
            if f.name != "vector":
                value = getattr(self, f.name)
                out[f.name] = dict(value) if isinstance(value, dict) else value
        return out


@dataclass
class Rank1Result:
    """Everything a report needs, JSON-serialisable (:meth:`to_json` / :meth:`from_json`).

    ``base``: held-out metrics of the unedited model. ``statistics``: one entry per edited (layer,
    role): norms, token counts, leading spectra. ``directions``: one record per edited direction
    (tested and controls) with its metrics. ``zscores``: per tested direction and control family,
    ``z = (tested - mean) / std`` (sample std) of every metric in ``Z_METRICS``; None where the
    family has fewer than 2 members or no spread; ``z_se`` its standard error (:func:`zscore_se`).
    ``matching``: the variance-matched families' targets, bands and overlaps.
    """

    config: dict
    base: dict[str, float]
    statistics: list[dict]
    directions: list[dict]
    zscores: list[dict]
    matching: list[dict]
    version: int = RESULT_VERSION

    def tested(self) -> list[dict]:
        return [d for d in self.directions if d["family"] == "tested"]

    def to_json(self) -> str:
        """JSON text; a non-finite number (a diverged measurement) is written as null."""
        return json.dumps(json_safe(asdict(self)), indent=1, allow_nan=False, default=_json_default)

    @classmethod
    def from_json(cls, text: str) -> Rank1Result:
        data = json.loads(text)
        if data.get("version") != RESULT_VERSION:
            raise ValueError(f"rank-1 result version {data.get('version')!r}, this harness reads {RESULT_VERSION}; "
                             "re-run `harness rank1` to regenerate it")
        return cls(**data)


def _json_default(value):
    raise TypeError(f"not JSON-serialisable in a rank-1 result: {type(value).__name__}")


# ----- entry points ----------------------------------------------------------------------------------

def run_rank1(base_dir: str | Path, *, pairs: list[dict], eval_pairs: list[dict], text_blocks: Tensor,
              config: Rank1Config | None = None, seed: int = 0, beta: float = 0.1, max_len: int = 128, tokenizer=None,
              dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
              progress: bool = False) -> Rank1Result:
    """Rank-1 interventions on the model saved in ``base_dir`` (a local HF directory).

    ``pairs``: preference pairs (``prompt``/``chosen``/``rejected`` strings) whose mean DPO gradient
    ``G`` picks each edit and whose pass measures ``C_a`` and ``C_delta``; ``eval_pairs``: held-out
    pairs the edits are measured on; ``text_blocks``: (B, T) held-out token blocks of pretraining
    text (CE and KL), in the model's tokenizer. ``config``: what to edit and how (default
    ``Rank1Config()``; its ``max_pairs`` / ``text_blocks`` are the caller's to apply). ``seed``: the
    controls' sampling seed; ``beta``: the DPO beta of ``G`` and of the measured DPO loss (a run's
    ``seed`` and ``align.beta``). ``tokenizer``: default the one saved in ``base_dir``. ``max_len``:
    tokens per pair sequence (as ``align.max_len``).
    """
    cfg = config if config is not None else Rank1Config()
    if not pairs or not eval_pairs:
        raise ValueError(f"need training pairs (for G) and held-out eval_pairs (to measure on); got {len(pairs)} "
                         f"and {len(eval_pairs)}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    model = load_local_model(base_dir, dtype=dtype).to(device)
    if tokenizer is None:
        tokenizer = load_tokenizer(str(base_dir), 0, Path("."))  # a local directory: vocab/cache unused
    train_data = tokenize_pairs(pairs, tokenizer, max_len)
    eval_data = tokenize_pairs(eval_pairs, tokenizer, max_len)
    result = rank1_experiment(model, train_data=train_data, eval_data=eval_data, text_blocks=text_blocks,
                              config=cfg, seed=seed, beta=beta, progress=progress)
    result.config.update(base_dir=str(base_dir), max_len=max_len, dtype=str(dtype).removeprefix("torch."))
    return result


def rank1_experiment(model: nn.Module, *, train_data: dict, eval_data: dict, text_blocks: Tensor,
                     config: Rank1Config, seed: int = 0, beta: float = 0.1, progress: bool = False) -> Rank1Result:
    """The experiment on a model in memory; pair data as produced by ``weightgeom.core.data.tokenize_pairs``.

    The model is put in eval mode for the duration (its mode is restored after); its weights are
    edited in place one direction at a time and restored bit for bit after each (also on error).
    """
    cfg = config
    check_beta(beta)
    if text_blocks.dim() != 2 or text_blocks.shape[1] < 2 or text_blocks.shape[0] < 1:
        raise ValueError(f"text_blocks must be (blocks, tokens) with >= 1 block of >= 2 tokens, got "
                         f"{tuple(text_blocks.shape)}")
    device = next(model.parameters()).device
    tracked = resolve_tracked(model, cfg.roles)
    n_layers = 1 + max(tm.layer for tm in tracked) if tracked else 0
    missing = sorted(set(cfg.roles) - {tm.role for tm in tracked})
    if missing:
        present = sorted({tm.role for tm in tracked})
        raise ValueError(f"roles {missing} do not exist in this architecture "
                         f"({getattr(model.config, 'model_type', '?')}); of the requested ones it has: {present}")
    layers = tuple(range(n_layers)) if cfg.layers is None else tuple(cfg.layers)
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"layers {bad} do not exist: the model has layers 0..{n_layers - 1}")
    was_training = model.training
    model.eval()
    try:
        stats = measure_statistics(model, tracked, train_data=train_data, heldout_data=eval_data,
                                   text_blocks=text_blocks, beta=beta, batch_size=cfg.batch_size, device=device)
        held = prepare_heldout(model, eval_data, text_blocks, beta=beta, batch_size=cfg.batch_size, device=device)
        base = evaluate(model, held)
        writes = any(r in WRITE_ROLES for r in cfg.roles)
        forms = Forms(stats, prediction_form(model, cfg.pred_centered) if writes else None)
        by_key = {tm.key: tm for tm in tracked}
        directions, matching, statistics = [], [], []
        for layer in layers:
            for role in cfg.roles:
                tm = by_key[f"L{layer}/{role}"]
                dirs, match = build_directions(tm, forms, n_layers, cfg, seed)
                directions += dirs
                matching += match
                statistics.append(_statistics_entry(tm, forms))
        bar = tqdm(directions, desc="rank-1 edits", disable=not progress, dynamic_ncols=True)
        for d in bar:
            d.metrics = measure_direction(model, by_key[f"L{d.layer}/{d.role}"], d, stats, held, base, cfg)
    finally:
        model.train(was_training)
    records = [d.record() for d in directions]
    config = {**cfg.edits(), "seed": seed, "beta": beta, "eps_small": cfg.small, "n_layers": n_layers,
              "layers": list(layers), "roles": list(cfg.roles), "n_train_pairs": stats.n_pairs,
              "n_eval_pairs": len(eval_data["chosen_input_ids"]), "text_blocks": list(text_blocks.shape),
              "model_type": getattr(getattr(model, "config", None), "model_type", None)}
    return Rank1Result(config, base, statistics, records, zscores(records, directions), matching)


# ----- directions ------------------------------------------------------------------------------------

def sources_of(role: str) -> tuple[str, tuple[str, ...]]:
    """``(side, sources)``: read roles are edited on the input side along ``C_a`` directions, write
    roles on the output side along prediction-subspace and ``C_delta`` directions."""
    return ("out", ("pred", "C_delta")) if role in WRITE_ROLES else ("in", ("C_a",))


def prediction_form(model: nn.Module, centered: bool = False) -> tuple[Tensor, Tensor]:
    """``(V (d, d), s (d,))``: all right singular vectors / values of ``W_U diag(g)`` (LayerNorm: with
    the all-ones direction projected out) of the model's current unembedding. ``centered``: subtract
    the mean unembedding row first (softmax ignores a logit shift shared by all tokens, and an
    uncentred top direction can be mostly that shift)."""
    W_U, gain, layernorm = unembedding(model)
    V, s = geo.prediction_subspace(W_U, gain, k=W_U.shape[1], layernorm=layernorm, centered=centered)
    device = next(model.parameters()).device
    return V.to(device), s.to(device)


class Forms:
    """The quadratic forms directions are drawn from and matched on, eigendecomposed once each.

    ``form(source, layer, role) -> (Q, evals desc, evecs)``: ``C_a`` of the role's input group,
    ``C_delta`` of the role, or ``pred``: ``Q = M^T M`` for ``M = W_U diag(g)`` (model-level, its
    eigenvalues are the squared singular values)."""

    def __init__(self, stats: Statistics, pred: tuple[Tensor, Tensor] | None) -> None:
        self.stats, self.pred = stats, pred
        self._cache: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}

    def form(self, source: str, layer: int, role: str) -> tuple[Tensor, Tensor, Tensor]:
        key = ("pred",) if source == "pred" else (source, layer, role)
        if key not in self._cache:
            if source == "pred":
                if self.pred is None:
                    raise ValueError("no prediction subspace was computed for this experiment")
                V, s = self.pred
                self._cache[key] = ((V * s.square()) @ V.T, s.square(), V)
            else:
                C = self.matrix(source, layer, role)
                evals, evecs = geo.sym_eigh(C)
                self._cache[key] = (C, evals.to(C.device), evecs.to(C.device))
        return self._cache[key]

    def matrix(self, source: str, layer: int, role: str) -> Tensor:
        if source == "C_a":
            return self.stats.C_a[f"L{layer}/{GROUP_OF_ROLE[role]}"].double()
        if source == "C_delta":
            return self.stats.C_delta[f"L{layer}/{role}"].double()
        return self.form("pred", layer, role)[0]

    def quad(self, side: str, layer: int, role: str, w: Tensor) -> dict[str, float]:
        """``w^T Q w`` for every form of the side (input: C_a; output: C_delta and pred)."""
        names = ("C_a",) if side == "in" else (("pred", "C_delta") if self.pred is not None else ("C_delta",))
        return {name: float(w @ self.matrix(name, layer, role) @ w) for name in names}


def build_directions(tm: TrackedMatrix, forms: Forms, n_layers: int, cfg: Rank1Config,
                     seed: int = 0) -> tuple[list[Direction], list[dict]]:
    """Tested directions of one (layer, role) and their control families; the matching summaries."""
    layer, role = tm.layer, tm.role
    side, sources = sources_of(role)
    m, n = forms.stats.G[tm.key].shape
    dim = n if side == "in" else m
    device = forms.stats.G[tm.key].device
    if forms.pred is not None and "pred" in sources and forms.pred[0].shape[0] != dim:
        raise ValueError(f"{tm.key}: output dim {dim} differs from the unembedding's model dim "
                         f"{forms.pred[0].shape[0]}")
    if cfg.n_top >= dim:
        raise ValueError(f"n_top={cfg.n_top} must be below the {side}put dim {dim} of {tm.key}")
    prefix = f"{tm.key}/{side}"
    dirs: list[Direction] = []
    matching: list[dict] = []

    def add(id_, family, source, rank, vector, tested=None, origin=None, overlap=None):
        vector = vector.to(device=device, dtype=torch.float64)
        dirs.append(Direction(id_, layer, role, side, family, source, rank, tested, vector, origin, overlap,
                              forms.quad(side, layer, role, vector)))

    for source in sources:
        Q, _, evecs = forms.form(source, layer, role)
        for j in range(cfg.n_top):
            tid = f"{prefix}/{source}#{j + 1}"
            t = evecs[:, j]
            add(tid, "tested", source, j, t)
            match = variance_matched(Q, t, cfg.n_matched, cfg.tol, family_generator(seed, "matched", tid))
            for i in range(cfg.n_matched):
                add(f"{tid}/matched#{i}", "matched", source, None, match.directions[:, i], tid,
                    overlap=float(match.overlaps[i]))
            matching.append({"tested": tid, "form": source, "target": match.target, "lo": match.lo, "hi": match.hi,
                             "min_overlap": match.min_overlap, "overlap_mean": float(match.overlaps.mean()),
                             "overlap_max": float(match.overlaps.max()), "pairwise_overlap": match.pairwise_overlap,
                             "values_min": float(match.values.min()), "values_max": float(match.values.max())})
            if source != "pred":  # the prediction subspace is model-level: the same in every layer
                for other in control_layers(layer, n_layers, cfg.layer_controls):
                    w = forms.form(source, other, role)[2][:, j]
                    add(f"{tid}/layer{other}", "layer", source, j, w, tid, origin=other, overlap=abs(float(w @ t)))
        for rank in lower_ranks(cfg.n_top, dim, cfg.n_lower):
            add(f"{prefix}/{source}/lower#{rank + 1}", "lower", source, rank, evecs[:, rank])
    haar = haar_directions(dim, cfg.n_random, family_generator(seed, "haar", tm.key, side))
    for i in range(cfg.n_random):
        add(f"{prefix}/haar#{i}", "haar", "haar", None, haar[:, i])
    return dirs, matching


def control_layers(layer: int, n_layers: int, count: int | None) -> list[int]:
    """The layers other than ``layer`` whose same-rank directions form the ``layer`` family: all of them,
    or ``count`` evenly spaced over them (first and last included)."""
    others = [i for i in range(n_layers) if i != layer]
    if count is None or count >= len(others):
        return others
    return [others[round(i * (len(others) - 1) / (count - 1))] for i in range(count)]


# ----- measuring one direction -----------------------------------------------------------------------

def make_edit(G: Tensor, side: str, vector: Tensor) -> Rank1Edit:
    return input_side_edit(G, vector) if side == "in" else output_side_edit(G, vector)


def measure_direction(model: nn.Module, tm: TrackedMatrix, d: Direction, stats: Statistics, held: HeldOut,
                      base: dict[str, float], cfg: Rank1Config) -> dict[str, float]:
    """Edit along ``d`` at ``eps_small`` and ``eps`` (a tested direction also at ``-eps``, for the
    measured second-order term), restoring the weights after each; measure held-out metrics; add the
    predictions from the statistics. Keys: see :mod:`weightgeom.harness.rank1.report`."""
    edit = make_edit(stats.G[tm.key], d.side, d.vector)
    measured = {}
    for e in (cfg.small, cfg.eps, -cfg.eps) if d.family == "tested" else (cfg.small, cfg.eps):
        with edited_weight(tm, edit.dense(e)):
            measured[e] = evaluate(model, held)
    small, at = measured[cfg.small], measured[cfg.eps]
    unit = edit.dense(1.0)
    dW = edit.dense(cfg.eps)
    out = {f"{k}_unit": (small[k] - base[k]) / cfg.small for k in ("dpo_loss", "margin", "ce")}
    out.update({k: at[k] - base[k] for k in ("dpo_loss", "margin", "ce", "reward_chosen", "reward_rejected")})
    out.update(accuracy=at["accuracy"], accuracy_small=small["accuracy"], kl=at["kl"], kl_unit=at["kl"] / cfg.eps ** 2,
               pred1_unit=first_order(stats.G[tm.key], unit),
               pred1_heldout_unit=first_order(stats.G_heldout[tm.key], unit),
               pred1_ce_unit=first_order(stats.G_ce[tm.key], unit),
               pred1=first_order(stats.G[tm.key], dW),
               pred1_heldout=first_order(stats.G_heldout[tm.key], dW),
               pred2_kfac=kfac_second_order(dW, stats.C_a[tm.group_key], stats.C_delta[tm.key],
                                            stats.tokens_per_pair(tm.key)))
    if -cfg.eps in measured:
        out["dpo_loss_curv"] = (at["dpo_loss"] + measured[-cfg.eps]["dpo_loss"] - 2 * base["dpo_loss"]) / 2
    return out


def _statistics_entry(tm: TrackedMatrix, forms: Forms) -> dict:
    stats = forms.stats
    ev_a = forms.form("C_a", tm.layer, tm.role)[1]
    ev_d = forms.form("C_delta", tm.layer, tm.role)[1]
    entry = {"key": tm.key, "layer": tm.layer, "role": tm.role, "shape": list(stats.G[tm.key].shape),
             "weight_norm": float(tm.weight().norm()), "grad_norm": float(stats.G[tm.key].norm()),
             "grad_heldout_norm": float(stats.G_heldout[tm.key].norm()),
             "grad_ce_norm": float(stats.G_ce[tm.key].norm()),
             "tokens": stats.tokens[tm.key], "tokens_per_pair": stats.tokens_per_pair(tm.key),
             "C_a_top": [float(x) for x in ev_a[:5]], "C_a_trace": float(ev_a.sum()),
             "C_delta_top": [float(x) for x in ev_d[:5]], "C_delta_trace": float(ev_d.sum())}
    if forms.pred is not None and tm.role in WRITE_ROLES:
        entry["pred_svals_top"] = [float(x) for x in forms.pred[1][:5]]
    return entry


# ----- z-scores --------------------------------------------------------------------------------------

def family_members(tested: Direction, directions: list[Direction], family: str) -> list[Direction]:
    """The controls of ``family`` that ``tested`` is compared with: Haar directions of its (layer, role,
    side); lower principal directions of its source in its (layer, role); its own matched and
    other-layer controls."""
    same = [d for d in directions if d.family == family and d.layer == tested.layer and d.role == tested.role
            and d.side == tested.side]
    if family == "lower":
        return [d for d in same if d.source == tested.source]
    if family in ("matched", "layer"):
        return [d for d in same if d.tested == tested.id]
    return same


def zscores(records: list[dict], directions: list[Direction]) -> list[dict]:
    """Per tested direction and family: z of each metric in ``Z_METRICS``, its standard error
    (:func:`zscore_se`), the family's mean and std, its size, and the members' overlaps ``|<w, t>|``
    with the tested direction."""
    out = []
    for t in (d for d in directions if d.family == "tested"):
        for family in FAMILIES:
            members = family_members(t, directions, family)
            overlaps = [abs(float(m.vector @ t.vector)) for m in members]
            entry = {"tested": t.id, "family": family, "n": len(members),
                     "overlap_mean": sum(overlaps) / len(overlaps) if overlaps else None,
                     "overlap_max": max(overlaps) if overlaps else None, "z": {}, "z_se": {}, "mean": {}, "std": {}}
            for metric in Z_METRICS:
                values = [m.metrics[metric] for m in members]
                z, mean, std = zscore(t.metrics[metric], values)
                entry["z"][metric], entry["mean"][metric], entry["std"][metric] = z, mean, std
                entry["z_se"][metric] = zscore_se(z, len(values))
            out.append(entry)
    return out


def zscore(value: float, controls: list[float]) -> tuple[float | None, float | None, float | None]:
    """``((value - mean) / std, mean, std)`` with the sample std; z is None below 2 controls or when
    the controls have no spread (relative to their scale), since there is then no evidence either way."""
    if not controls:
        return None, None, None
    mean = sum(controls) / len(controls)
    if len(controls) < 2:
        return None, mean, None
    std = math.sqrt(sum((c - mean) ** 2 for c in controls) / (len(controls) - 1))
    scale = max(abs(mean), abs(value), 1e-300)
    if std <= 1e-12 * scale:
        return None, mean, std
    return (value - mean) / std, mean, std


def zscore_se(z: float | None, n: int) -> float | None:
    """Standard error of ``z = (x - m) / s`` from ``n`` controls: how far z moves when the family is
    drawn again, ``x`` held fixed.

    For normal controls (mean ``mu``, std ``sigma``, ``z* = (x - mu) / sigma``), ``x - m`` is normal
    with mean ``z* sigma`` and variance ``sigma^2 / n``, independent of ``s``, and
    ``(n - 1) s^2 / sigma^2`` is chi-square with ``n - 1`` degrees of freedom, so exactly

        E z   = z* c_n,          c_n = sigma E[1/s] = sqrt((n - 1)/2) Gamma((n - 2)/2) / Gamma((n - 1)/2)
        E z^2 = (z*^2 + 1/n) (n - 1)/(n - 3)
        se^2  = (z*^2 + 1/n) (n - 1)/(n - 3) - z*^2 c_n^2

    evaluated at ``z* = z``. For large n it tends to the delta method's ``sqrt(1/n + z^2 / (2 (n - 1)))``,
    which is 10-20% low at n = 10 (0.96 against 0.77 at z = 3; 0.36 against 0.32 at z = 0). Infinite
    for ``n <= 3`` (``E[1/s^2]`` diverges: a z from three controls has no finite standard error); None
    where z is None.
    """
    if z is None:
        return None
    if n <= 3:
        return math.inf
    c_n = math.sqrt((n - 1) / 2) * math.exp(math.lgamma((n - 2) / 2) - math.lgamma((n - 1) / 2))
    var = (z * z + 1 / n) * (n - 1) / (n - 3) - z * z * c_n * c_n
    return math.sqrt(max(var, 0.0))


__all__ = ["Rank1Config", "Rank1Result", "run_rank1", "rank1_experiment",
           "FAMILIES", "Z_METRICS"]
