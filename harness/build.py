"""Turn config sections into objects: tokenizer, model, corpus, instrument suite.

Everything here runs before a run directory is created, so bad input (a missing file, an empty
corpus, a model directory without weights) fails fast and leaves nothing half-written.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from harness.config import InstrumentConfig, ModelConfig, RunConfig
from harness.models import build_tiny_model, load_local_model
from harness.shards import PackedBlocks, load_corpus
from harness.tokenizer import load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def build_tokenizer(cfg: RunConfig):
    """The run's tokenizer: a local directory's (``init_from`` / ``model.source`` when they hold
    tokenizer files, or ``tokenizer.source``), else the embedded stdlib BPE."""
    source = cfg.tokenizer.source
    cache = Path(cfg.tokenizer.cache_dir).expanduser()
    return load_tokenizer(source, cfg.tokenizer.vocab_size, cache)


def build_model(cfg: ModelConfig, vocab_size: int, seed: int, init_from: str | None = None) -> nn.Module:
    """A local HF directory (``init_from`` wins over ``model.source``) or the tiny model from config."""
    source = init_from or (None if cfg.source == "tiny" else cfg.source)
    if source is not None:
        model = load_local_model(source, dtype=DTYPES[cfg.dtype])
    else:
        model = build_tiny_model(
            cfg.arch, vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
            num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size,
            max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_word_embeddings, seed=seed)
        model = model.to(DTYPES[cfg.dtype])
    if model.get_input_embeddings().weight.shape[0] < vocab_size:
        raise ValueError(f"model vocabulary ({model.get_input_embeddings().weight.shape[0]}) is smaller than the "
                         f"tokenizer's ({vocab_size}): use the tokenizer saved with the model (tokenizer.source)")
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    return model


def match_special_tokens(model: nn.Module, tokenizer) -> None:
    """Give a model built from config the tokenizer's pad/bos/eos ids, so its saved config and
    generation config agree with the tokenizer saved beside it (TRL otherwise rewrites them)."""
    ids = {name: getattr(tokenizer, name, None) for name in ("pad_token_id", "bos_token_id", "eos_token_id")}
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None:
            for name, value in ids.items():
                setattr(config, name, value)


def build_corpus(cfg: RunConfig, tokenizer) -> tuple[PackedBlocks, PackedBlocks]:
    """(train, eval) blocks of ``data.seq_len`` over memory-mapped token shards (`harness.shards`):
    ``data.source`` read directly when it is a prepared directory, else prepared once (documents
    held out by ``data.eval_fraction`` and ``seed``) into ``<tokenizer.cache_dir>/corpora/`` and reused."""
    cache = Path(cfg.tokenizer.cache_dir).expanduser() / "corpora"
    return load_corpus(cfg.data, tokenizer, seed=cfg.seed, cache_dir=cache)


def build_suite(cfg: InstrumentConfig, model: nn.Module, seed: int):
    from hooks.suite import InstrumentSuite  # noqa: PLC0415

    if not cfg.enabled:
        return None
    return InstrumentSuite(model, roles=tuple(cfg.roles), layers=cfg.layers, k=cfg.k, every_n=cfg.every_n,
                           log_spaced=cfg.log_spaced, input_roles=tuple(cfg.input_roles), output_roles=tuple(cfg.output_roles),
                           dtype=DTYPES[cfg.dtype], max_tokens=cfg.max_tokens, n_random=cfg.n_random, seed=seed)
