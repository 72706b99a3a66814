"""``compare``: the paper's static analysis of the weight delta between two local checkpoints.

For every tracked (layer, role) matrix (``weightgeom.hooks.roles``: q k v o gate up down, fused matrices
split, GPT-2's Conv1D transposed) of two checkpoints of one architecture, ``dW = W_after - W_base``
(fp32, shape (out, in)) and

* input side: relative ``RSF_in(dW; U_k)`` with ``U_k`` the top-k eigenvectors of ``C_a`` of the
  matrix's input group, ``C_a`` measured forward-only on a local text sample by the BASE model
  (``c_a_model``) or read from an instrument snapshot (``c_a=``);
* output side (write roles o, down): relative ``RSF_out(dW; V_k)`` with ``V_k`` the prediction
  subspace of the unembedding (top-k right singular vectors of ``W_U diag(g)``, all-ones
  direction projected out for LayerNorm models), from AFTER's ``W_U`` by default (``unembed``);
* exact z-scores against Haar-random k-subspaces (closed form, as the live metrics), eigengaps, and
  the relative RSF for every k of ``k_curve``.

The numbers are the live metrics' (``weightgeom.hooks.suite.InstrumentSuite.compute``): the same geometry
functions, the same k cap (``min(k, dim - 1)``), the same key names (:meth:`CompareResult.metrics`).
On a pipeline's own checkpoints (``RUN/pretrain/checkpoints/step_N`` as BASE,
``RUN/align/{obj}/checkpoints/step_M`` as AFTER) they reproduce the alignment run's final
``rsf_out_pred`` exactly, and with ``c_a=`` that run's final snapshot its ``rsf_in`` (the live
``W0`` is the fp32 weight at phase start, i.e. BASE; the live prediction subspace is the
unembedding at measurement time, i.e. AFTER's; the last compute fires at the phase's last step,
after the last optimizer step, i.e. on AFTER).

Memory: both models (fp32) and one delta per tracked matrix are held at once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from weightgeom.core.data import load_texts
from weightgeom.core.model_sources import resolve_model
from weightgeom.core.models import load_local_model
from weightgeom.core.tokenizer import load_tokenizer
from weightgeom.harness.compare.input_covariance import (
    InputCovariances,
    measure_input_covariances,
    read_snapshot,
    sample_token_batches,
    snapshot_covariances,
)
from weightgeom.harness.compare.options import (
    C_A_MODELS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_K,
    DEFAULT_K_CURVE,
    DEFAULT_N_TOKENS,
    DEFAULT_SEQ_LEN,
    UNEMBED_CHOICES,
)
from weightgeom.harness.compare.report import write_compare_report
from weightgeom.hooks import geometry as geo
from weightgeom.hooks import keys
from weightgeom.hooks.roles import ROLES, WRITE_ROLES, TrackedMatrix, resolve_tracked, unembedding

__all__ = ["CompareResult", "MatrixResult", "compare", "write_compare_report"]

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


def zscore(dW: Tensor, rsf_value: float, k: int, side: str, enabled: bool) -> float | None:
    """Exact z-score of a (non-relative) RSF against Haar-random k-subspaces, as the live metrics
    compute it (``geometry.rsf_zscore``); None when z-scores are off."""
    return geo.rsf_zscore(dW, rsf_value, k, side) if enabled else None


def compare(base_dir: str | Path, after_dir: str | Path, *, text: str = "stdlib", text_field: str = "text",
            k: int = DEFAULT_K, k_curve: tuple[int, ...] | list[int] = DEFAULT_K_CURVE, unembed: str = "after",
            c_a: str | Path | None = None, c_a_model: str = "base", n_tokens: int = DEFAULT_N_TOKENS,
            seq_len: int = DEFAULT_SEQ_LEN, batch_size: int = DEFAULT_BATCH_SIZE, zscores: bool = True,
            seed: int = 0, tokenizer: str | Path | None = None,
            device: str | torch.device | None = None, out_dir: str | Path | None = None) -> CompareResult:
    """Static read/write analysis of ``dW = W_after - W_base`` for two local HF checkpoints.

    Args:
        base_dir, after_dir: local model directories (config.json + weights) of one supported
            architecture of the role table (or one its fallback maps by module names) with identical shapes.
        text: the sample ``C_a`` is measured on: ``"stdlib"`` (the embedded corpus) or a local
            .txt/.jsonl/.json/.parquet file or directory (``text_field`` names the column).
        k: subspace dimension (capped at ``dim - 1`` per matrix, as in the live metrics).
        k_curve: the k of the RSF-vs-k curves.
        unembed: ``"after"`` (default; the live metrics' choice: the unembedding at measurement
            time) or ``"base"``: whose ``W_U`` and final-norm gain span the prediction subspace.
            The other one's value is reported too (``rsf_out_pred_alt``).
        c_a: an instrument snapshot (``*.safetensors`` with ``cov_in/L{i}/{g}/sum_outer`` and
            ``count``) to take ``C_a`` from instead of measuring it.
        c_a_model: which checkpoint runs over the text to measure ``C_a`` (default BASE: the
            activations the delta was written against, before the delta changed them).
        n_tokens, seq_len, batch_size, seed: the token sample (non-padding tokens, chunk length
            capped at the model's positions, forward batch, sampling seed).
        zscores: exact z-scores of each RSF against random k-subspaces (closed form, as the live metrics).
        tokenizer: tokenizer directory (default: the one saved in ``base_dir``).
        device: where models and geometry run (default CUDA when available, else CPU).
        out_dir: when given, report.md, compare.json, PNGs (and the measured ``c_a.safetensors``).

    Raises ValueError / FileNotFoundError naming the path, matrix, flag or snapshot key at fault.
    """
    k_curve = tuple(int(v) for v in k_curve)
    _check_options(k, k_curve, unembed, c_a_model, n_tokens, seq_len, batch_size)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if c_a is None and text != "stdlib" and not Path(text).exists():  # fail before loading two models
        raise FileNotFoundError(f"--text {text!r} does not exist; use 'stdlib', a local file or a directory")
    # a .gguf file or short name: its dequantized directory (cached), whose tokenizer measures C_a
    base_dir, after_dir = _resolved("BASE", base_dir), _resolved("AFTER", after_dir)
    base = _load("BASE", base_dir, device)
    after = _load("AFTER", after_dir, device)
    model_type = _same_model_type(base, after)
    tracked_base = resolve_tracked(base)  # an architecture without a role table fails here
    tracked_after = resolve_tracked(after)
    deltas, matrices = _deltas(tracked_base, tracked_after)
    result = CompareResult(str(base_dir), str(after_dir), model_type, k, k_curve, unembed, zscores, seed, matrices)
    if result.no_delta:
        result.notes.append("BASE and AFTER have identical weights in every tracked matrix: there is no delta, "
                            "so no RSF, z-score or curve is reported.")
    else:
        if c_a is not None:
            ca = _snapshot_c_a(c_a, tracked_base, deltas, device, result)
        else:
            model, tracked = (base, tracked_base) if c_a_model == "base" else (after, tracked_after)
            ca = _measured_c_a(model, tracked, base_dir, tokenizer, text, text_field, n_tokens, seq_len, batch_size,
                               seed, c_a_model, out_dir, result)
        _input_side(result, deltas, tracked_base, ca)
        _output_side(result, deltas, base, after)
    if out_dir is not None:
        write_compare_report(result, out_dir)
    return result


# ----- loading and consistency checks --------------------------------------------------------------

def _check_options(k: int, k_curve: tuple[int, ...], unembed: str, c_a_model: str,
                   n_tokens: int, seq_len: int, batch_size: int) -> None:
    for flag, value in (("--n-tokens", n_tokens), ("--seq-len", seq_len), ("--batch-size", batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if k < 1:
        raise ValueError(f"--k must be >= 1, got {k}")
    if not k_curve or min(k_curve) < 1:
        raise ValueError(f"--k-curve needs one or more k >= 1, got {list(k_curve)}")
    if unembed not in UNEMBED_CHOICES:
        raise ValueError(f"--unembed must be one of {UNEMBED_CHOICES}, got {unembed!r}")
    if c_a_model not in C_A_MODELS:
        raise ValueError(f"--c-a-model must be one of {C_A_MODELS}, got {c_a_model!r}")


def _resolved(label: str, path: str | Path) -> Path:
    try:
        return resolve_model(path)
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise type(err)(f"{label}: {err}") from err


def _load(label: str, path: str | Path, device: torch.device) -> nn.Module:
    try:
        model = load_local_model(path, dtype=torch.float32)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise type(err)(f"{label}: {err}") from err
    return model.to(device).eval()


def _same_model_type(base: nn.Module, after: nn.Module) -> str:
    types = [getattr(m.config, "model_type", None) for m in (base, after)]
    if types[0] != types[1]:
        raise ValueError(f"BASE is a {types[0]!r} model but AFTER is a {types[1]!r} model: compare needs two "
                         "checkpoints of one architecture with the same shapes")
    return types[0]


def _deltas(tracked_base: list[TrackedMatrix],
            tracked_after: list[TrackedMatrix]) -> tuple[dict[str, Tensor], list[MatrixResult]]:
    """``dW = W_after - W_base`` (fp32, out x in) per key, after checking both have the same matrices."""
    after = {tm.key: tm for tm in tracked_after}
    missing = [tm.key for tm in tracked_base if tm.key not in after]
    extra = sorted(set(after) - {tm.key for tm in tracked_base})
    if missing or extra:
        which, names = ("AFTER", missing) if missing else ("BASE", extra)
        raise ValueError(f"{which} has no matrix {names[0]} (BASE has {len(tracked_base)} tracked matrices, AFTER "
                         f"{len(tracked_after)}): the checkpoints differ in layers; compare needs the same shapes")
    deltas, results = {}, []
    for tm in tracked_base:
        w_base, w_after = tm.weight(), after[tm.key].weight()
        if w_base.shape != w_after.shape:
            raise ValueError(f"matrix {tm.key} has shape {tuple(w_base.shape)} (out, in) in BASE but "
                             f"{tuple(w_after.shape)} in AFTER: compare needs two checkpoints with the same shapes")
        dW = w_after - w_base
        norm = dW.double().norm().item()
        base_norm = w_base.double().norm().item()
        deltas[tm.key] = dW
        results.append(MatrixResult(tm.layer, tm.role, tuple(dW.shape), norm, norm / base_norm if base_norm else None))
    return deltas, results


# ----- C_a --------------------------------------------------------------------------------------------

def _group_dims(tracked: list[TrackedMatrix], deltas: dict[str, Tensor]) -> dict[str, int]:
    return {tm.group_key: deltas[tm.key].shape[1] for tm in tracked}


def _snapshot_c_a(path: str | Path, tracked: list[TrackedMatrix], deltas: dict[str, Tensor], device: torch.device,
                  result: CompareResult) -> InputCovariances:
    state = read_snapshot(path)
    ca = snapshot_covariances(state, _group_dims(tracked, deltas), path, device)
    # A run's snapshot also holds its W0: if it is not BASE, the C_a comes from a phase that did not
    # start at BASE. Still usable, but say so.
    w0 = {tm.key: state.get(keys.state_key(keys.WEIGHTS, tm.key, "W0")) for tm in tracked}
    diffs = [(tm.weight() - w0[tm.key].to(device)).abs().max().item() for tm in tracked
             if w0[tm.key] is not None and tuple(w0[tm.key].shape) == tuple(deltas[tm.key].shape)]
    if diffs and max(diffs) > 0:
        result.notes.append(f"The snapshot's reference weights W0 differ from BASE by up to {max(diffs):.3g}: "
                            "its C_a was accumulated in a phase that did not start from BASE.")
    result.c_a_source, result.c_a_tokens = ca.source, dict(ca.count)
    return ca


def _measured_c_a(model: nn.Module, tracked: list[TrackedMatrix], base_dir: str | Path, tokenizer_dir,
                  text: str, text_field: str, n_tokens: int, seq_len: int, batch_size: int, seed: int,
                  c_a_model: str, out_dir, result: CompareResult) -> InputCovariances:
    tokenizer = _tokenizer(tokenizer_dir or base_dir, "--tokenizer" if tokenizer_dir else "BASE")
    vocab_rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab_rows:
        raise ValueError(f"the tokenizer ({tokenizer_dir or base_dir}) has {len(tokenizer)} tokens but the model's "
                         f"embedding has {vocab_rows} rows: pass the tokenizer the checkpoints were trained with "
                         "(--tokenizer DIR)")
    max_positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    seq_len = min(seq_len, max_positions) if max_positions else seq_len
    texts = load_texts(text, text_field=text_field)
    batches = sample_token_batches(tokenizer, texts, n_tokens=n_tokens, seq_len=seq_len, batch_size=batch_size,
                                   seed=seed)
    taken = sum(int(mask.sum()) for _, mask in batches)
    source = (f"{c_a_model.upper()} model, forward only, on {taken} tokens of {text!r} "
              f"(chunks of <= {seq_len} tokens, seed {seed})")
    ca, collector = measure_input_covariances(model, tracked, batches, source)
    if taken < n_tokens:
        result.notes.append(f"The text {text!r} holds only {taken} tokens; C_a was measured on all of them "
                            f"(--n-tokens asked for {n_tokens}).")
    narrow = sorted(g for g, C in ca.cov.items() if ca.count[g] < C.shape[0])
    if narrow:
        result.notes.append(f"C_a of {', '.join(narrow)} comes from fewer tokens ({taken}) than its width: it is "
                            "rank-deficient and its small eigenvalues are zero; raise --n-tokens.")
    if out_dir is not None:
        path = Path(out_dir) / "c_a.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in collector.state_dict().items()}, str(path))
        result.c_a_file = str(path)
    result.c_a_source, result.c_a_tokens = ca.source, dict(ca.count)
    return ca


def _tokenizer(path: str | Path, label: str):
    try:
        # vocab_size and cache_dir apply only to the embedded tokenizer; a directory keeps its own.
        return load_tokenizer(str(path), 0, Path("."))
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"{label}: cannot load a tokenizer to measure C_a on text ({err}). Pass --tokenizer DIR, "
                         "or take C_a from a run's instrument snapshot with --c-a SNAPSHOT") from err


# ----- the two sides --------------------------------------------------------------------------------

def _curve_ks(ks: tuple[int, ...], dim: int) -> list[int]:
    """The curve's k below ``dim`` (as weightgeom.harness.reports.run_report's k-curves: a k >= dim is the whole space,
    relative RSF 1 by construction); the headline k is capped at ``dim - 1`` instead."""
    return sorted({k for k in ks if k < dim})


def _input_side(result: CompareResult, deltas: dict[str, Tensor], tracked: list[TrackedMatrix],
                ca: InputCovariances) -> None:
    eig = {g: geo.sym_eigh(C) for g, C in ca.cov.items()}
    group_of = {tm.key: tm.group_key for tm in tracked}
    unmeasured = []
    for m in result.matrices:
        group = group_of[m.key]
        if m.no_delta:
            continue
        if group not in eig:
            unmeasured.append(m.key)
            continue
        dW = deltas[m.key]
        evals, evecs = eig[group]
        n = dW.shape[1]
        k = min(result.k, n - 1)
        value = geo.rsf_in(dW, evecs[:, :k])
        m.rsf_in, m.k_in = geo.relative_rsf(value, k, n), k
        m.z_in = zscore(dW, value, k, "in", result.zscores)
        m.gap_in = geo.eigengap(evals, k)
        if _curve_ks(result.k_curve, n):
            m.curve_in = geo.rsf_curve(dW, evecs, _curve_ks(result.k_curve, n), side="in")
    if unmeasured:
        result.notes.append(f"No C_a for the input groups of {', '.join(unmeasured)} in {ca.source}: their RSF_in "
                            "is not reported (a run's snapshot holds only instruments.input_roles; measure on "
                            "text instead, or add the roles to input_roles).")


def _post_norm_gains(model: nn.Module) -> dict[str, Tensor]:
    """``{key: g_post (out,)}`` of the write matrices whose output passes a norm before the residual add."""
    gains = {tm.key: tm.post_norm_gain() for tm in resolve_tracked(model, WRITE_ROLES)}
    return {key: g for key, g in gains.items() if g is not None}


def _written(dW: Tensor, gain: Tensor | None) -> Tensor:
    return dW if gain is None else gain.to(dW.device, dW.dtype)[:, None] * dW


def _output_side(result: CompareResult, deltas: dict[str, Tensor], base: nn.Module, after: nn.Module) -> None:
    W_after, gain_after, layernorm = unembedding(after)
    W_base, gain_base, _ = unembedding(base)
    if W_after.shape != W_base.shape:
        raise ValueError(f"the unembedding (W_U) has shape {tuple(W_base.shape)} in BASE but {tuple(W_after.shape)} "
                         "in AFTER: compare needs two checkpoints with the same shapes")
    d = W_after.shape[1]
    k = min(result.k, d - 1)
    top = min(max(*result.k_curve, result.k), d - 1)
    V_after, s_after = geo.prediction_subspace(W_after, gain_after, k=top, layernorm=layernorm)
    V_base, s_base = geo.prediction_subspace(W_base, gain_base, k=top, layernorm=layernorm)
    (V, svals), V_alt = ((V_after, s_after), V_base) if result.unembed == "after" else ((V_base, s_base), V_after)
    # Behind a post-norm (OLMo2, Gemma2/3) the residual stream receives diag(g_post) dW, with the post-norm gain
    # of the checkpoint whose W_U is used, as the live metrics do at measurement time (docs/metrics.md).
    post_after, post_base = _post_norm_gains(after), _post_norm_gains(base)
    post, post_alt = (post_after, post_base) if result.unembed == "after" else (post_base, post_after)
    result.gap_pred = geo.eigengap(svals.pow(2), k)
    result.pred_overlap = (V_after[:, :k].T @ V_base[:, :k]).square().sum().item() / k
    for m in result.matrices:
        if m.no_delta or m.role not in WRITE_ROLES:
            continue
        dW = _written(deltas[m.key], post.get(m.key))
        value = geo.rsf_out(dW, V[:, :k])
        m.rsf_out_pred, m.k_out = geo.relative_rsf(value, k, d), k
        m.z_out_pred = zscore(dW, value, k, "out", result.zscores)
        dW_alt = _written(deltas[m.key], post_alt.get(m.key))
        m.rsf_out_pred_alt = geo.relative_rsf(geo.rsf_out(dW_alt, V_alt[:, :k]), k, d)
        if _curve_ks(result.k_curve, d):
            m.curve_out = geo.rsf_curve(dW, V, _curve_ks(result.k_curve, d), side="out")
