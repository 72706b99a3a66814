"""The mechanism behind the write-side claim, measured on one checkpoint: how much of a loss's ``C_delta``
lies in the prediction subspace (docs/metrics.md, "C_delta mass in the prediction subspace").

For each write matrix (o, down) of each layer, ``C_delta = (1/N) sum_t delta_t delta_t^T`` with
``delta_t = dL/dy_t`` at the matrix's output is accumulated by the live instrument
(:class:`weightgeom.hooks.covariance.CovarianceInstrument`, the statistic every run streams) while the
checkpoint runs forward and backward over

* ``ce``: a seeded token sample of a text (the checkpoint's own pretraining signal): next-token
  cross-entropy, a mean over the batch's predicted tokens, with ``loss_normalizer`` = those tokens, so
  ``delta`` is each token's own gradient, as in a CE run;
* a preference loss (``dpo``, ``gG``, ``likelihood``, ``mixL``; weightgeom.trainers.losses) on preference
  pairs, a mean over the batch's pairs with ``loss_normalizer`` = pairs (per-pair gradients, as in an
  alignment run). The reference model is the measured checkpoint itself (its log-probs computed once, no
  grad): the gradient of the first step of an alignment run that starts from this checkpoint.

No weight gradient is formed: parameters are frozen and the input embeddings' output is made a leaf that
requires grad, so a backward computes the activations' gradients (every ``delta``) only. The model runs in
eval mode (no dropout). Then ``mass = tr(V_k^T C_delta V_k) / tr(C_delta)`` over ``k / m``
(:func:`weightgeom.hooks.geometry.prediction_mass`), its exact z-score (``mass_zscore``) and a k-curve, with
``V`` the top prediction subspace of the measured checkpoint's own unembedding (``W_U diag(g)``, as the
live metric at measurement time; no post-norm gain: ``delta`` lives before a post-norm).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weightgeom.core.data import (
    build_embedded_preferences,
    identical_after_truncation,
    load_preference_pairs,
    load_texts,
    render_pairs,
    tokenize_pairs,
)
from weightgeom.core.docstring_pairs import build_docstring_preferences
from weightgeom.harness.compare.input_covariance import sample_token_batches
from weightgeom.harness.compare.options import CompareOptions, mass_loss
from weightgeom.harness.compare.result import MassResult
from weightgeom.hooks import geometry as geo
from weightgeom.hooks.covariance import CovarianceInstrument
from weightgeom.hooks.roles import WRITE_ROLES, TrackedMatrix, resolve_tracked, unembedding
from weightgeom.trainers.losses import GradedLoss, MixtureLoss, PreferenceLoss
from weightgeom.trainers.pairs import pair_logps, reference_logps

PAIR_SETS = ("docstrings", "embedded")  # built-in preference sets; anything else is a file


@contextlib.contextmanager
def activation_gradients_only(model: nn.Module) -> Iterator[None]:
    """Inside the block a backward computes the activations' gradients and no weight gradient: every
    parameter is frozen and the input embeddings' output is replaced by a leaf that requires grad (the
    same values). Restored on exit."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)

    def leaf(module, args, output):
        return output.detach().requires_grad_()

    handle = model.get_input_embeddings().register_forward_hook(leaf)
    try:
        yield
    finally:
        handle.remove()
        for p in trainable:
            p.requires_grad_(True)


def delta_covariances(model: nn.Module, tracked: list[TrackedMatrix],
                      steps: Iterable[Callable[[], tuple[Tensor, float]]]) -> tuple[dict[str, Tensor], int]:
    """``{L{i}/{r}: C_delta (m, m) float64}`` of the write matrices in ``tracked`` and the tokens counted,
    over ``steps``: each returns ``(loss, what the loss was divided by)`` from a forward of ``model``."""
    instrument = CovarianceInstrument([tm for tm in tracked if tm.role in WRITE_ROLES], input_roles=(),
                                      output_roles=WRITE_ROLES, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        with activation_gradients_only(model), instrument.attached(model):
            for step in steps:
                loss, normalizer = step()
                instrument.loss_normalizer = float(normalizer)
                loss.backward()
    finally:
        model.train(was_training)
    covs = {key: instrument.covariance_out(key) for key in instrument.output_keys if key in instrument.sums_out}
    counts = {s[1] for s in instrument.sums_out.values()}
    return covs, max(counts, default=0)


def ce_steps(model: nn.Module, batches: list[tuple[Tensor, Tensor]], device: torch.device):
    """One step per batch ``(ids, mask)``: next-token CE, the mean over the batch's predicted tokens."""
    for ids, mask in batches:
        def step(ids=ids, mask=mask):
            ids_d, mask_d = ids.to(device), mask.to(device)
            logits = model(input_ids=ids_d, attention_mask=mask_d).logits[:, :-1].float()
            targets = ids_d[:, 1:].masked_fill(mask_d[:, 1:] == 0, -100)
            n = int((mask[:, 1:] != 0).sum())
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                                   reduction="sum") / max(n, 1)
            return loss, max(n, 1)
        yield step


def preference_steps(model: nn.Module, data: dict, loss_fn: PreferenceLoss, pairs_per_batch: int,
                     device: torch.device):
    """One step per batch of pairs: ``loss_fn`` (a mean over pairs) against the model's own log-probs."""
    ref_chosen, ref_rejected = reference_logps(model, data, pairs_per_batch, device)
    for idx in torch.arange(len(ref_chosen)).split(pairs_per_batch):
        def step(idx=idx):
            chosen, rejected, counts = pair_logps(model, data, idx, device)
            out = loss_fn(chosen, rejected, ref_chosen[idx].to(chosen), ref_rejected[idx].to(chosen), counts)
            return out.loss, len(idx)
        yield step


