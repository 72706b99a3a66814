"""``compare``: the paper's static analysis of the weight delta between two local checkpoints.

For every tracked (layer, role) matrix (``weightgeom.hooks.roles``: q k v o gate up down, fused matrices
split, GPT-2's Conv1D transposed) of two checkpoints of one architecture, ``dW = W_after - W_base``
(fp32, shape (out, in)) and

* input side: relative ``RSF_in(dW; U_k)`` with ``U_k`` the top-k eigenvectors of ``C_a`` of the
  matrix's input group, ``C_a`` measured forward-only on a local text sample by the BASE model
  (``c_a_model``) or read from an instrument snapshot (``c_a=``); skipped with ``read_side=False``;
* output side (write roles o, down): relative ``RSF_out(dW; V_k)`` with ``V_k`` the prediction
  subspace of the unembedding (top-k right singular vectors of ``W_U diag(g)``, all-ones
  direction projected out for LayerNorm models), from AFTER's ``W_U`` by default (``unembed``);
* exact z-scores against Haar-random k-subspaces (closed form, as the live metrics), eigengaps, and
  the relative RSF for every k of ``k_curve``;
* with ``mass=``, the mechanism: the mass of each named loss's ``C_delta`` (measured on AFTER, or BASE) in
  the prediction subspace (weightgeom.harness.compare.mechanism).

The numbers are the live metrics' (``weightgeom.hooks.suite.InstrumentSuite.compute``): the same geometry
functions, the same k cap (``min(k, dim - 1)``), the same key names (:meth:`CompareResult.metrics`).
On a pipeline's own checkpoints (``RUN/pretrain/checkpoints/step_N`` as BASE,
``RUN/align/{obj}/checkpoints/step_M`` as AFTER) they reproduce the alignment run's final
``rsf_out_pred`` exactly, and with ``c_a=`` that run's final snapshot its ``rsf_in`` (the live
``W0`` is the fp32 weight at phase start, i.e. BASE; the live prediction subspace is the
unembedding at measurement time, i.e. AFTER's; the last compute fires at the phase's last step,
after the last optimizer step, i.e. on AFTER).

Memory: both models (fp32) and one delta per tracked matrix are held at once. A random initialisation as BASE
(weightgeom.harness.compare.init) and a series of checkpoints (weightgeom.harness.compare.series) run
:func:`compare_models` on models they load themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from weightgeom.core.data import load_texts
from weightgeom.core.model_sources import resolve_model
from weightgeom.core.models import load_local_model
from weightgeom.core.rundir import SNAPSHOT_DIR as SNAPSHOT_FOLDER
from weightgeom.core.tokenizer import load_tokenizer
from weightgeom.harness.compare.input_covariance import (
    InputCovariances,
    measure_input_covariances,
    read_snapshot,
    sample_token_batches,
    snapshot_covariances,
)
from weightgeom.harness.compare.mechanism import measure_mass
from weightgeom.harness.compare.options import INIT, CompareOptions
from weightgeom.harness.compare.report import write_compare_report
from weightgeom.harness.compare.result import CompareResult, MatrixResult
from weightgeom.hooks import geometry as geo
from weightgeom.hooks import keys
from weightgeom.hooks.reference import DIGEST_KEY
from weightgeom.hooks.reference import file_name as w0_file_name
from weightgeom.hooks.roles import WRITE_ROLES, TrackedMatrix, resolve_tracked, unembedding

CALLBACK_FOLDER = "weightgeom"  # WeightGeomCallback's folder under a trainer's output_dir (W0 file, snapshot)

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
            (A random initialisation as BASE: :func:`weightgeom.harness.compare.init.compare_init`.)
        options: what is measured and how (:class:`CompareOptions`: the text sample, ``k``, whose
            ``W_U``, ``C_a`` from a snapshot, the mechanism's losses, ...); default ``CompareOptions()``.
        device: where models and geometry run (default CUDA when available, else CPU).
        out_dir: when given, report.md, compare.json, PNGs (and the measured ``c_a.safetensors``).
        **overrides: fields of ``options`` to replace: ``compare(base, after, k=4)`` is
            ``compare(base, after, CompareOptions(k=4))``.

    Raises ValueError / FileNotFoundError naming the path, matrix, flag or snapshot key at fault.
    """
    options = (options or CompareOptions()).replace(**overrides)
    if str(base_dir) == INIT:
        raise ValueError("BASE 'init' (a random initialisation of AFTER's config) is compared by compare_init(AFTER, "
                         "options) (weightgeom.harness.compare.init), `harness compare init AFTER` on the command "
                         "line; a directory named init: pass ./init")
    device = pick_device(device)
    check_text(options)
    # a .gguf file or short name: its dequantized directory (cached), whose tokenizer measures C_a
    base_dir, after_dir = resolved("BASE", base_dir), resolved("AFTER", after_dir)
    base = load_model("BASE", base_dir, device)
    after = load_model("AFTER", after_dir, device)
    result = compare_models(Checkpoint("BASE", base, base_dir), Checkpoint("AFTER", after, after_dir), options,
                            Measurements(device), c_a_out=out_dir)
    if out_dir is not None:
        write_compare_report(result, out_dir)
    return result


