"""Corpora larger than memory: pre-tokenized, memory-mapped token shards with a document-level split.

A prepared directory holds::

    index.json           format version, dtype, tokenizer fingerprint, splits and their shard files, provenance
    train-00000.bin ...  the train split's token stream: raw little-endian uint16 (vocab <= 65536) or uint32
    eval-00000.bin ...   the eval split's token stream

Each split's stream is its documents in corpus order, each written as ``tokens + [eos]`` (the
packing `build_lm_blocks` used). Shard files cut a stream every ``shard_tokens`` tokens wherever
that falls; readers see one stream per split, so a block may cross a shard boundary (and, as
before, a document boundary). Blocks never mix the two splits.

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
keep RSS flat too (see `TokenShards`). Measured: benchmarks/bench_data.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from itertools import chain, count
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from weightgeom.core.processes import main_print
from weightgeom.core.text_sources import SourceFile, iter_documents, resolve_sources, source_list, source_signature

FORMAT = "weightgeom-token-shards"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
SPLITS = ("train", "eval")
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB per file at uint16
_WINDOW_CHARS = 16_000_000  # text per Dataset.map call: bounds prepare memory
_MIN_WINDOW_CHARS = 65_536  # smallest window when sized to reach max_tokens
_WINDOW_DOCS = 100_000
_ENCODE_BATCH = 256  # documents per tokenizer call: large enough for the Rust batch path
_SPLIT_CHUNK = 8_000_000  # tokens per read while splitting the stream into shards
_STREAM, _LENGTHS = "stream.tmp", "lengths.tmp"


# ---------------------------------------------------------------------------------------------
# Tokenizer fingerprint and dtype


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """What ties token ids to a tokenizer: vocab size, eos id and a SHA-256 of the token -> id map.

    Caveat: two tokenizers with the same vocabulary but different merges or normalizers share a
    fingerprint (their ids mean the same tokens, their segmentations may differ)."""
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()
    return {"vocab_size": len(tokenizer), "max_id": max(vocab.values(), default=-1),
            "eos_token_id": tokenizer.eos_token_id, "vocab_sha256": digest}


def _describe(fp: dict[str, Any]) -> str:
    return f"vocab_size={fp.get('vocab_size')}, eos_token_id={fp.get('eos_token_id')}, " \
           f"vocab sha256 {str(fp.get('vocab_sha256'))[:12]}"


def token_dtype(n_ids: int) -> np.dtype:
    """Little-endian uint16 when every id fits (``n_ids <= 65536``), else uint32."""
    if n_ids <= 1 << 16:
        return np.dtype("<u2")
    if n_ids <= 1 << 32:
        return np.dtype("<u4")
    raise ValueError(f"a vocabulary of {n_ids} ids does not fit uint32 token shards.")


# ---------------------------------------------------------------------------------------------
# Prepare


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
        if tmp.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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


# ---------------------------------------------------------------------------------------------
# Read


def is_prepared_corpus(path: str | Path) -> bool:
    """True for a directory with an index.json (whether it is intact is `read_index`'s question)."""
    return (Path(path) / INDEX_NAME).is_file()


def read_index(directory: str | Path) -> dict[str, Any]:
    """The validated index of a prepared directory; checks every shard file's size against it."""
    directory = Path(directory)
    redo = "prepare it again (harness prepare-data ... --out DIR into a new directory)"
    if not directory.is_dir():
        raise FileNotFoundError(f"prepared corpus {str(directory)!r} does not exist.")
    path = directory / INDEX_NAME
    if not path.is_file():
        raise ValueError(f"{directory} is not a prepared corpus: it has no {INDEX_NAME} (an interrupted prepare "
                         f"leaves none); {redo}.")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is corrupt ({err}); {redo}.") from err
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"{path} is not a token-shard index (no \"format\": {FORMAT!r}); {redo}.")
    if index.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {index.get('format_version')}, this harness reads "
                         f"{FORMAT_VERSION}; {redo}.")
    try:
        np.dtype(index["dtype"])
        for split in SPLITS:
            info = index["splits"][split]
            int(info["tokens"]), int(info["documents"])
            for shard in info["shards"]:
                file, tokens = directory / shard["file"], int(shard["tokens"])
                expected = tokens * np.dtype(index["dtype"]).itemsize
                if not file.is_file():
                    raise ValueError(f"{path}: shard {shard['file']} is missing (half-written or moved); {redo}.")
                if file.stat().st_size != expected:
                    raise ValueError(f"{path}: shard {shard['file']} has {file.stat().st_size} bytes, the index says "
                                     f"{expected} ({tokens} tokens); the directory is damaged; {redo}.")
            if sum(int(s["tokens"]) for s in info["shards"]) != int(info["tokens"]):
                raise ValueError(f"{path}: split {split!r} shard token counts do not add up; {redo}.")
        index["tokenizer"]["vocab_sha256"]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path} is corrupt (missing or malformed field {err}); {redo}.") from err
    return index


