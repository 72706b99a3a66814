"""Reading a prepared directory: one split as a memory-mapped token stream (`TokenShards`), and that
stream cut into fixed-length blocks (`PackedBlocks`), with RSS kept at one batch's pages."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import torch

from weightgeom.core.shards.index import read_index


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
