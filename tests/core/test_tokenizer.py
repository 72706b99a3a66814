import sysconfig
from pathlib import Path

import pytest

import weightgeom.core.tokenizer as tok_mod
from weightgeom.core.tokenizer import load_tokenizer, stdlib_text_files, train_stdlib_tokenizer

SMALL_BYTES = 300_000
VOCAB = 400


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tok_cache")


@pytest.fixture(scope="module")
def tokenizer(cache_dir):
    return train_stdlib_tokenizer(VOCAB, cache_dir, max_bytes=SMALL_BYTES)


def test_stdlib_files_are_sorted_budgeted_and_skip_tests():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_text_files(SMALL_BYTES)
    assert files and files == stdlib_text_files(SMALL_BYTES)
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel)
    assert sum(f.stat().st_size for f in files) <= SMALL_BYTES
    every = stdlib_text_files()
    assert len(every) > len(files)
    assert not any({"test", "tests", "site-packages"} & set(f.relative_to(root).parts) for f in every)


def test_stdlib_files_budget_too_small():
    with pytest.raises(ValueError, match="max_bytes=1"):
        stdlib_text_files(max_bytes=1)


def test_trained_tokenizer_specials_and_round_trip(tokenizer):
    assert len(tokenizer) == VOCAB
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.eos_token == "<|eos|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "right"
    text = "def f(x):\n\treturn  x + 1  # caf\u00e9 \u2713 \U0001f600\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    # Merges were learned: common code compresses below one token per byte.
    code = "    def __init__(self, name):\n        self.name = name\n"
    assert len(tokenizer(code)["input_ids"]) < len(code.encode()) / 2


def test_cache_is_reused_without_retraining(tokenizer, cache_dir, monkeypatch):
    (entry,) = [p for p in cache_dir.iterdir() if not p.name.startswith(".")]
    assert f"v{VOCAB}" in entry.name
    mtime = (entry / "tokenizer.json").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("retrained although a cached tokenizer exists")

    monkeypatch.setattr(tok_mod, "_train_bpe", fail)
    again = train_stdlib_tokenizer(VOCAB, cache_dir, max_bytes=SMALL_BYTES)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert (entry / "tokenizer.json").stat().st_mtime_ns == mtime
    assert [p.name for p in cache_dir.iterdir()] == [entry.name]  # no temp dirs left behind


def test_different_vocab_gets_its_own_cache_entry(cache_dir, tmp_path):
    small = train_stdlib_tokenizer(300, tmp_path, max_bytes=100_000)
    assert len(small) == 300
    assert len(list(tmp_path.iterdir())) == 1


def test_interrupted_training_leaves_no_cache_entry(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tok_mod, "_wrap", crash)
    with pytest.raises(KeyboardInterrupt):
        train_stdlib_tokenizer(300, tmp_path, max_bytes=100_000)
    assert list(tmp_path.iterdir()) == []


def test_vocab_too_small(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_stdlib_tokenizer(100, tmp_path, max_bytes=100_000)


def test_load_tokenizer_embedded_trains_on_full_stdlib(tmp_path):
    embedded = load_tokenizer("stdlib-bpe", VOCAB, tmp_path)
    assert len(embedded) == VOCAB and embedded.pad_token == "<|pad|>"
    text = "for i in range(3):\n    pass\n"
    assert embedded.decode(embedded(text)["input_ids"]) == text


def test_load_tokenizer_local_dir(tokenizer, cache_dir, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    local = load_tokenizer(str(tmp_path), vocab_size=123, cache_dir=cache_dir)  # vocab_size ignored
    text = "import os\nprint(os.sep)\n"
    assert local(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert local.pad_token == "<|pad|>"


def test_load_tokenizer_without_pad_uses_eos(tokenizer, cache_dir, tmp_path):
    no_pad = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|eos|>")
    assert no_pad.pad_token is None
    no_pad.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path), VOCAB, cache_dir)
    assert loaded.pad_token == "<|eos|>"
    assert loaded.pad_token_id == loaded.eos_token_id


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Only local directories"):
        load_tokenizer("EleutherAI/pythia-14m", VOCAB, tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="found: config.json"):
        load_tokenizer(str(tmp_path), VOCAB, tmp_path)
    with pytest.raises(ValueError, match="is a file"):
        load_tokenizer(str(tmp_path / "config.json"), VOCAB, tmp_path)
