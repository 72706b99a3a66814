"""Models: tiny transformers built from config, and local checkpoints. Nothing is downloaded.

Attention uses `attn_implementation="sdpa"` (fast on CPU and GPU; the instruments hook linear layers,
so the attention kernel does not change what they see), or "eager" for a family without it (Gemma2).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from weightgeom.core.config import LoraConfig, ModelConfig
from weightgeom.core.model_sources import resolve_model
from weightgeom.hooks.roles import ARCHITECTURES

ATTN_IMPLEMENTATION = "sdpa"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Names save_pretrained writes (single file or shards + index); a bare "*.bin" would also match
# e.g. training_args.bin.
_WEIGHT_PATTERNS = (
    "model*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
)


def tiny_config(arch: str, *, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                num_kv_heads: int, intermediate_size: int, max_seq_len: int,
                tie_word_embeddings: bool) -> PretrainedConfig:
    """The transformers config of ``arch`` with these sizes, every dropout probability set to 0.

    Size names are translated with the architecture's ``config_names`` (hooks/roles.py) and its
    ``tiny_settings`` are applied (e.g. 4 experts for a mixture of experts), so a new row there is all a
    new family needs."""
    names = ARCHITECTURES[arch].config_names
    sizes = {"hidden_size": hidden_size, "num_layers": num_layers, "num_heads": num_heads,
             "intermediate_size": intermediate_size, "max_seq_len": max_seq_len}
    if "num_kv_heads" in names:
        sizes["num_kv_heads"] = num_kv_heads
    elif num_kv_heads != num_heads:
        raise ValueError(f"{arch} has no grouped-query attention; leave num_kv_heads unset (got {num_kv_heads}).")
    # Token ids in the stock configs (e.g. GPT-2's 50256) would point outside a tiny vocabulary.
    fields = {name: v for k, v in sizes.items() for name in _names(names[k])}
    config = AutoConfig.for_model(arch, vocab_size=vocab_size, tie_word_embeddings=tie_word_embeddings,
                                  bos_token_id=None, eos_token_id=None, pad_token_id=None,
                                  **fields, **ARCHITECTURES[arch].tiny_settings)
    for name, value in list(vars(config).items()):
        if isinstance(value, float) and ("dropout" in name or "pdrop" in name):
            setattr(config, name, 0.0)
    if getattr(config, "head_dim", None) is not None:  # e.g. Qwen3 defaults to 128 whatever the width
        config.head_dim = hidden_size // num_heads
    if getattr(config, "sliding_window", None):  # a window that is on (Qwen2-MoE keeps 0 for off and needs it)
        # Full attention everywhere: no window, or (Gemma2/3, whose layer_types alternate sliding and full
        # layers and need a number) a window as long as the context.
        sliding_layers = "sliding_attention" in (getattr(config, "layer_types", None) or ())
        config.sliding_window = max_seq_len if sliding_layers else None
    return config


def _names(name: str | tuple[str, ...]) -> tuple[str, ...]:
    """A size's config field names: one, or several that all get it (a MoE config's expert widths)."""
    return (name,) if isinstance(name, str) else name


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
    """A randomly initialised causal LM of architecture `arch` (a key of `weightgeom.hooks.roles.ARCHITECTURES`), fp32.

    Defaults: `num_kv_heads = num_heads` (no grouped-query attention; GPT-2 and GPT-NeoX support
    only that), `intermediate_size = 4 * hidden_size`. Initialisation is seeded by `seed` inside
    `torch.random.fork_rng`, so it is reproducible and leaves the caller's global RNG untouched.
    Returned in train mode (as `from_config` leaves it) with every dropout probability 0, so
    train-mode forwards are deterministic; note `from_pretrained` models start in eval mode.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(sorted(ARCHITECTURES))} "
                         "(the role table in hooks/roles.py).")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}.")
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be divisible by num_kv_heads={num_kv_heads}.")
    config = tiny_config(arch, vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                         num_heads=num_heads, num_kv_heads=num_kv_heads,
                         intermediate_size=intermediate_size or 4 * hidden_size,
                         max_seq_len=max_position_embeddings, tie_word_embeddings=tie_word_embeddings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTN_IMPLEMENTATION,
                                                     dtype=torch.float32)
        except ValueError as err:  # a family without sdpa (Gemma2: attention-logit soft-capping) says so here
            if "scaled_dot_product_attention" not in str(err):
                raise
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0  # belt and braces: some dropouts are not driven by a config field
    return model.train()


