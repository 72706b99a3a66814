"""A recipe's corpus (``data.source``): a prepared directory read as it is, or any other source
prepared once into a cache keyed by everything that changes its tokens, and read from there."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from weightgeom.core.processes import main_print
from weightgeom.core.shards.index import (
    FORMAT_VERSION,
    SPLITS,
    check_tokenizer,
    is_prepared_corpus,
    read_index,
    tokenizer_fingerprint,
)
from weightgeom.core.shards.prepare import prepare_corpus
from weightgeom.core.shards.readers import PackedBlocks, TokenShards
from weightgeom.core.text_sources import resolve_sources, source_list, source_signature


def corpus_cache_key(sources: str | Sequence[str], tokenizer: Any, *, text_field: str, eval_fraction: float,
                     seed: int, max_tokens: int | None) -> str:
    """A name for the prepared form of `sources`: changes with the tokenizer, any source file's
    path, size or mtime, the text field, the split (eval_fraction, seed) and max_tokens."""
    key = {"format_version": FORMAT_VERSION, "tokenizer": tokenizer_fingerprint(tokenizer),
           "sources": [s if s == "stdlib" else str(Path(s).resolve()) for s in source_list(sources)],
           "files": source_signature(resolve_sources(sources)), "text_field": text_field,
           "eval_fraction": eval_fraction, "seed": seed, "max_tokens": max_tokens}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def prepare_cached(sources: str | Sequence[str], tokenizer: Any, cache_dir: str | Path, *, text_field: str = "text",
                   eval_fraction: float = 0.02, seed: int = 0, max_tokens: int | None = None,
                   num_proc: int | None = None, progress: bool = True) -> Path:
    """`cache_dir/corpus-<key>/`, prepared on first use (see `corpus_cache_key`) and reused after.

    Concurrent callers (torchrun ranks) may both prepare; the first rename wins and the others use
    it. A damaged entry is rebuilt."""
    final = Path(cache_dir).expanduser() / ("corpus-" + corpus_cache_key(
        sources, tokenizer, text_field=text_field, eval_fraction=eval_fraction, seed=seed, max_tokens=max_tokens))
    if is_prepared_corpus(final):
        try:
            read_index(final)
            return final
        except ValueError as err:
            print(f"[data] rebuilding the damaged cache entry {final}: {err}")
            shutil.rmtree(final)
    try:
        prepare_corpus(sources, tokenizer, final, text_field=text_field, eval_fraction=eval_fraction, seed=seed,
                       num_proc=num_proc, max_tokens=max_tokens, progress=progress)
    except FileExistsError:
        if not is_prepared_corpus(final):
            raise
    return final


def load_corpus(data_cfg: Any, tokenizer: Any, seed: int, cache_dir: str | Path, *,
                progress: bool = True, announce: bool = True) -> tuple[PackedBlocks, PackedBlocks]:
    """(train, eval) blocks of `seq_len` for a `DataConfig`-like `data_cfg` (source, text_field,
    seq_len, eval_fraction, max_tokens).

    - `data_cfg.source` a prepared directory (has index.json): read it; the tokenizer must match
      its fingerprint. Its split is the one it was prepared with; `max_tokens` keeps that share of
      each split's stream (the first tokens, so roughly the corpus' first `max_tokens`).
    - otherwise (`"stdlib"`, text files, directories): prepared once into `cache_dir` (see
      `prepare_cached`, with `seed` choosing the held-out documents) and read from there.
    Eval blocks come in a fixed order seeded by `seed` (see `PackedBlocks`). ``announce``: print the
    one-line summary (on the main process).
    """
    sources = source_list(data_cfg.source)
    seq_len = int(data_cfg.seq_len)
    if any(is_prepared_corpus(s) for s in sources):
        if len(sources) > 1:
            raise ValueError(f"data.source lists a prepared corpus among other sources {sources}; a prepared "
                             "directory must be the only source.")
        directory = Path(sources[0])
        index = read_index(directory)
        check_tokenizer(index, tokenizer, directory)
        if index["eval_fraction"] != data_cfg.eval_fraction:
            warnings.warn(f"data.eval_fraction={data_cfg.eval_fraction} does not apply to {directory}: it was split "
                          f"with eval_fraction={index['eval_fraction']} when prepared.", stacklevel=2)
        caps = _split_caps(index, data_cfg.max_tokens)
    else:
        directory = prepare_cached(sources, tokenizer, cache_dir, text_field=data_cfg.text_field,
                                   eval_fraction=data_cfg.eval_fraction, seed=seed, max_tokens=data_cfg.max_tokens,
                                   progress=progress)
        index, caps = read_index(directory), {split: None for split in SPLITS}
    train_tokens = TokenShards(directory, "train", max_tokens=caps["train"])
    eval_tokens = TokenShards(directory, "eval", max_tokens=caps["eval"])
    train = PackedBlocks(train_tokens, seq_len)
    if len(train) < 1:
        raise ValueError(f"corpus is too small for seq_len={seq_len}: the train split of {directory} has "
                         f"{len(train_tokens)} tokens, less than one block. Add text, raise max_tokens or lower "
                         "seq_len.")
    n_eval = len(eval_tokens) // seq_len
    if eval_tokens.n_documents and n_eval < 1:
        raise ValueError(f"corpus is too small for seq_len={seq_len}: the eval split of {directory} has "
                         f"{len(eval_tokens)} tokens ({eval_tokens.n_documents} documents), less than one block. "
                         "Raise eval_fraction or max_tokens, add text, lower seq_len, or set eval_fraction=0.")
    order = torch.randperm(n_eval, generator=torch.Generator().manual_seed(seed))
    evals = PackedBlocks(eval_tokens, seq_len, order=order)
    if caps["train"] is None:
        docs = (f" ({train_tokens.n_documents:,} docs)", f" ({eval_tokens.n_documents:,} held-out docs)", "")
    else:  # a prefix of each split: its document count is not in the index
        docs = ("", "", f"; cut to data.max_tokens={data_cfg.max_tokens:,} of {index['tokens']:,} tokens")
    if announce:
        main_print(f"[data] {directory}: train {len(train_tokens):,} tokens{docs[0]} = {len(train):,} blocks of "
                   f"{seq_len}, eval {len(eval_tokens):,} tokens{docs[1]} = {len(evals):,} blocks{docs[2]}")
    return train, evals


def _split_caps(index: dict[str, Any], max_tokens: int | None) -> dict[str, int | None]:
    """Per-split token caps that keep each split's share of `max_tokens` (None: no cap)."""
    total = int(index["tokens"])
    if max_tokens is None or max_tokens >= total:
        return {split: None for split in SPLITS}
    return {split: int(index["splits"][split]["tokens"]) * max_tokens // total for split in SPLITS}
