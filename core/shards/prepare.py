"""Prepare: text -> token shards, with the held-out split by document.

Held-out split, by document: no document contributes tokens to both splits. The eval split takes
whole documents, drawn in a seeded random order (`torch.randperm`), until it holds at least
``ceil(eval_fraction * tokens)`` tokens; documents longer than that target stay in train (unless the
shorter ones cannot reach it) so that one long file cannot swamp the held-out set. With
``eval_fraction > 0`` at least one document is held out and at least one stays in train.

Memory: documents stream from disk in windows of about 16 M characters; each window goes through
`datasets.Dataset.map(batched=True, num_proc=...)` in memory (so `datasets` writes no cache
files, nothing under ~/.cache/huggingface) and its tokens are appended to a temporary stream file;
a second pass splits that file into the shards. Peak memory is set by the window and by one
document (a document is tokenized in one call), not by the corpus; the split holds per-document
metadata (lengths, offsets, a permutation: ~40 bytes per document). Disk: about twice the final
size while preparing. The output directory appears by an atomic rename of a temporary sibling
(files fsynced first), so an interrupted prepare never leaves a directory with an index. Readers
keep RSS flat too (see `weightgeom.core.shards.readers.TokenShards`). Measured: benchmarks/bench_data.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from itertools import chain, count
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from weightgeom.core.processes import pid_alive
from weightgeom.core.shards.index import FORMAT, FORMAT_VERSION, INDEX_NAME, SPLITS, token_dtype, tokenizer_fingerprint
from weightgeom.core.text_sources import SourceFile, iter_documents, resolve_sources, source_list

DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB per file at uint16
_WINDOW_CHARS = 16_000_000  # text per Dataset.map call: bounds prepare memory
_MIN_WINDOW_CHARS = 65_536  # smallest window when sized to reach max_tokens
_WINDOW_DOCS = 100_000
_ENCODE_BATCH = 256  # documents per tokenizer call: large enough for the Rust batch path
_SPLIT_CHUNK = 8_000_000  # tokens per read while splitting the stream into shards
_STREAM, _LENGTHS = "stream.tmp", "lengths.tmp"


def prepare_corpus(
    sources: str | Sequence[str],
    tokenizer: Any,
    out_dir: str | Path,
    *,
    text_field: str = "text",
    eval_fraction: float = 0.02,
    seed: int = 0,
    num_proc: int | None = None,
    max_tokens: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = True,
) -> Path:
    """Tokenize `sources` (see `weightgeom.core.text_sources`) into token shards under `out_dir`; returns it.

    `max_tokens` caps the tokens read (documents in order, each with its eos; the last one read
    may be cut), as `data.max_tokens` always did. `num_proc` > 1 tokenizes each window in that
    many processes; the shards are byte-identical to `num_proc=1`. `out_dir` must not exist or be
    empty. Raises FileNotFoundError / ValueError for bad sources, FileExistsError for `out_dir`.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}.")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 (or None for all), got {max_tokens}.")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}.")
    if num_proc is not None and num_proc < 1:
        raise ValueError(f"num_proc must be >= 1 (or None for one process), got {num_proc}.")
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos token; documents are joined with eos. Set tokenizer.eos_token.")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not an empty directory; remove it or choose "
                              "another output directory.")
    names = source_list(sources)
    files = resolve_sources(names)
    fingerprint = tokenizer_fingerprint(tokenizer)
    dtype = token_dtype(max(fingerprint["vocab_size"], fingerprint["max_id"] + 1))
    started = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
    try:
        n_tokens, n_docs, capped = _tokenize_to_stream(files, tokenizer, tmp, text_field=text_field, dtype=dtype,
                                                       num_proc=num_proc, max_tokens=max_tokens, progress=progress)
        if n_docs == 0:
            raise ValueError(f"corpus {names} holds no non-empty text; check the files and text_field={text_field!r}.")
        lengths = np.fromfile(tmp / _LENGTHS, dtype=np.int64)
        is_eval = select_eval_documents(lengths, eval_fraction, seed)
        splits = _write_splits(tmp, lengths, is_eval, dtype, shard_tokens, progress)
        (tmp / _STREAM).unlink()
        (tmp / _LENGTHS).unlink()
        index = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "dtype": dtype.name, "byte_order": "little",
            "tokenizer": fingerprint, "sources": names, "files": len(files), "text_field": text_field,
            "eval_fraction": eval_fraction, "seed": seed, "max_tokens": max_tokens, "capped": capped,
            "shard_tokens": shard_tokens, "tokens": n_tokens, "documents": n_docs, "splits": splits,
            "prepare_seconds": round(time.perf_counter() - started, 3),
        }
        with (tmp / INDEX_NAME).open("w") as fh:  # written last, inside tmp
            fh.write(json.dumps(index, indent=1) + "\n")
            _sync(fh)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private (0700); a corpus is ordinary data
        try:
            tmp.rename(out_dir)  # atomic; also replaces an empty out_dir
        except OSError as err:
            raise FileExistsError(f"{out_dir} appeared while preparing; remove it or choose another "
                                  f"output directory ({err}).") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def remove_stale_temporaries(out_dir: Path) -> list[Path]:
    """Remove ``.NAME.tmp-PID-*`` beside ``out_dir`` left by a prepare whose process is gone (killed);
    one whose process still runs (a concurrent prepare) is kept. Returns what was removed."""
    removed = []
    for tmp in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if tmp.is_dir() and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tokenize_to_stream(files: list[SourceFile], tokenizer: Any, tmp: Path, *, text_field: str, dtype: np.dtype,
                        num_proc: int | None, max_tokens: int | None, progress: bool) -> tuple[int, int, bool]:
    """Pass 1: every document's `tokens + [eos]` appended to tmp/stream.tmp, its length to
    tmp/lengths.tmp (int64), stopping at `max_tokens`. Returns (tokens, documents, capped)."""
    eos = int(tokenizer.eos_token_id)
    written = n_docs = chars_done = tokens_done = 0
    capped = False
    bar = tqdm(total=sum(f.size for f in files), unit="B", unit_scale=True, desc="prepare: tokenize",
               disable=None if progress else True, dynamic_ncols=True)
    docs = iter_documents(files, text_field, on_bytes=bar.update)
    try:
        with (tmp / _STREAM).open("wb") as stream, (tmp / _LENGTHS).open("wb") as lengths_out:
            for window_idx in count():
                budget = _WINDOW_CHARS
                if max_tokens is not None:  # size the window to the tokens still wanted (+10%)
                    per_token = chars_done / tokens_done if tokens_done else 4.0
                    wanted = math.ceil(1.1 * per_token * (max_tokens - written))
                    budget = min(_WINDOW_CHARS, max(_MIN_WINDOW_CHARS, wanted))
                window, n_chars = [], 0
                for text in docs:
                    window.append(text)
                    n_chars += len(text)
                    if n_chars >= budget or len(window) >= _WINDOW_DOCS:
                        break
                if not window:
                    break
                for tokens, lengths in _encode_window(window, tokenizer, eos, dtype, num_proc, window_idx):
                    tokens_done += tokens.size
                    if max_tokens is not None and written + tokens.size >= max_tokens:
                        tokens, lengths = _cut(tokens, lengths, max_tokens - written)
                        capped = True
                    stream.write(tokens.tobytes())
                    lengths_out.write(lengths.tobytes())
                    written += tokens.size
                    n_docs += lengths.size
                    if capped:
                        break
                chars_done += n_chars
                bar.set_postfix(tokens=f"{written:,}", refresh=False)
                if capped:
                    break
    finally:
        docs.close()
        bar.close()
    return written, n_docs, capped


