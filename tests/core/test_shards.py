"""Token shards: content equals direct tokenization, document-level split, reader, cache, errors, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset

import weightgeom.core.shards as shards
import weightgeom.core.shards.corpus as shard_corpus
import weightgeom.core.shards.prepare as shard_prepare
from tests.conftest import REPO
from weightgeom.core.config import load_config
from weightgeom.core.data import _epoch_permutation, _epoch_seed, batch_indices, load_texts
from weightgeom.core.shards import (
    PackedBlocks,
    TokenShards,
    load_corpus,
    prepare_cached,
    prepare_corpus,
    read_index,
    select_eval_documents,
    tokenizer_fingerprint,
)
from weightgeom.core.stage_inputs import corpus_cache
from weightgeom.core.tokenizer import train_stdlib_tokenizer

WORDS = ["alpha", "beta", "gamma", "delta", "import", "return", "yield", "lambda", "class", "def", "self", "value"]


@pytest.fixture(scope="module")
def tok_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tok")


@pytest.fixture(scope="module")
def tokenizer(tok_cache):
    return train_stdlib_tokenizer(400, tok_cache, max_bytes=200_000)


def make_docs(n: int, seed: int = 0) -> list[str]:
    """`n` distinct documents of varied length (each starts with its own id)."""
    rng = np.random.default_rng(seed)
    return [f"doc{i}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(3, 60)))) + "\n" for i in range(n)]


def write_corpus(root: Path, docs: list[str]) -> Path:
    """The documents spread over every format, in a directory read in path order."""
    root.mkdir(parents=True, exist_ok=True)
    q = len(docs) // 4
    for i, doc in enumerate(docs[:q]):
        (root / f"a{i:04d}.txt").write_text(doc)
    (root / "b.jsonl").write_text("".join(json.dumps({"text": d, "n": 1}) + "\n" for d in docs[q:2 * q]))
    (root / "c.json").write_text(json.dumps([{"text": d} for d in docs[2 * q:3 * q]]))
    Dataset.from_list([{"text": d} for d in docs[3 * q:]]).to_parquet(str(root / "d.parquet"))
    return root


def encode(tokenizer, docs: list[str]) -> list[list[int]]:
    return [tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for d in docs]


def split_docs(stream: np.ndarray, eos: int) -> list[list[int]]:
    """A split's stream back into documents (each ends with eos)."""
    out, cur = [], []
    for t in stream.tolist():
        cur.append(t)
        if t == eos:
            out.append(cur)
            cur = []
    assert not cur, "a split's stream must end with a document's eos"
    return out


def stream_of(directory: Path, split: str) -> np.ndarray:
    s = TokenShards(directory, split)
    return s.read(0, len(s))


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.bin"))}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    docs = make_docs(80)
    return write_corpus(tmp_path_factory.mktemp("corpus") / "text", docs), docs


# --- content and split -----------------------------------------------------------------------


def test_tokens_equal_direct_tokenization(tokenizer, corpus, tmp_path):
    root, docs = corpus
    assert load_texts(str(root)) == docs  # the reference reader sees the same documents in the same order
    out = prepare_corpus(str(root), tokenizer, tmp_path / "all", eval_fraction=0.0, progress=False)
    expected = [t for doc in encode(tokenizer, docs) for t in doc]
    assert stream_of(out, "train").tolist() == expected
    assert len(TokenShards(out, "eval")) == 0
    index = read_index(out)
    assert index["documents"] == index["splits"]["train"]["documents"] == len(docs)
    assert index["tokens"] == len(expected) and index["dtype"] == "uint16"
    assert index["tokenizer"] == tokenizer_fingerprint(tokenizer)
    assert not list(out.glob("*.tmp")) and not list(tmp_path.glob(".all.tmp-*"))  # temporaries removed


def test_stdlib_source_matches_load_texts(tokenizer, tmp_path):
    out = prepare_corpus("stdlib", tokenizer, tmp_path / "std", eval_fraction=0.0, max_tokens=30_000, progress=False)
    expected = [t for doc in encode(tokenizer, load_texts("stdlib", max_docs=60)) for t in doc][:30_000]
    assert stream_of(out, "train").tolist() == expected