def random_init(config: PretrainedConfig, seed: int, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A random initialisation of ``config``'s architecture: ``AutoModelForCausalLM.from_config``, which applies
    the family's own ``_init_weights`` (with the config's ``initializer_range``; tied embeddings stay tied), seeded
    by ``seed`` inside ``torch.random.fork_rng`` (reproducible; the caller's global RNG untouched). Built on the
    CPU (the same numbers on every machine); eval mode. The config is copied, never changed."""
    config = copy.deepcopy(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def load_local_model(path: str | Path, dtype: torch.dtype = torch.float32,
                     cache_dir: str | Path | None = None) -> PreTrainedModel:
    """A causal LM from a local directory (config.json + weights), a ``.gguf`` file or a short name of
    ``core.model_sources.KNOWN_MODELS`` (both dequantized once into ``cache_dir/models/``); eval mode.

    Raises FileNotFoundError for a missing path (hub names are never downloaded) and ValueError
    for a directory without config.json or without weights (model*.safetensors, pytorch_model*.bin,
    or a sharded index), listing what the directory holds, and for weights that leave parameters of
    the configured model unset (transformers would initialise them at random and go on).
    """
    path = check_local_model_dir(resolve_model(path, cache_dir))
    try:
        # use_kernels=False: transformers >= 5.25 would otherwise swap in kernels fetched from the hub
        model, info = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype,
                                                           output_loading_info=True, use_kernels=False)
    except Exception as err:
        raise ValueError(f"model dir {str(path)!r} could not be loaded ({type(err).__name__}: {err})") from err
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        total = sum(1 for _ in model.named_parameters())
        raise ValueError(f"model dir {str(path)!r}: its weights lack {len(missing)} of the {total} parameters its "
                         f"config.json describes (e.g. {missing[:3]}); they would be randomly initialised: put the "
                         "config.json the weights were saved with beside them")
    return model


def check_local_model_dir(path: str | Path) -> Path:
    """The checks :func:`load_local_model` makes before loading (cheap: no weights are read)."""
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
    for weights in sorted(path.glob("*.safetensors")):
        try:  # reads the header only: an empty or truncated file fails here, not mid-run
            with safe_open(str(weights), framework="pt") as handle:
                handle.keys()
        except Exception as err:  # noqa: BLE001 (safetensors' own error type for a bad header, re-raised)
            raise ValueError(f"model dir {str(path)!r}: {weights.name} is not a readable safetensors file "
                             f"({err}); copy the weights again") from None
    return path


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters; tied weights (shared tensors) are counted once."""
    return sum(p.numel() for p in model.parameters())


def build_model(cfg: ModelConfig, vocab_size: int, seed: int, init_from: str | None = None,
                cache_dir: str | Path | None = None) -> nn.Module:
    """A local model (``init_from`` wins over ``model.source``: a directory, a ``.gguf`` file or a short
    name, :func:`load_local_model`) or the tiny model from config, in ``model.dtype``, train mode, with
    gradient checkpointing when asked."""
    source = init_from or (None if cfg.source == "tiny" else cfg.source)
    if source is not None:
        model = load_local_model(source, dtype=DTYPES[cfg.dtype], cache_dir=cache_dir)
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


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap ``model`` in a PEFT LoRA adapter (build the instruments after this: they hook the wrappers)."""
    import peft  # noqa: PLC0415 (slow import, only for LoRA runs)

    config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                             target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)