def _cut(tokens: np.ndarray, lengths: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `keep` tokens of a batch and their document lengths (the last document maybe cut)."""
    ends = np.cumsum(lengths)
    full = int(np.searchsorted(ends, keep, side="right"))  # documents that end within `keep`
    kept = int(ends[full - 1]) if full else 0
    new_lengths = lengths[:full] if kept == keep else np.append(lengths[:full], keep - kept)
    return tokens[:keep], new_lengths.astype(np.int64)


def _encode_window(texts: list[str], tokenizer: Any, eos: int, dtype: np.dtype, num_proc: int | None,
                   window_idx: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Tokenize one window with `Dataset.map` (in memory); yield (flat tokens, document lengths) batches in order."""

    procs = min(num_proc or 1, len(texts))
    features = datasets.Features({"tokens": datasets.List(datasets.Value(dtype.name)),
                                  "lengths": datasets.List(datasets.Value("int64"))})
    bars_were_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # our own bar covers the whole corpus, not one bar per window
    try:
        mapped = datasets.Dataset.from_dict({"text": texts}).map(
            _encode_batch, batched=True, batch_size=_ENCODE_BATCH, num_proc=procs if procs > 1 else None,
            remove_columns=["text"], features=features, new_fingerprint=f"weightgeom-shards-{window_idx}",
            fn_kwargs={"tokenizer": tokenizer, "eos_id": eos, "dtype": dtype.str})
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()
    for batch in mapped.data.table.to_batches():
        tokens = batch.column("tokens").flatten().to_numpy(zero_copy_only=False)
        lengths = batch.column("lengths").flatten().to_numpy(zero_copy_only=False)
        yield tokens.astype(dtype, copy=False), lengths.astype(np.int64, copy=False)


def _encode_batch(batch: dict[str, list], tokenizer: Any, eos_id: int, dtype: str) -> dict[str, list]:
    """`Dataset.map` function: a batch of documents -> one row holding their concatenated
    `tokens + [eos]` and their lengths (one row per batch keeps Arrow overhead off each document)."""
    ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False, return_attention_mask=False,
                    return_token_type_ids=False)["input_ids"]
    lengths = np.fromiter((len(doc) + 1 for doc in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(chain(doc, (eos_id,)) for doc in ids), dtype=np.int64,
                       count=int(lengths.sum()))
    limit = np.iinfo(np.dtype(dtype)).max
    if flat.size and (int(flat.max()) > limit or int(flat.min()) < 0):
        bad = int(flat.max()) if int(flat.max()) > limit else int(flat.min())
        raise ValueError(f"token id {bad} does not fit the shards' dtype {np.dtype(dtype).name} (ids 0..{limit}): "
                         f"the tokenizer reports {len(tokenizer)} tokens but produced a larger id.")
    return {"tokens": [flat.astype(dtype)], "lengths": [lengths]}


def select_eval_documents(lengths: np.ndarray, eval_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask (n_docs,): the held-out documents, given each document's token count.

    Target ``T = ceil(eval_fraction * sum(lengths))`` tokens. Documents no longer than T are
    visited in `torch.randperm(n_docs)` order (generator seeded with `seed`) and taken until the
    eval tokens reach T, so eval holds between T and 2T tokens and no single long document swamps
    it. If the short documents run out first, longer ones follow, shortest first. At most
    n_docs - 1 documents are held out. Pure: depends only on (lengths, eval_fraction, seed).
    """
    n = len(lengths)
    mask = np.zeros(n, dtype=bool)
    if eval_fraction <= 0:
        return mask
    if n < 2:
        raise ValueError(f"the corpus has {n} document(s); a held-out split by document needs at least 2. "
                         "Add documents or set eval_fraction to 0.")
    target = math.ceil(eval_fraction * int(lengths.sum()))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    is_short = lengths[perm] <= target
    long_docs = perm[~is_short]
    order = np.concatenate([perm[is_short], long_docs[np.argsort(lengths[long_docs], kind="stable")]])
    reached = np.cumsum(lengths[order]) >= target
    take = int(np.argmax(reached)) + 1 if reached.any() else n
    mask[order[: min(take, n - 1)]] = True
    return mask


def _write_splits(tmp: Path, lengths: np.ndarray, is_eval: np.ndarray, dtype: np.dtype, shard_tokens: int,
                  progress: bool) -> dict[str, dict]:
    """Pass 2: read tmp/stream.tmp in chunks and route each document's tokens to its split's shards."""
    writers = {split: _ShardWriter(tmp, split, dtype, shard_tokens) for split in SPLITS}
    ends = np.cumsum(lengths)
    starts = ends - lengths
    total = int(ends[-1])
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="prepare: write shards",
               disable=None if progress else True, dynamic_ncols=True)
    try:
        with (tmp / _STREAM).open("rb") as stream:
            for a in range(0, total, _SPLIT_CHUNK):
                b = min(a + _SPLIT_CHUNK, total)
                chunk = np.fromfile(stream, dtype=dtype, count=b - a)
                d0 = int(np.searchsorted(ends, a, side="right"))  # first document that ends after a
                d1 = int(np.searchsorted(starts, b, side="left"))  # documents starting before b
                held = is_eval[d0:d1]
                if not held.any():
                    writers["train"].write(chunk)
                else:
                    span = np.minimum(ends[d0:d1], b) - np.maximum(starts[d0:d1], a)
                    token_held = np.repeat(held, span)
                    writers["train"].write(chunk[~token_held])
                    writers["eval"].write(chunk[token_held])
                bar.update(b - a)
    finally:
        bar.close()
        shards = {split: w.close() for split, w in writers.items()}
    counts = {"train": int((~is_eval).sum()), "eval": int(is_eval.sum())}
    return {split: {"tokens": sum(s["tokens"] for s in shards[split]), "documents": counts[split],
                    "shards": shards[split]} for split in SPLITS}


class _ShardWriter:
    """Appends tokens to `{split}-{i:05d}.bin` files of `shard_tokens` tokens each (the last may be shorter)."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._fh = None

    def write(self, tokens: np.ndarray) -> None:
        pos = 0
        while pos < tokens.size:
            if self._fh is None:
                name = f"{self.split}-{len(self.shards):05d}.bin"
                self._fh = (self.directory / name).open("wb")
                self.shards.append({"file": name, "tokens": 0})
            shard = self.shards[-1]
            take = min(self.shard_tokens - shard["tokens"], tokens.size - pos)
            self._fh.write(np.ascontiguousarray(tokens[pos:pos + take], dtype=self.dtype).tobytes())
            shard["tokens"] += take
            pos += take
            if shard["tokens"] == self.shard_tokens:
                self._finish()

    def close(self) -> list[dict[str, Any]]:
        if self._fh is not None:
            self._finish()
        return self.shards

    def _finish(self) -> None:
        _sync(self._fh)
        self._fh.close()
        self._fh = None


def _sync(fh: Any) -> None:
    """Flush `fh` to disk, so that the directory's rename never makes visible an index whose files are not."""
    fh.flush()
    os.fsync(fh.fileno())