def test_split_is_by_document_and_keeps_order(tokenizer, corpus, tmp_path):
    root, docs = corpus
    out = prepare_corpus(str(root), tokenizer, tmp_path / "s", eval_fraction=0.2, seed=3, progress=False)
    eos = tokenizer.eos_token_id
    train, held = split_docs(stream_of(out, "train"), eos), split_docs(stream_of(out, "eval"), eos)
    reference = encode(tokenizer, docs)
    position = {tuple(d): i for i, d in enumerate(reference)}
    assert len(position) == len(docs)  # documents are distinct, so tokens identify them
    train_ids, eval_ids = [position[tuple(d)] for d in train], [position[tuple(d)] for d in held]
    assert not set(train_ids) & set(eval_ids)  # no document in both splits
    assert sorted(train_ids + eval_ids) == list(range(len(docs)))  # every document in one split
    assert train_ids == sorted(train_ids) and eval_ids == sorted(eval_ids)  # corpus order within a split
    target = np.ceil(0.2 * sum(map(len, reference)))
    assert target <= sum(len(d) for d in held) < 2 * target
    index = read_index(out)
    assert index["splits"]["eval"]["documents"] == len(held) and index["splits"]["train"]["documents"] == len(train)


def test_split_reproducible_from_seed(tokenizer, corpus, tmp_path):
    root, _ = corpus
    a = prepare_corpus(str(root), tokenizer, tmp_path / "a", eval_fraction=0.2, seed=1, progress=False)
    b = prepare_corpus(str(root), tokenizer, tmp_path / "b", eval_fraction=0.2, seed=1, progress=False)
    c = prepare_corpus(str(root), tokenizer, tmp_path / "c", eval_fraction=0.2, seed=2, progress=False)
    assert shard_bytes(a) == shard_bytes(b)
    assert stream_of(a, "eval").tolist() != stream_of(c, "eval").tolist()


