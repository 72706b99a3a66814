"""Corpora larger than memory: pre-tokenized, memory-mapped token shards with a document-level split.

A prepared directory holds::

    index.json           format version, dtype, tokenizer fingerprint, splits and their shard files, provenance
    train-00000.bin ...  the train split's token stream: raw little-endian uint16 (vocab <= 65536) or uint32
    eval-00000.bin ...   the eval split's token stream

Each split's stream is its documents in corpus order, each written as ``tokens + [eos]`` (the
packing `build_lm_blocks` used). Shard files cut a stream every ``shard_tokens`` tokens wherever
that falls; readers see one stream per split, so a block may cross a shard boundary (and, as
before, a document boundary). Blocks never mix the two splits.

The modules, by what each part is for:

- ``index``: the directory's format: the tokenizer fingerprint and token dtype it pins, and
  ``read_index``, which checks an index.json and its shard files before anything reads them.
- ``prepare``: the writer: text -> token shards with the held-out split by document
  (``prepare_corpus``), written to a temporary sibling and renamed into place.
- ``readers``: ``TokenShards`` (one split as a memory-mapped token stream) and ``PackedBlocks`` (its
  fixed-length blocks, as the CE trainer indexes them).
- ``corpus``: a recipe's corpus: ``load_corpus`` reads a prepared directory, or prepares ``data.source``
  once into a cache (``prepare_cached``) and reads that.

The names below are the package's API (``from weightgeom.core.shards import load_corpus``).
"""

from weightgeom.core.shards.corpus import corpus_cache_key, load_corpus, prepare_cached
from weightgeom.core.shards.index import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_NAME,
    SPLITS,
    check_tokenizer,
    is_prepared_corpus,
    read_index,
    token_dtype,
    tokenizer_fingerprint,
)
from weightgeom.core.shards.prepare import (
    DEFAULT_SHARD_TOKENS,
    prepare_corpus,
    remove_stale_temporaries,
    select_eval_documents,
)
from weightgeom.core.shards.readers import PackedBlocks, TokenShards

__all__ = [
    "DEFAULT_SHARD_TOKENS", "FORMAT", "FORMAT_VERSION", "INDEX_NAME", "SPLITS", "PackedBlocks", "TokenShards",
    "check_tokenizer", "corpus_cache_key", "is_prepared_corpus", "load_corpus", "prepare_cached", "prepare_corpus",
    "read_index", "remove_stale_temporaries", "select_eval_documents", "token_dtype", "tokenizer_fingerprint",
]