def check_tokenizer(index: dict[str, Any], tokenizer: Any, directory: str | Path) -> None:
    """Error unless `tokenizer` has the fingerprint the corpus was prepared with; names both."""
    mine, theirs = tokenizer_fingerprint(tokenizer), index["tokenizer"]
    keys = ("vocab_size", "eos_token_id", "vocab_sha256")
    if any(mine.get(k) != theirs.get(k) for k in keys):
        raise ValueError(
            f"{directory} was prepared with a different tokenizer ({_describe(theirs)}) than this run's "
            f"({_describe(mine)}). Use the tokenizer it was prepared with (tokenizer.source / tokenizer.vocab_size), "
            "or prepare the text again with this tokenizer.")


class TokenShards:
    """One split of a prepared corpus as a read-only token stream over `np.memmap` shard files.

    ``len()`` is the number of tokens (cut to `max_tokens` if given). Reads copy the tokens out,
    then drop the touched pages from this process's mapping (``MADV_DONTNEED``; the kernel's page
    cache keeps them, so a re-read costs no disk I/O). Without that, page-fault-around maps cached
    neighbours in with every block and a process that samples random blocks ends up with the
    whole file resident (measured: 399 MiB RSS after 200 random batches of a 400 MB shard), i.e.
    RSS growing with the corpus; with it, RSS stays at one batch's pages.
    """

    def __init__(self, directory: str | Path, split: str = "train", *, max_tokens: int | None = None) -> None:
        self.directory = Path(directory)
        self.index = read_index(self.directory)
        if split not in self.index["splits"]:
            raise ValueError(f"{directory}: no split {split!r}; it has {sorted(self.index['splits'])}.")
        self.split = split
        self.dtype = np.dtype(self.index["dtype"]).newbyteorder("<")
        info = self.index["splits"][split]
        self.n_documents = int(info["documents"])
        shards = [s for s in info["shards"] if int(s["tokens"]) > 0]  # an empty file cannot be mapped
        self._maps = [np.memmap(self.directory / s["file"], dtype=self.dtype, mode="r") for s in shards]
        self._starts = np.concatenate([[0], np.cumsum([len(m) for m in self._maps], dtype=np.int64)])
        total = int(self._starts[-1])
        self.n_tokens = total if max_tokens is None else min(total, max_tokens)
        self.total_tokens = total

    def __len__(self) -> int:
        return self.n_tokens

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as a new int64 array (across shard files if needed)."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.n_tokens}) of {self.split!r}.")
        out = np.empty(stop - start, dtype=np.int64)
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos, touched = start, []
        for s in range(max(first, 0), len(self._maps)):
            if pos >= stop:
                break
            lo = pos - int(self._starts[s])
            hi = min(stop, int(self._starts[s + 1])) - int(self._starts[s])
            out[pos - start: pos - start + hi - lo] = self._maps[s][lo:hi]
            touched.append(s)
            pos += hi - lo
        self._release(touched)
        return out

    def gather(self, starts: np.ndarray, length: int) -> np.ndarray:
        """int64 array (len(starts), length): row i = tokens [starts[i], starts[i] + length)."""
        starts = np.asarray(starts, dtype=np.int64)
        out = np.empty((starts.size, length), dtype=np.int64)
        if starts.size == 0:
            return out
        if int(starts.min()) < 0 or int(starts.max()) + length > self.n_tokens:
            raise IndexError(f"block out of range: tokens [0, {self.n_tokens}) of {self.split!r}.")
        shard = np.searchsorted(self._starts, starts, side="right") - 1
        local = starts - self._starts[shard]
        inside = local + length <= self._starts[shard + 1] - self._starts[shard]
        offsets = np.arange(length, dtype=np.int64)
        used = np.unique(shard[inside]).tolist()
        for s in used:
            rows = np.nonzero(inside & (shard == s))[0]
            out[rows] = self._maps[s][local[rows, None] + offsets]
        self._release(used)
        for row in np.nonzero(~inside)[0]:  # a block that crosses into the next shard file
            out[row] = self.read(int(starts[row]), int(starts[row]) + length)
        return out

    def _release(self, shard_ids: list[int]) -> None:
        """Unmap the pages read from these shards (the data was copied out; see the class docstring)."""
        for s in shard_ids:
            handle = getattr(self._maps[s], "_mmap", None)
            if handle is not None and hasattr(mmap, "MADV_DONTNEED"):
                handle.madvise(mmap.MADV_DONTNEED)