def preference_loss(name: str, beta: float) -> PreferenceLoss:
    kind, value = mass_loss(name)
    return MixtureLoss(value, beta) if kind == "mixture" else GradedLoss(value, beta)


def mass_pairs(options: CompareOptions, tokenizer) -> tuple[list[dict], str]:
    """``options.n_pairs`` preference pairs as plain text (conversational ones through ``tokenizer``'s chat
    template), without pairs whose chosen and rejected are the same tokens once cut to ``max_len``; and
    a description of where they came from."""
    source = options.pairs
    if source == "docstrings":
        pairs = build_docstring_preferences(options.n_pairs, seed=options.seed)
    elif source == "embedded":
        pairs = build_embedded_preferences(load_texts(options.text, text_field=options.text_field),
                                           n_pairs=options.n_pairs, seed=options.seed)
        source = f"embedded (word-shuffled) pairs of {options.text!r}"
    else:
        if not Path(source).is_file():
            raise FileNotFoundError(f"--pairs {source!r}: no such file; use 'docstrings', 'embedded' or a local "
                                    ".jsonl/.json/.parquet preference file")
        rows, _ = load_preference_pairs(source, keep_messages=True)
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(options.seed)).tolist()
        pairs = [rows[i] for i in order[: options.n_pairs]]
    pairs = render_pairs(pairs, tokenizer)
    same = set(identical_after_truncation(pairs, tokenizer, options.max_len))
    pairs = [p for i, p in enumerate(pairs) if i not in same]
    if not pairs:
        raise ValueError(f"--pairs {options.pairs}: no pair is left whose chosen and rejected differ once cut to "
                         f"--max-len {options.max_len}")
    return pairs, f"{len(pairs)} pairs of {source} (seed {options.seed}, <= {options.max_len} tokens)"


def measure_mass(model: nn.Module, tokenizer, options: CompareOptions, which: str,
                 layers: tuple[int, ...] | None = None) -> dict[str, MassResult]:
    """The mechanism metric of every loss in ``options.mass`` on ``model`` (``which``: "after" or "base", for
    the record), per write matrix of ``layers`` (None: all)."""
    device = next(model.parameters()).device
    tracked = [tm for tm in resolve_tracked(model, WRITE_ROLES) if layers is None or tm.layer in layers]
    W_U, gain, layernorm = unembedding(model)
    d = W_U.shape[1]
    top = min(max(*options.k_curve, options.k), d - 1)
    V, _ = geo.prediction_subspace(W_U.to(device), None if gain is None else gain.to(device), k=top,
                                   layernorm=layernorm)
    out = {}
    for name in options.mass:
        kind, _ = mass_loss(name)
        if kind == "ce":
            max_positions = getattr(model.config, "max_position_embeddings", None)
            seq_len = min(options.seq_len, max_positions) if max_positions else options.seq_len
            batches = sample_token_batches(tokenizer, load_texts(options.text, text_field=options.text_field),
                                           n_tokens=options.mass_tokens, seq_len=seq_len,
                                           batch_size=options.batch_size, seed=options.seed)
            covs, tokens = delta_covariances(model, tracked, ce_steps(model, batches, device))
            source = (f"{which.upper()} model, next-token CE (token mean) on {tokens} tokens of {options.text!r} "
                      f"(chunks of <= {seq_len} tokens, seed {options.seed})")
        else:
            pairs, described = mass_pairs(options, tokenizer)
            data = tokenize_pairs(pairs, tokenizer, options.max_len)
            loss_fn = preference_loss(name, options.beta)
            covs, tokens = delta_covariances(
                model, tracked, preference_steps(model, data, loss_fn, max(1, options.batch_size // 2), device))
            source = (f"{which.upper()} model, {loss_fn!r} (pair mean) on {described}; reference = the same "
                      f"model (the first alignment step's gradient from this checkpoint), {tokens} tokens")
        out[name] = mass_of(name, which, source, tokens, covs, V, options.k, options.k_curve)
    return out


def mass_of(loss: str, which: str, source: str, tokens: int, covs: dict[str, Tensor], V: Tensor, k: int,
            k_curve: tuple[int, ...]) -> MassResult:
    """The relative mass, z-score and k-curve of each ``C_delta`` in ``covs`` against the ordered basis ``V``
    (m, j), ``k`` capped at ``m - 1``; curve k below ``m`` and within ``V``."""
    result = MassResult(loss, which, source, tokens, k)
    for key, C in covs.items():
        m = C.shape[0]
        k_eff = min(k, m - 1, V.shape[1])
        value = geo.prediction_mass(C, V, k_eff)
        result.mass[key] = value
        result.z[key] = geo.mass_zscore(C, value * k_eff / m, k_eff)
        energies = geo.subspace_energies(C.double(), V.double())
        trace = float(torch.diagonal(C).sum())
        cumulative = torch.cumsum(energies, 0)
        result.curve[key] = {kk: (float(cumulative[kk - 1]) / trace if trace > 0 else 0.0) * m / kk
                             for kk in sorted(set(k_curve)) if kk < m and kk <= V.shape[1]}
    return result
