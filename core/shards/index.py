"""The format of a prepared directory: what its index.json pins (format version, token dtype, the
tokenizer's fingerprint, each split's shard files) and the check that a directory is whole before
anything reads it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "weightgeom-token-shards"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
SPLITS = ("train", "eval")


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