def test_select_eval_documents_rules():
    lengths = np.array([5, 50, 7, 400, 12, 9, 30, 8, 11, 6])
    state = torch.get_rng_state()
    mask = select_eval_documents(lengths, 0.1, seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    target = np.ceil(0.1 * lengths.sum())
    assert target <= lengths[mask].sum() < 2 * target and not mask[3]  # the 400-token document stays in train
    assert np.array_equal(mask, select_eval_documents(lengths, 0.1, seed=0))
    assert not select_eval_documents(lengths, 0.0, seed=0).any()
    # Short documents cannot reach the target: the shortest long one follows; never all documents.
    assert select_eval_documents(np.array([100, 100, 100]), 0.01, seed=0).sum() == 1
    assert select_eval_documents(np.array([5, 300, 4, 90]), 0.05, seed=0).tolist() == [True, False, True, True]
    assert select_eval_documents(np.array([5, 281, 4]), 0.05, seed=0).tolist() == [True, False, True]
    assert select_eval_documents(np.array([1, 1]), 0.99, seed=0).sum() == 1
    with pytest.raises(ValueError, match="needs at least 2"):
        select_eval_documents(np.array([10]), 0.1, seed=0)


def test_num_proc_2_gives_identical_shards(tokenizer, corpus, tmp_path):
    root, _ = corpus
    one = prepare_corpus(str(root), tokenizer, tmp_path / "p1", eval_fraction=0.1, num_proc=1, progress=False)
    two = prepare_corpus(str(root), tokenizer, tmp_path / "p2", eval_fraction=0.1, num_proc=2, progress=False)
    assert shard_bytes(one) and shard_bytes(one) == shard_bytes(two)
    i1, i2 = read_index(one), read_index(two)
    i1.pop("prepare_seconds"), i2.pop("prepare_seconds")
    assert i1 == i2


def test_windows_and_max_tokens_cap(tokenizer, corpus, tmp_path, monkeypatch):
    root, docs = corpus
    monkeypatch.setattr(shard_prepare, "_WINDOW_CHARS", 500)  # many windows, as for a large corpus
    monkeypatch.setattr(shard_prepare, "_MIN_WINDOW_CHARS", 100)
    expected = [t for doc in encode(tokenizer, docs) for t in doc]
    full = prepare_corpus(str(root), tokenizer, tmp_path / "full", eval_fraction=0.0, progress=False)
    assert stream_of(full, "train").tolist() == expected
    cap = len(expected) // 3 + 5  # cuts a document in the middle (checked below)
    out = prepare_corpus(str(root), tokenizer, tmp_path / "cap", eval_fraction=0.0, max_tokens=cap, progress=False)
    assert stream_of(out, "train").tolist() == expected[:cap]
    index = read_index(out)
    assert index["tokens"] == cap and index["capped"] and index["max_tokens"] == cap
    assert expected[cap - 1] != tokenizer.eos_token_id  # the last document read was cut
    assert index["documents"] == expected[:cap].count(tokenizer.eos_token_id) + 1
    split = prepare_corpus(str(root), tokenizer, tmp_path / "capsplit", eval_fraction=0.2, max_tokens=cap,
                           progress=False)
    assert len(TokenShards(split, "train")) + len(TokenShards(split, "eval")) == cap


def test_uint16_or_uint32_by_vocabulary(tokenizer, tok_cache, tmp_path):
    doc = tmp_path / "d.txt"
    doc.write_text("alpha <x70000> beta\n")
    small = prepare_corpus(str(doc), tokenizer, tmp_path / "u16", eval_fraction=0.0, progress=False)
    assert read_index(small)["dtype"] == "uint16"
    assert (small / "train-00000.bin").stat().st_size == 2 * len(TokenShards(small, "train"))
    big_tok = train_stdlib_tokenizer(400, tok_cache, max_bytes=200_000)
    big_tok.add_tokens([f"<x{i}>" for i in range(70_001)])  # ids up to 70,400: past uint16
    big = prepare_corpus(str(doc), big_tok, tmp_path / "u32", eval_fraction=0.0, progress=False)
    assert read_index(big)["dtype"] == "uint32"
    stream = stream_of(big, "train").tolist()
    assert stream == encode(big_tok, [doc.read_text()])[0] and max(stream) > 65_535
    assert (big / "train-00000.bin").stat().st_size == 4 * len(stream)


# --- reader ----------------------------------------------------------------------------------


def test_blocks_are_slices_of_the_stream_across_shards(tokenizer, corpus, tmp_path):
    root, _ = corpus
    out = prepare_corpus(str(root), tokenizer, tmp_path / "sh", eval_fraction=0.1, shard_tokens=100, progress=False)
    index = read_index(out)
    assert len(index["splits"]["train"]["shards"]) > 3
    assert all(s["tokens"] == 100 for s in index["splits"]["train"]["shards"][:-1])
    stream = torch.from_numpy(stream_of(out, "train"))
    seq = 24  # not a divisor of 100: many blocks cross a shard file boundary
    blocks = PackedBlocks(TokenShards(out, "train"), seq)
    n = stream.numel() // seq
    expected = stream[: n * seq].view(n, seq)
    assert len(blocks) == n and blocks.shape == (n, seq) and blocks.seq_len == seq
    every = blocks[torch.arange(n)]
    assert every.dtype == torch.long and torch.equal(every, expected)
    idx = torch.tensor([n - 1, 0, 4, 4, 13])
    assert torch.equal(blocks[idx], expected[idx])
    assert torch.equal(blocks[idx[1::2]], expected[idx[1::2]])  # strided views, as idx[rank::world]
    assert torch.equal(blocks[3:9], expected[3:9]) and torch.equal(blocks[5:40:7], expected[5:40:7])
    assert torch.equal(blocks[-1], expected[-1]) and blocks[torch.tensor([], dtype=torch.long)].shape == (0, seq)
    assert torch.equal(blocks[torch.tensor([-2])], expected[[-2]])
    with pytest.raises(IndexError):
        blocks[torch.tensor([n])]
    with pytest.raises(TypeError):
        blocks[torch.tensor([0.0])]
    # A trainer step as trainers/ce.py takes it.
    step_idx = batch_indices(len(blocks), 8, step=3, seed=0)
    assert torch.equal(blocks[step_idx], expected[step_idx])
    # An order relabels blocks: blocks[i] is stored block order[i].
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    shuffled = PackedBlocks(TokenShards(out, "train"), seq, order=order)
    assert torch.equal(shuffled[0:5], expected[order[:5]])
    assert torch.equal(shuffled[torch.tensor([2])], expected[order[[2]]])


def _rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads RssFile from /proc (Linux)")
def test_random_block_reads_do_not_keep_the_file_resident(tmp_path):
    """200 random batches over a 64 MB shard: the pages read are dropped from the mapping again, so
    file-backed RSS does not grow towards the file's size (it does without the release)."""
    n_tokens = 32 * 2**20
    np.random.default_rng(0).integers(0, 4096, n_tokens, dtype=np.uint16).tofile(tmp_path / "train-00000.bin")
    index = {"format": shards.FORMAT, "format_version": shards.FORMAT_VERSION, "dtype": "uint16",
             "tokenizer": {"vocab_size": 4096, "eos_token_id": 1, "vocab_sha256": "x"}, "tokens": n_tokens,
             "splits": {"train": {"tokens": n_tokens, "documents": 1,
                                  "shards": [{"file": "train-00000.bin", "tokens": n_tokens}]},
                        "eval": {"tokens": 0, "documents": 0, "shards": []}}}
    (tmp_path / "index.json").write_text(json.dumps(index))
    blocks = PackedBlocks(TokenShards(tmp_path, "train"), 128)
    before = _rss_file_kb()
    for step in range(200):
        blocks[batch_indices(len(blocks), 16, step, seed=0)]
    blocks[0:1000]  # a contiguous read, as evaluate() does
    assert _rss_file_kb() - before < 8 * 1024


def test_batch_indices_at_1_5m_blocks_match_a_fresh_permutation():
    n = 1_500_000

    _epoch_permutation.cache_clear()
    fresh = torch.randperm(n, generator=torch.Generator().manual_seed(_epoch_seed(5, 0)))
    assert torch.equal(batch_indices(n, 16, 2, seed=5), fresh[32:48])
    again = batch_indices(n, 16, 2, seed=5)
    again[:] = -1  # the caller's copy: mutating it must not touch the cached permutation
    assert torch.equal(batch_indices(n, 16, 2, seed=5), fresh[32:48])
    assert batch_indices(n, 16, 2, seed=5).dtype == torch.long
    assert _epoch_permutation.cache_info().misses == 1  # one draw served every step of the epoch


# --- load_corpus and its cache ---------------------------------------------------------------


def data_cfg(source, **kw):
    base = {"source": source, "text_field": "text", "seq_len": 16, "eval_fraction": 0.1, "max_tokens": None}
    return SimpleNamespace(**{**base, **kw})


def test_load_corpus_caches_and_invalidates(tokenizer, corpus, tmp_path, monkeypatch):
    root, docs = corpus
    src = tmp_path / "src"
    write_corpus(src, docs)
    cache = tmp_path / "cache"
    train, held = load_corpus(data_cfg(str(src)), tokenizer, seed=0, cache_dir=cache)
    (entry,) = cache.iterdir()
    assert entry.name.startswith("corpus-") and len(held) > 0 and len(train) > len(held)
    calls = []
    monkeypatch.setattr(shard_corpus, "prepare_corpus", lambda *a, **k: calls.append(a))
    again, _ = load_corpus(data_cfg(str(src)), tokenizer, seed=0, cache_dir=cache)
    assert calls == [] and torch.equal(again[0:len(again)], train[0:len(train)])  # reused, not prepared again
    monkeypatch.undo()
    (src / "b.jsonl").write_text(json.dumps({"text": "a new document\n"}) + "\n")
    changed, _ = load_corpus(data_cfg(str(src)), tokenizer, seed=0, cache_dir=cache)
    assert len(list(cache.iterdir())) == 2 and len(changed) < len(train)  # the source changed: prepared anew
    load_corpus(data_cfg(str(src)), tokenizer, seed=1, cache_dir=cache)  # another split seed: another entry
    load_corpus(data_cfg(str(src), max_tokens=500), tokenizer, seed=1, cache_dir=cache)
    assert len(list(cache.iterdir())) == 4


def test_load_corpus_reads_a_prepared_directory(tokenizer, corpus, tmp_path):
    root, _ = corpus
    out = prepare_corpus(str(root), tokenizer, tmp_path / "prep", eval_fraction=0.2, seed=4, progress=False)
    train, held = load_corpus(data_cfg(str(out), eval_fraction=0.2), tokenizer, seed=7, cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()  # read in place, nothing cached
    stream = torch.from_numpy(stream_of(out, "eval"))
    n = len(held)
    assert n == stream.numel() // 16
    order = torch.randperm(n, generator=torch.Generator().manual_seed(7))
    assert torch.equal(held[0:n], stream[: n * 16].view(n, 16)[order])  # eval blocks in a seeded order
    # data.max_tokens keeps each split's share of the cap.
    index = read_index(out)
    cut_train, cut_held = load_corpus(data_cfg(str(out), eval_fraction=0.2, max_tokens=400), tokenizer, seed=7,
                                      cache_dir=tmp_path / "c")
    assert len(cut_train.tokens) == index["splits"]["train"]["tokens"] * 400 // index["tokens"]
    assert len(cut_train.tokens) + len(cut_held.tokens) <= 400
    with pytest.warns(UserWarning, match="eval_fraction=0.2 when prepared"):
        load_corpus(data_cfg(str(out), eval_fraction=0.05), tokenizer, seed=7, cache_dir=tmp_path / "c")


def test_pretraining_reads_the_corpus_through_shards(tokenizer, tok_cache, tmp_path):
    cfg = load_config(REPO / "recipes" / "ce_tiny.yaml", [f"tokenizer.cache_dir={tmp_path}", "data.seq_len=32",
                                                            "data.max_tokens=20000"])
    train, held = load_corpus(cfg.data, tokenizer, cfg.seed, corpus_cache(cfg))
    assert isinstance(train, PackedBlocks) and train.shape[1] == 32 and len(held) > 0
    (entry,) = (tmp_path / "corpora").iterdir()
    index = read_index(entry)
    assert index["sources"] == ["stdlib"] and index["tokens"] == 20_000 and index["seed"] == cfg.seed
    assert index["splits"]["eval"]["documents"] >= 1


# --- atomic output ---------------------------------------------------------------------------


def test_interrupted_prepare_leaves_nothing_that_looks_prepared(tokenizer, corpus, tmp_path, monkeypatch):
    root, _ = corpus
    out = tmp_path / "out"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as if killed while writing shards

    monkeypatch.setattr(shard_prepare, "_write_splits", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(str(root), tokenizer, out, progress=False)
    assert not out.exists() and not list(tmp_path.iterdir())  # the temporary directory is removed too
    # A kill leaves the temporary directory behind (no cleanup runs): simulate it.
    monkeypatch.setattr(shard_prepare.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(str(root), tokenizer, out, progress=False)
    (leftover,) = tmp_path.iterdir()
    assert leftover.name.startswith(".out.tmp-") and not out.exists()
    with pytest.raises(ValueError, match="not a prepared corpus: it has no index.json"):
        read_index(leftover)
    monkeypatch.undo()
    # Killed after the index was written but before the rename: the cache still prepares anew.
    monkeypatch.setattr(shard_prepare.shutil, "rmtree", lambda *a, **k: None)
    monkeypatch.setattr(Path, "rename", lambda self, target: (_ for _ in ()).throw(KeyboardInterrupt()))
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        prepare_cached(str(root), tokenizer, cache, progress=False)
    assert [p.name.startswith(".corpus-") for p in cache.iterdir()] == [True]
    monkeypatch.undo()
    final = prepare_cached(str(root), tokenizer, cache, progress=False)
    assert final.name.startswith("corpus-") and read_index(final)["documents"] == 80


# --- errors ----------------------------------------------------------------------------------


def test_source_errors(tokenizer, tmp_path):
    def prep(source, **kw):
        return prepare_corpus(source, tokenizer, tmp_path / "out", progress=False, **kw)

    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        prep(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"unknown extension '\.csv'"):
        prep(str(tmp_path / "x.csv"))
    (tmp_path / "f.jsonl").write_text(json.dumps({"content": "hi", "id": 3}) + "\n")
    with pytest.raises(ValueError, match=r"f.jsonl: no column 'text'; available columns: \['content', 'id'\]"):
        prep(str(tmp_path / "f.jsonl"))
    Dataset.from_list([{"body": "x", "k": 1}]).to_parquet(str(tmp_path / "p.parquet"))
    with pytest.raises(ValueError, match=r"p.parquet: no column 'text'; available columns: \['body', 'k'\]"):
        prep(str(tmp_path / "p.parquet"))
    Dataset.from_list([{"text": 1}]).to_parquet(str(tmp_path / "n.parquet"))
    with pytest.raises(ValueError, match="column 'text' has type int64, expected strings"):
        prep(str(tmp_path / "n.parquet"))
    (tmp_path / "n.jsonl").write_text('{"text": "ok"}\n{"text": 5}\n')
    with pytest.raises(ValueError, match="line 2: column 'text' holds int"):
        prep(str(tmp_path / "n.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"text": "a"\n')
    with pytest.raises(ValueError, match="broken.jsonl: line 1 is not valid JSON"):
        prep(str(tmp_path / "broken.jsonl"))
    (tmp_path / "blank.txt").write_text("  \n\n")
    with pytest.raises(ValueError, match="holds no non-empty text"):
        prep(str(tmp_path / "blank.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        prep(str(tmp_path / "empty"))
    (tmp_path / "one.txt").write_text("a single document")
    with pytest.raises(ValueError, match="needs at least 2"):
        prep(str(tmp_path / "one.txt"))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))  # failures leave nothing
    with pytest.raises(ValueError, match="eval_fraction"):
        prep(str(tmp_path / "one.txt"), eval_fraction=1.0)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        prep(str(tmp_path / "one.txt"), eval_fraction=0.0)


def test_dtype_overflow_is_an_error(tmp_path):
    class LyingTokenizer:  # claims 300 ids, produces 70,000
        eos_token_id = 1

        def __len__(self):
            return 300

        def get_vocab(self):
            return {f"t{i}": i for i in range(300)}

        def __call__(self, texts, **kwargs):
            return {"input_ids": [[70_000] for _ in texts]}

    (tmp_path / "d.txt").write_text("text")
    with pytest.raises(ValueError, match="token id 70000 does not fit the shards' dtype uint16"):
        prepare_corpus(str(tmp_path / "d.txt"), LyingTokenizer(), tmp_path / "out", eval_fraction=0.0, progress=False)


def test_too_small_for_seq_len(tokenizer, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("alpha beta gamma " * 20)
    (src / "b.txt").write_text("delta")
    (src / "c.txt").write_text("zeta")
    cache = tmp_path / "c"
    with pytest.raises(ValueError, match=r"too small for seq_len=4096: the train split .* less than one block"):
        load_corpus(data_cfg(str(src), eval_fraction=0.0, seq_len=4096), tokenizer, seed=0, cache_dir=cache)
    # Held out: the short documents ("delta", "zeta": a few tokens each), less than one block of 16.
    with pytest.raises(ValueError, match=r"too small for seq_len=16: the eval split .* \(2 documents\), less than"):
        load_corpus(data_cfg(str(src), eval_fraction=0.05, seq_len=16), tokenizer, seed=0, cache_dir=cache)
    train, held = load_corpus(data_cfg(str(src), eval_fraction=0.0, seq_len=8), tokenizer, seed=0, cache_dir=cache)
    assert len(held) == 0 and held.shape == (0, 8) and len(train) >= 2


def test_damaged_prepared_directories(tokenizer, corpus, tmp_path):
    root, _ = corpus
    good = prepare_corpus(str(root), tokenizer, tmp_path / "good", shard_tokens=200, progress=False)

    def damaged(name: str) -> Path:
        import shutil  # noqa: PLC0415

        return Path(shutil.copytree(good, tmp_path / name))

    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_index(tmp_path / "absent")
    missing = damaged("missing")
    (missing / "index.json").unlink()
    with pytest.raises(ValueError, match="no index.json"):
        TokenShards(missing, "train")
    corrupt = damaged("corrupt")
    (corrupt / "index.json").write_text('{"format": "weightgeom-token-shards", "splits": ')
    with pytest.raises(ValueError, match="index.json is corrupt"):
        TokenShards(corrupt, "train")
    fields = damaged("fields")
    index = json.loads((fields / "index.json").read_text())
    del index["splits"]["eval"]
    (fields / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="corrupt.*'eval'"):
        read_index(fields)
    half = damaged("half")
    (half / "train-00001.bin").unlink()
    with pytest.raises(ValueError, match="shard train-00001.bin is missing"):
        load_corpus(data_cfg(str(half)), tokenizer, seed=0, cache_dir=tmp_path / "c")
    short = damaged("short")
    data = (short / "train-00000.bin").read_bytes()
    (short / "train-00000.bin").write_bytes(data[:-2])
    with pytest.raises(ValueError, match=r"train-00000.bin has 398 bytes, the index says 400 \(200 tokens\)"):
        read_index(short)
    version = damaged("version")
    index = json.loads((version / "index.json").read_text())
    index["format_version"] = 99
    (version / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="format version 99"):
        read_index(version)
    with pytest.raises(ValueError, match="no split 'test'"):
        TokenShards(good, "test")
    # A prepared directory is not text: neither a text source nor mixed with others.
    with pytest.raises(ValueError, match="prepared token corpus"):
        prepare_corpus(str(good), tokenizer, tmp_path / "again", progress=False)
    with pytest.raises(ValueError, match="must be the only source"):
        load_corpus(data_cfg([str(good), "stdlib"]), tokenizer, seed=0, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="prepared token corpus"):
        load_texts(str(good))


def test_tokenizer_mismatch_names_both(tokenizer, tok_cache, corpus, tmp_path):
    root, _ = corpus
    out = prepare_corpus(str(root), tokenizer, tmp_path / "p", progress=False)
    other = train_stdlib_tokenizer(300, tok_cache, max_bytes=200_000)
    with pytest.raises(ValueError, match=r"different tokenizer \(vocab_size=400.*\) than this run's \(vocab_size=300"):
        load_corpus(data_cfg(str(out)), other, seed=0, cache_dir=tmp_path / "c")


# --- CLI -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_prepare_data_end_to_end(tokenizer, corpus, tmp_path):
    root, docs = corpus
    hf_home = tmp_path / "hf_home"
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_DATASETS_CACHE": str(hf_home / "datasets")}
    out = tmp_path / "prepared"
    local_tokenizer = str(tokenizer.name_or_path)  # the fixture's saved directory: a LOCAL_DIR tokenizer
    cmd = [sys.executable, "-m", "weightgeom", "prepare-data", str(root), "stdlib", "--out", str(out),
           "--tokenizer", local_tokenizer, "--eval-fraction", "0.05", "--num-proc", "2", "--seed", "3",
           "--max-tokens", "60000", "--shard-tokens", "25000", "--no-progress"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    index = read_index(out)
    train, held = index["splits"]["train"], index["splits"]["eval"]
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith(f"prepared {out}: train {train['tokens']:,} tokens ({train['documents']:,} docs), "
                           f"eval {held['tokens']:,} tokens ({held['documents']:,} docs), uint16, "), line
    assert index["tokens"] == 60_000 and index["seed"] == 3 and len(train["shards"]) == 3
    assert index["sources"] == [str(root), "stdlib"] and index["tokenizer"] == tokenizer_fingerprint(tokenizer)
    stream = [t for d in encode(tokenizer, docs + load_texts("stdlib", max_docs=100)) for t in d][:60_000]
    eos = tokenizer.eos_token_id
    got = docs_of(stream_of(out, "train").tolist(), eos) + docs_of(stream_of(out, "eval").tolist(), eos)
    assert sorted(got) == sorted(docs_of(stream, eos))  # the capped stream, split by whole documents
    assert held["documents"] >= 1 and not any(hf_home.rglob("*.arrow"))  # no datasets cache files written
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 2 and "already exists" in again.stderr
    missing = subprocess.run([*cmd[:4], str(tmp_path / "nope"), "--out", str(tmp_path / "x")], cwd=REPO,
                             capture_output=True, text=True, timeout=300, env=env)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def docs_of(stream: list[int], eos: int) -> list[list[int]]:
    """Documents of a stream whose last document may be cut: eos-terminated runs plus any tail."""
    out, cur = [], []
    for t in stream:
        cur.append(t)
        if t == eos:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


# --- issue 19: what a killed prepare leaves, and the mode of a prepared corpus -----------------------------------

def test_a_killed_prepares_temporary_is_removed_and_a_live_ones_kept(tmp_path, tokenizer):
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    from weightgeom.core.shards import remove_stale_temporaries  # noqa: PLC0415

    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no process has any more
    stale = tmp_path / f".corpus.tmp-{dead.pid}-abc"
    live = tmp_path / f".corpus.tmp-{os.getpid()}-def"
    for d in (stale, live):
        d.mkdir()
        (d / "stream.tmp").write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path / "corpus") == [stale]
    assert not stale.exists() and live.exists()


def test_a_prepared_corpus_has_the_umasks_modes(tmp_path, tokenizer):
    import os  # noqa: PLC0415
    import stat  # noqa: PLC0415

    out = prepare_corpus("stdlib", tokenizer, tmp_path / "corpus", max_tokens=5000, progress=False)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask  # not mkdtemp's private 0700
