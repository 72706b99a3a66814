"""``C_a`` for a static comparison of two checkpoints: measured forward-only on a text sample, or
read from an instrument snapshot.

``C_a = (1/N) sum_t a_t a_t^T`` (uncentered; docs/metrics.md, "Statistics accumulated while
training") over the non-padding tokens of a sample, one per *input group* (``L{i}/attn_in`` is read
by q, k and v; ``L{i}/mlp_in`` by gate and up; ``L{i}/o_in`` by o; ``L{i}/down_in`` by down), exactly
the statistic the live ``CovarianceInstrument`` accumulates. Here no backward runs, so a forward
pre-hook on one module per group adds the statistics immediately (the live instrument waits for
backward only to skip no-grad passes; a static measurement *is* a no-grad pass).

Token sample (:func:`sample_token_batches`): documents are tokenized without special tokens and
cut into consecutive chunks of at most ``seq_len`` tokens (no chunk crosses a document boundary,
so the last chunk of each document is short and padded); a seeded shuffle picks chunks until
``n_tokens`` tokens are collected. Padding is excluded with the attention mask.

Sums are accumulated in float64 on the model's device. Cost: one ``n x n`` Gram matrix per group
and batch, ``N n^2`` flops in total; the ``down_in`` group (``d_ff`` wide) dominates.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from weightgeom.hooks import keys
from weightgeom.hooks.roles import TrackedMatrix

# The tokenizer reads at most this many tokens' worth of documents per requested token: enough
# chunks to draw a sample spread over many documents without tokenizing a whole corpus.
_POOL_FACTOR = 4


@dataclass(frozen=True)
class InputCovariances:
    """``C_a`` per input group key (``"L0/attn_in"``): ``cov`` float64 (n, n), ``count`` tokens
    counted, ``source`` a one-line description of where the statistics came from."""

    cov: dict[str, Tensor]
    count: dict[str, int]
    source: str


class ForwardCovariance:
    """Forward-only ``sum a a^T``, ``sum a`` and token counts per input group of ``tracked``.

    One module per group is hooked (the group's first tracked role: q_proj, or GPT-2's fused
    c_attn, for ``attn_in``). Call :meth:`set_mask` with the batch's ``(B, T)`` attention mask
    before each forward; rows with mask 0 are not counted. Hooks live only inside :meth:`attached`.
    State keys follow the instrument snapshot format (``cov_in/L{i}/{g}/{sum_outer,sum,count}``),
    so a saved measurement can be passed back as ``c_a=``.
    """

    def __init__(self, tracked: list[TrackedMatrix]) -> None:
        self._group_of: dict[nn.Module, str] = {}
        for tm in tracked:
            if tm.group_key not in self._group_of.values() and tm.module not in self._group_of:
                self._group_of[tm.module] = tm.group_key
        self.sums: dict[str, list] = {}
        self._keep: Tensor | None = None
        self._tokens = 0

    def set_mask(self, mask: Tensor) -> None:
        """``mask`` (B, T): 1 for real tokens, 0 for padding."""
        flat = mask.reshape(-1).bool()
        self._tokens = flat.numel()
        self._keep = None if bool(flat.all()) else flat.nonzero().squeeze(1)

    @contextlib.contextmanager
    def attached(self) -> Iterator[ForwardCovariance]:
        """Hooks on the tracked modules for the duration of a ``with`` block, removed also on error."""
        handles = [m.register_forward_pre_hook(self._hook) for m in self._group_of]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, module: nn.Module, args: tuple) -> None:
        key = self._group_of[module]
        if not args or not isinstance(args[0], torch.Tensor):
            raise RuntimeError(f"{key}: the hooked module was called without a positional input tensor; "
                               "ForwardCovariance reads the input from the first positional argument")
        a = args[0].detach().reshape(-1, args[0].shape[-1])
        if a.shape[0] != self._tokens:
            raise RuntimeError(f"{key}: the module saw {a.shape[0]} token rows, but the batch mask has "
                               f"{self._tokens}; call set_mask(attention_mask) before each forward")
        if self._keep is not None:
            a = a.index_select(0, self._keep.to(a.device))
        a = a.double()
        if key not in self.sums:
            n = a.shape[1]
            self.sums[key] = [a.new_zeros(n, n), a.new_zeros(n), 0]
        s = self.sums[key]
        s[0].addmm_(a.T, a)
        s[1].add_(a.sum(0))
        s[2] += a.shape[0]
        return None  # a returned value would replace the module's input

    def state_dict(self) -> dict[str, Tensor]:
        state = {}
        for key, (outer, total, count) in self.sums.items():
            state[keys.state_key(keys.COV_IN, key, "sum_outer")] = outer.clone()
            state[keys.state_key(keys.COV_IN, key, "sum")] = total.clone()
            state[keys.state_key(keys.COV_IN, key, "count")] = torch.tensor(float(count), dtype=torch.float64)
        return state

    def covariances(self, source: str) -> InputCovariances:
        cov = {key: outer / count for key, (outer, _, count) in self.sums.items() if count}
        return InputCovariances(cov, {key: s[2] for key, s in self.sums.items()}, source)


def sample_token_batches(tokenizer: PreTrainedTokenizerBase, texts: list[str], *, n_tokens: int, seq_len: int,
                         batch_size: int = 8, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """A seeded sample of ``n_tokens`` tokens as right-padded batches ``[(input_ids (B, T), mask (B, T))]``.

    Documents are visited in a seeded random order and cut into chunks of at most ``seq_len``
    tokens until the pool holds ``4 * n_tokens`` tokens (or the texts run out); chunks are then
    drawn from the pool in a seeded order until ``n_tokens`` are taken (the last one cut to fit).
    Fewer tokens come back when the texts hold fewer. Randomness: a private CPU generator.
    """
    if n_tokens < 1 or seq_len < 1 or batch_size < 1:
        raise ValueError(f"n_tokens, seq_len and batch_size must be >= 1, got {n_tokens}, {seq_len}, {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    pool: list[list[int]] = []
    pooled = 0
    for i in torch.randperm(len(texts), generator=generator).tolist():
        ids = tokenizer(texts[i], add_special_tokens=False, verbose=False)["input_ids"]
        pool.extend(ids[s:s + seq_len] for s in range(0, len(ids), seq_len))
        pooled += len(ids)
        if pooled >= _POOL_FACTOR * n_tokens:
            break
    chosen, taken = [], 0
    for j in torch.randperm(len(pool), generator=generator).tolist():
        if taken >= n_tokens:
            break
        chunk = pool[j][: n_tokens - taken]
        chosen.append(chunk)
        taken += len(chunk)
    if not chosen:
        raise ValueError("the text sample produced no tokens; check the text source (--text)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for start in range(0, len(chosen), batch_size):
        group = chosen[start:start + batch_size]
        width = max(len(c) for c in group)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, chunk in enumerate(group):
            ids[row, :len(chunk)] = torch.tensor(chunk, dtype=torch.long)
            mask[row, :len(chunk)] = 1
        batches.append((ids, mask))
    return batches


@torch.no_grad()
def measure_input_covariances(model: nn.Module, tracked: list[TrackedMatrix], batches: list[tuple[Tensor, Tensor]],
                              source: str) -> tuple[InputCovariances, ForwardCovariance]:
    """Run ``model`` (eval mode, no grad) over ``batches`` and return ``C_a`` per input group of
    ``tracked`` (modules of ``model``), plus the accumulator (its ``state_dict`` is snapshot-format)."""
    device = next(model.parameters()).device
    collector = ForwardCovariance(tracked)
    was_training = model.training
    model.eval()
    try:
        with collector.attached():
            for ids, mask in batches:
                collector.set_mask(mask)
                model(input_ids=ids.to(device), attention_mask=mask.to(device))
    finally:
        model.train(was_training)
    return collector.covariances(source), collector


def snapshot_covariances(state: dict[str, Tensor], group_dims: dict[str, int], path: str | Path,
                         device: torch.device | str = "cpu") -> InputCovariances:
    """``C_a`` from an instrument snapshot's ``cov_in/L{i}/{g}/sum_outer`` and ``count``.

    ``group_dims`` maps every input group of the model (``"L0/attn_in"``) to its width n. Raises
    ValueError, naming the key, when the snapshot has no ``cov_in`` sums, names a group the model
    lacks, has a sum of the wrong shape, or lacks a count. Groups the snapshot did not measure
    (by default ``o_in`` and ``down_in``) are simply absent from the result.
    """
    outers = sorted(k for k in state if (p := keys.parse_state_key(k)) and p[0] == keys.COV_IN and p[3] == "sum_outer")
    if not outers:
        raise ValueError(f"--c-a {path}: no cov_in/L{{i}}/{{group}}/sum_outer tensors; pass an instrument snapshot "
                         "written by a run (RUN/instruments/step_N.safetensors or a checkpoint's "
                         "instruments.safetensors) with input-side roles enabled")
    cov, count = {}, {}
    for key in outers:
        _, layer, name, _ = keys.parse_state_key(key)
        group = keys.matrix_key(layer, name)
        if group not in group_dims:
            raise ValueError(f"--c-a {path}: {key} is for input group {group!r}, which this model does not have "
                             f"(its groups: {', '.join(sorted(group_dims))}); the snapshot was written for another "
                             "model")
        n = group_dims[group]
        if tuple(state[key].shape) != (n, n):
            raise ValueError(f"--c-a {path}: {key} has shape {tuple(state[key].shape)}, but this model's {group} is "
                             f"{n} wide, so C_a must be ({n}, {n}); the snapshot was written for another model")
        count_key = keys.state_key(keys.COV_IN, group, "count")
        if count_key not in state:
            raise ValueError(f"--c-a {path}: {key} has no {count_key}; the snapshot is incomplete")
        n_tokens = float(state[count_key])
        if n_tokens <= 0:
            raise ValueError(f"--c-a {path}: {count_key} is {n_tokens:g}: no tokens were counted for {group}")
        cov[group] = state[key].to(device=device, dtype=torch.float64) / n_tokens
        count[group] = int(n_tokens)
    return InputCovariances(cov, count, f"snapshot {path}")


def read_snapshot(path: str | Path) -> dict[str, Tensor]:
    """A ``*.safetensors`` instrument snapshot as a dict; clear errors for a missing or unreadable file."""

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--c-a {path}: no such file; pass an instrument snapshot "
                                "(RUN/instruments/step_N.safetensors)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"--c-a {path}: not a readable safetensors file ({err})") from err
