"""Models: tiny transformers built from config, and local checkpoints. Nothing is downloaded.

Attention uses `attn_implementation="sdpa"` everywhere (fast on CPU and GPU; the instruments hook
linear layers, so the attention kernel does not change what they see).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
)

ARCHITECTURES = ("llama", "qwen2", "mistral", "gpt2", "gpt_neox")
ATTN_IMPLEMENTATION = "sdpa"
# Names save_pretrained writes (single file or shards + index); a bare "*.bin" would also match
# e.g. training_args.bin.
_WEIGHT_PATTERNS = (
    "model*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
)


def _config(
    arch: str,
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    max_position_embeddings: int,
    tie_word_embeddings: bool,
) -> PretrainedConfig:
    """The transformers config for `arch`, with every dropout probability set to 0."""
    # Token ids in the stock configs (e.g. GPT-2's 50256) would point outside a tiny vocabulary.
    no_special_ids = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    common = dict(vocab_size=vocab_size, tie_word_embeddings=tie_word_embeddings, **no_special_ids)
    if arch in ("llama", "qwen2", "mistral"):
        config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
        extra = {"sliding_window": None} if arch in ("qwen2", "mistral") else {}
        return config_cls(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max_position_embeddings,
            attention_dropout=0.0,
            **extra,
            **common,
        )
    if arch == "gpt2":
        return GPT2Config(
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_inner=intermediate_size,
            n_positions=max_position_embeddings,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
            **common,
        )
    return GPTNeoXConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        classifier_dropout=0.0,
        **common,
    )


def build_tiny_model(
    arch: str = "llama",
    *,
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 256,
    tie_word_embeddings: bool = False,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialised causal LM of architecture `arch` (one of `ARCHITECTURES`), fp32.

    Defaults: `num_kv_heads = num_heads` (no grouped-query attention; GPT-2 and GPT-NeoX support
    only that), `intermediate_size = 4 * hidden_size`. Initialisation is seeded by `seed` inside
    `torch.random.fork_rng`, so it is reproducible and leaves the caller's global RNG untouched.
    Returned in train mode (as `from_config` leaves it) with every dropout probability 0, so
    train-mode forwards are deterministic; note `from_pretrained` models start in eval mode.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHITECTURES)}.")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}.")
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be divisible by num_kv_heads={num_kv_heads}.")
    if arch in ("gpt2", "gpt_neox") and num_kv_heads != num_heads:
        raise ValueError(
            f"{arch} has no grouped-query attention; leave num_kv_heads unset (got {num_kv_heads})."
        )
    config = _config(
        arch,
        vocab_size,
        hidden_size,
        num_layers,
        num_heads,
        num_kv_heads,
        intermediate_size or 4 * hidden_size,
        max_position_embeddings,
        tie_word_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=ATTN_IMPLEMENTATION, dtype=torch.float32
        )
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0  # belt and braces: some dropouts are not driven by a config field
    return model.train()


def load_local_model(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A causal LM from a local directory (config.json + weights); returned in eval mode.

    Raises FileNotFoundError for a missing path (hub names are never downloaded) and ValueError
    for a directory without config.json or without weights (model*.safetensors, pytorch_model*.bin,
    or a sharded index), listing what the directory holds.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model path {str(path)!r} is not an existing directory. Only local model directories are "
            "supported; hub names are not downloaded (save one with model.save_pretrained(DIR))."
        )
    found = sorted(p.name for p in path.iterdir()) or ["nothing"]
    if not (path / "config.json").is_file():
        raise ValueError(f"model dir {str(path)!r} has no config.json; found: {', '.join(found)}.")
    if not any(any(path.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
        raise ValueError(
            f"model dir without weights: {str(path)!r} has config.json but no model*.safetensors, "
            f"pytorch_model*.bin or sharded index; found: {', '.join(found)}."
        )
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters; tied weights (shared tensors) are counted once."""
    return sum(p.numel() for p in model.parameters())
