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
from weightgeom.harness.compare.options import CompareOptions
from weightgeom.harness.compare.report import write_compare_report
from weightgeom.harness.compare.result import CompareResult, MatrixResult
from weightgeom.hooks import geometry as geo
from weightgeom.hooks import keys
from weightgeom.hooks.roles import WRITE_ROLES, TrackedMatrix, resolve_tracked, unembedding

__all__ = ["CompareOptions", "CompareResult", "MatrixResult", "compare", "write_compare_report"]


def zscore(dW: Tensor, rsf_value: float, k: int, side: str, enabled: bool) -> float | None:
    """Exact z-score of a (non-relative) RSF against Haar-random k-subspaces, as the live metrics
    compute it (``geometry.rsf_zscore``); None when z-scores are off."""
    return geo.rsf_zscore(dW, rsf_value, k, side) if enabled else None


def compare(base_dir: str | Path, after_dir: str | Path, options: CompareOptions | None = None, *,
            device: str | torch.device | None = None, out_dir: str | Path | None = None,
            **overrides) -> CompareResult:
    """Static read/write analysis of ``dW = W_after - W_base`` for two local HF checkpoints.

    Args:
        base_dir, after_dir: local model directories (config.json + weights) of one supported
            architecture of the role table (or one its fallback maps by module names) with identical shapes.
        options: what is measured and how (:class:`CompareOptions`: the text sample, ``k``, whose
            ``W_U``, ``C_a`` from a snapshot, ...); default ``CompareOptions()``.
        device: where models and geometry run (default CUDA when available, else CPU).
        out_dir: when given, report.md, compare.json, PNGs (and the measured ``c_a.safetensors``).
        **overrides: fields of ``options`` to replace: ``compare(base, after, k=4)`` is
            ``compare(base, after, CompareOptions(k=4))``.

    Raises ValueError / FileNotFoundError naming the path, matrix, flag or snapshot key at fault.
    """
    options = (options or CompareOptions()).replace(**overrides)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    text = options.text
    if options.c_a is None and text != "stdlib" and not Path(text).exists():  # fail before loading two models
        raise FileNotFoundError(f"--text {text!r} does not exist; use 'stdlib', a local file or a directory")
    # a .gguf file or short name: its dequantized directory (cached), whose tokenizer measures C_a
    base_dir, after_dir = _resolved("BASE", base_dir), _resolved("AFTER", after_dir)
    base = _load("BASE", base_dir, device)
    after = _load("AFTER", after_dir, device)
    model_type = _same_model_type(base, after)
    tracked_base = resolve_tracked(base)  # an architecture without a role table fails here
    tracked_after = resolve_tracked(after)
    deltas, matrices = _deltas(tracked_base, tracked_after)
    result = CompareResult(str(base_dir), str(after_dir), model_type, options.k, options.k_curve, options.unembed,
                           options.zscores, options.seed, matrices)
    if result.no_delta:
        result.notes.append("BASE and AFTER have identical weights in every tracked matrix: there is no delta, "
                            "so no RSF, z-score or curve is reported.")
    else:
        if options.c_a is not None:
            ca = _snapshot_c_a(options.c_a, tracked_base, deltas, device, result)
        else:
            model, tracked = (base, tracked_base) if options.c_a_model == "base" else (after, tracked_after)
            ca = _measured_c_a(model, tracked, base_dir, options, out_dir, result)
        _input_side(result, deltas, tracked_base, ca)
        _output_side(result, deltas, base, after)
    if out_dir is not None:
        write_compare_report(result, out_dir)
    return result


# ----- loading and consistency checks --------------------------------------------------------------

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


def _measured_c_a(model: nn.Module, tracked: list[TrackedMatrix], base_dir: str | Path, options: CompareOptions,
                  out_dir: str | Path | None, result: CompareResult) -> InputCovariances:
    tokenizer_dir, text, n_tokens, seed = options.tokenizer, options.text, options.n_tokens, options.seed
    tokenizer = _tokenizer(tokenizer_dir or base_dir, "--tokenizer" if tokenizer_dir else "BASE")
    vocab_rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab_rows:
        raise ValueError(f"the tokenizer ({tokenizer_dir or base_dir}) has {len(tokenizer)} tokens but the model's "
                         f"embedding has {vocab_rows} rows: pass the tokenizer the checkpoints were trained with "
                         "(--tokenizer DIR)")
    max_positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    seq_len = min(options.seq_len, max_positions) if max_positions else options.seq_len
    texts = load_texts(text, text_field=options.text_field)
    batches = sample_token_batches(tokenizer, texts, n_tokens=n_tokens, seq_len=seq_len,
                                   batch_size=options.batch_size, seed=seed)
    taken = sum(int(mask.sum()) for _, mask in batches)
    source = (f"{options.c_a_model.upper()} model, forward only, on {taken} tokens of {text!r} "
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