class PackedBlocks:
    """Fixed `seq_len` blocks of a split's stream: block i = tokens [i * seq_len, (i + 1) * seq_len).

    A drop-in for the (N, seq_len) LongTensor the CE trainer indexes: ``len()`` (N, the trailing
    partial block dropped), ``.shape``, ``.seq_len``, and ``blocks[idx]`` for a 1-D integer tensor,
    a slice or an int, returning a CPU LongTensor (B, seq_len). `order` (a permutation of N)
    relabels blocks (``blocks[i]`` is stored block ``order[i]``): the eval split uses a seeded one
    so that the first eval batches sample the whole held-out set rather than its first documents.
    """

    def __init__(self, tokens: TokenShards, seq_len: int, order: torch.Tensor | None = None) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}.")
        self.tokens, self.seq_len = tokens, seq_len
        self._n = len(tokens) // seq_len
        self._order = None
        if order is not None:
            order = torch.as_tensor(order).long()
            if order.shape != (self._n,):
                raise ValueError(f"order must be a permutation of {self._n} blocks, got shape {tuple(order.shape)}.")
            self._order = order.numpy()

    def __len__(self) -> int:
        return self._n

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self._n, self.seq_len))

    def __getitem__(self, key: int | slice | torch.Tensor) -> torch.Tensor:
        if isinstance(key, slice):
            idx = np.arange(*key.indices(self._n), dtype=np.int64)
        elif isinstance(key, int):
            if not -self._n <= key < self._n:
                raise IndexError(f"block {key} out of range for {self._n} blocks.")
            return self[torch.tensor([key % self._n])][0]
        else:
            key = torch.as_tensor(key)
            if key.dtype.is_floating_point or key.dtype == torch.bool or key.dim() != 1:
                raise TypeError(f"index blocks with a 1-D integer tensor, a slice or an int; got {key.dtype} "
                                f"of shape {tuple(key.shape)}.")
            idx = key.to(torch.int64).cpu().numpy()
            if idx.size and (int(idx.min()) < -self._n or int(idx.max()) >= self._n):
                raise IndexError(f"block index out of range for {self._n} blocks.")
            idx = np.where(idx < 0, idx + self._n, idx)
        if self._order is not None:
            idx = self._order[idx]
        if idx.size > 1 and self._order is None and np.all(np.diff(idx) == 1):  # contiguous: one read
            flat = self.tokens.read(int(idx[0]) * self.seq_len, (int(idx[-1]) + 1) * self.seq_len)
            return torch.from_numpy(flat.reshape(idx.size, self.seq_len))
        return torch.from_numpy(self.tokens.gather(idx * self.seq_len, self.seq_len))

    def __repr__(self) -> str:
        return (f"PackedBlocks({self.tokens.directory}, split={self.tokens.split!r}, blocks={self._n}, "
                f"seq_len={self.seq_len})")


# ---------------------------------------------------------------------------------------------
# Config entry point: prepared directory, or a cached prepare of the sources


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