@dataclass
class Checkpoint:
    """A loaded model in a comparison: ``label`` for messages (BASE, AFTER), ``path`` its directory (None for
    a random initialisation built in memory; it then has no tokenizer of its own)."""

    label: str
    model: nn.Module
    path: Path | None
    name: str | None = None  # how reports name it (default: the path)

    @property
    def title(self) -> str:
        return self.name or str(self.path)


class Measurements:
    """What a comparison measures on one checkpoint alone (``C_a`` on text, the mechanism's ``C_delta``),
    kept per checkpoint so a series or several seeds measure each checkpoint once."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.c_a: dict[str, tuple[InputCovariances, dict]] = {}
        self.mass: dict[str, dict] = {}


def pick_device(device: str | torch.device | None) -> torch.device:
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def check_text(options: CompareOptions) -> None:
    """Fail before loading models when the text sample is needed and does not exist."""
    needs_text = (options.read_side and options.c_a is None) or "ce" in options.mass or (
        options.pairs == "embedded" and any(name != "ce" for name in options.mass))
    if needs_text and options.text != "stdlib" and not Path(options.text).exists():
        raise FileNotFoundError(f"--text {options.text!r} does not exist; use 'stdlib', a local file or a directory")


def compare_models(base: Checkpoint, after: Checkpoint, options: CompareOptions, measurements: Measurements, *,
                   c_a_out: str | Path | None = None) -> CompareResult:
    """:func:`compare` on two loaded checkpoints (the same device): the deltas, both sides, the mechanism."""
    model_type = _same_model_type(base.model, after.model)
    tracked_base = _in_layers(resolve_tracked(base.model), options.layers)  # no role table: fails here
    tracked_after = _in_layers(resolve_tracked(after.model), options.layers)
    deltas, matrices = _deltas(tracked_base, tracked_after)
    result = CompareResult(base.title, after.title, model_type, options.k, options.k_curve, options.unembed,
                           options.zscores, options.seed, matrices)
    if result.no_delta:
        result.notes.append("BASE and AFTER have identical weights in every tracked matrix: there is no delta, "
                            "so no RSF, z-score or curve is reported.")
        return result
    if not options.read_side:
        result.notes.append("Read side not measured (read_side off, --no-read-side): no C_a, no RSF_in.")
    elif options.c_a is not None:
        ca = _snapshot_c_a(options.c_a, tracked_base, deltas, measurements.device, result)
        _input_side(result, deltas, tracked_base, ca)
    else:
        which = options.c_a_checkpoint(base_is_init=base.path is None)
        source = base if which == "base" else after
        tracked = tracked_base if which == "base" else tracked_after
        # the tokenizer: BASE's, or AFTER's when BASE is a random initialisation (which has none)
        owner = base if base.path is not None else after
        ca = _measured_c_a(source, tracked, owner, options, measurements, c_a_out, result)
        _input_side(result, deltas, tracked_base, ca)
    _output_side(result, deltas, base.model, after.model)
    if options.mass:
        source = base if options.mass_model == "base" else after
        result.mass = mass_of_checkpoint(source, options, measurements,
                                         tokenizer_owner=source if source.path is not None else after)
    return result


def _in_layers(tracked: list[TrackedMatrix], layers: tuple[int, ...] | None) -> list[TrackedMatrix]:
    if layers is None:
        return tracked
    present = {tm.layer for tm in tracked}
    missing = sorted(set(layers) - present)
    if missing:
        raise ValueError(f"--layers {missing[0]}: the model has layers {min(present)} to {max(present)}")
    return [tm for tm in tracked if tm.layer in layers]


def mass_of_checkpoint(source: Checkpoint, options: CompareOptions, measurements: Measurements, *,
                       tokenizer_owner: Checkpoint | None = None) -> dict:
    """The mechanism metric of every loss of ``options.mass`` on ``source``'s model (measured once per
    checkpoint), with ``options.tokenizer``, else the tokenizer saved with ``tokenizer_owner`` (default
    ``source``)."""
    key = source.title
    if key not in measurements.mass:
        owner = tokenizer_owner or source
        tokenizer_dir = options.tokenizer or owner.path
        tokenizer = _tokenizer(tokenizer_dir, "--tokenizer" if options.tokenizer else owner.label,
                               "the mechanism's losses need text or pairs")
        _check_vocabulary(tokenizer, source.model, tokenizer_dir)
        measurements.mass[key] = measure_mass(source.model, tokenizer, options, options.mass_model, options.layers)
    return dict(measurements.mass[key])


# ----- loading and consistency checks --------------------------------------------------------------

def resolved(label: str, path: str | Path) -> Path:
    try:
        return resolve_model(path)
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise type(err)(f"{label}: {err}") from err


def load_model(label: str, path: str | Path, device: torch.device) -> nn.Module:
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
    # A run's snapshot names the W0 its phase started from: if it is not BASE, the C_a comes from a phase that
    # did not start at BASE. Still usable, but say so.
    found, where = snapshot_reference(state, path, [tm.key for tm in tracked])
    if found is None:
        result.notes.append(where)
    else:
        diffs = [(tm.weight() - w0.to(device)).abs().max().item() for tm in tracked
                 if (w0 := found(tm.key)) is not None and tuple(w0.shape) == tuple(deltas[tm.key].shape)]
        if diffs and max(diffs) > 0:
            result.notes.append(f"The snapshot's reference weights W0 differ from BASE by up to {max(diffs):.3g} (W0 "
                                f"{where}): its C_a was accumulated in a phase that did not start from BASE.")
    result.c_a_source, result.c_a_tokens = ca.source, dict(ca.count)
    return ca


def snapshot_reference(state: dict[str, Tensor], path: str | Path, matrices: list[str]):
    """Where a snapshot's reference weights ``W0`` are: ``(reader, description)`` with ``reader(key)`` the W0 of
    matrix ``L{i}/{r}`` (None when not held), or ``(None, note)`` when the snapshot names a W0 file that is not
    found. A snapshot of this version names its W0 file by digest (``meta/w0_sha256``; the file
    ``W0-{hex[:16]}.safetensors`` lives in the run's instruments/ folder, beside ``step_N.safetensors``; a
    checkpoint's ``instruments.safetensors`` sits two levels below the run); an older one holds the W0 tensors."""
    held = {key: state[name] for key in matrices if (name := keys.state_key(keys.WEIGHTS, key, "W0")) in state}
    if held or DIGEST_KEY not in state:
        return held.get, "held in the snapshot"
    digest = bytes(state[DIGEST_KEY].to(torch.uint8).tolist())
    name = w0_file_name(digest)
    path = Path(path)
    candidates = [path.parent / name, path.parent.parent.parent / SNAPSHOT_FOLDER / name,
                  path.parent.parent / CALLBACK_FOLDER / name]
    file = next((c for c in candidates if c.is_file()), None)
    if file is None:
        return None, (f"The snapshot's reference weights W0 are in {name}, which is not beside it (looked in "
                      f"{', '.join(str(c.parent) for c in candidates)}): whether its C_a comes from a phase that "
                      "started from BASE is not checked.")
    handle = safe_open(str(file), framework="pt")
    names = set(handle.keys())

    def reader(key: str) -> Tensor | None:
        name = keys.state_key(keys.WEIGHTS, key, "W0")
        return handle.get_tensor(name) if name in names else None

    return reader, str(file)


def _measured_c_a(source: Checkpoint, tracked: list[TrackedMatrix], owner: Checkpoint, options: CompareOptions,
                  measurements: Measurements, out_dir: str | Path | None, result: CompareResult) -> InputCovariances:
    key = source.title
    if key not in measurements.c_a:
        measurements.c_a[key] = _measure_c_a(source, tracked, owner, options, out_dir)
    ca, found = measurements.c_a[key]
    result.notes.extend(found["notes"])
    result.c_a_file = found["file"]
    result.c_a_source, result.c_a_tokens = ca.source, dict(ca.count)
    return ca


def _measure_c_a(source: Checkpoint, tracked: list[TrackedMatrix], owner: Checkpoint, options: CompareOptions,
                 out_dir: str | Path | None) -> tuple[InputCovariances, dict]:
    """``C_a`` measured by ``source`` on the text sample, with the tokenizer of ``--tokenizer``, else the one saved
    with ``owner`` (BASE, or AFTER when BASE is a random initialisation)."""
    text, n_tokens, seed = options.text, options.n_tokens, options.seed
    tokenizer_dir = options.tokenizer or owner.path
    tokenizer = _tokenizer(tokenizer_dir, "--tokenizer" if options.tokenizer else owner.label,
                           "C_a is measured on text")
    model = source.model
    _check_vocabulary(tokenizer, model, tokenizer_dir)
    max_positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    seq_len = min(options.seq_len, max_positions) if max_positions else options.seq_len
    texts = load_texts(text, text_field=options.text_field)
    batches = sample_token_batches(tokenizer, texts, n_tokens=n_tokens, seq_len=seq_len,
                                   batch_size=options.batch_size, seed=seed)
    taken = sum(int(mask.sum()) for _, mask in batches)
    described = f"{source.label} model" + (f" ({source.name})" if source.path is None and source.name else "")
    text_source = (f"{described}, forward only, on {taken} tokens of {text!r} "
                   f"(chunks of <= {seq_len} tokens, seed {seed})")
    ca, collector = measure_input_covariances(model, tracked, batches, text_source)
    notes = []
    if taken < n_tokens:
        notes.append(f"The text {text!r} holds only {taken} tokens; C_a was measured on all of them "
                     f"(--n-tokens asked for {n_tokens}).")
    narrow = sorted(g for g, C in ca.cov.items() if ca.count[g] < C.shape[0])
    if narrow:
        notes.append(f"C_a of {', '.join(narrow)} comes from fewer tokens ({taken}) than its width: it is "
                     "rank-deficient and its small eigenvalues are zero; raise --n-tokens.")
    file = None
    if out_dir is not None:
        path = Path(out_dir) / "c_a.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in collector.state_dict().items()}, str(path))
        file = str(path)
    return ca, {"notes": notes, "file": file}


def _check_vocabulary(tokenizer, model: nn.Module, tokenizer_dir) -> None:
    vocab_rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab_rows:
        raise ValueError(f"the tokenizer ({tokenizer_dir}) has {len(tokenizer)} tokens but the model's "
                         f"embedding has {vocab_rows} rows: pass the tokenizer the checkpoints were trained with "
                         "(--tokenizer DIR)")


def _tokenizer(path: str | Path | None, label: str, why: str):
    if path is None:
        raise ValueError(f"{label}: a random initialisation has no tokenizer ({why}); pass --tokenizer DIR")
    try:
        # vocab_size and cache_dir apply only to the embedded tokenizer; a directory keeps its own.
        return load_tokenizer(str(path), 0, Path("."))
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"{label}: cannot load a tokenizer ({why}: {err}). Pass --tokenizer DIR, "
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
