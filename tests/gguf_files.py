"""Tiny GGUF files for the tests: a small HF Llama and byte-level BPE tokenizer written the way llama.cpp's
``convert_hf_to_gguf.py`` writes them (the ``llama`` architecture, F32 tensors, a ``gpt2`` tokenizer), so
reading one back through transformers (``gguf_file=``) must give the same weights, logits and token ids.

Layout details that transformers' reader (``modeling_gguf_pytorch_utils`` / ``integrations/gguf``) undoes:

* tensor names: ``token_embd``, ``output_norm``, ``output`` (absent when the embeddings are tied: that is
  how the reader learns ``tie_word_embeddings``), ``blk.N.{attn_norm,attn_q,attn_k,attn_v,attn_output,
  ffn_norm,ffn_gate,ffn_up,ffn_down}``;
* q and k rows are permuted (llama.cpp's ``permute``: each head's interleaved rotary pairs are regrouped
  into halves), which the reader reverses with ``LlamaTensorProcessor._reverse_permute_weights``;
* the tokenizer is the vocabulary (byte-level spelling), ``token_type`` (3 = control, for the specials),
  the merges as ``"a b"`` strings and the special token ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

PAD, EOS = "<|pad|>", "<|eos|>"
TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "def resolve_model(source, cache_dir=None):\n    return Path(source)\n",
    "weights, geometry and tokens: 0123456789 -- café, naïve, 東京",
    "a tiny llama reads a tiny gguf file and writes safetensors",
]
_TOKEN_NORMAL, _TOKEN_CONTROL = 1, 3  # llama.cpp's token types

# HF module name (below ``model.layers.N.``) -> GGUF tensor name (below ``blk.N.``)
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def tiny_bpe_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """Byte-level BPE (the embedded tokenizer's recipe: GPT-2 pre-tokenizer, no prefix space) trained on
    :data:`TEXTS`; ``<|pad|>`` is id 0, ``<|eos|>`` id 1 (also bos)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(TEXTS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, bos_token=EOS,
                                   clean_up_tokenization_spaces=False)


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (``LlamaModel.permute`` in ``convert_hf_to_gguf.py``)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def gguf_tensors(model: PreTrainedModel, *, permute: bool = True) -> dict[str, np.ndarray]:
    """The model's weights under their GGUF names, in fp32, q/k permuted as llama.cpp stores them."""
    config = model.config
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    state = {name: tensor.detach().to(torch.float32).cpu().numpy() for name, tensor in model.state_dict().items()}
    tensors = {"token_embd.weight": state.pop("model.embed_tokens.weight"),
               "output_norm.weight": state.pop("model.norm.weight")}
    lm_head = state.pop("lm_head.weight", None)
    if not config.tie_word_embeddings:
        tensors["output.weight"] = lm_head
    for layer in range(config.num_hidden_layers):
        for hf_name, gguf_name in _LAYER_NAMES.items():
            weights = state.pop(f"model.layers.{layer}.{hf_name}.weight")
            if permute and gguf_name == "attn_q":
                weights = llama_cpp_permute(weights, n_head, n_head)
            elif permute and gguf_name == "attn_k":
                weights = llama_cpp_permute(weights, n_head, n_kv)
            tensors[f"blk.{layer}.{gguf_name}.weight"] = weights
    if state:
        raise ValueError(f"weights with no GGUF name here: {sorted(state)}")
    return tensors


def _merges(tokenizer: PreTrainedTokenizerFast) -> list[str]:
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    return [merge if isinstance(merge, str) else " ".join(merge) for merge in merges]


def write_tiny_llama_gguf(path: str | Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, *,
                          name: str = "tiny-llama", permute: bool = True) -> Path:
    """Write ``model`` (a Llama) and ``tokenizer`` (byte-level BPE) as an F32 GGUF file at ``path``.

    ``permute=False`` leaves q/k unpermuted (a broken writer, for checking the tests notice)."""
    config = model.config
    path = Path(path)
    vocab = tokenizer.get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    if [vocab[token] for token in tokens] != list(range(len(tokens))) or len(tokens) != config.vocab_size:
        raise ValueError(f"tokenizer ids must be 0..{config.vocab_size - 1} (the model's vocabulary)")
    specials = set(tokenizer.all_special_tokens)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope_theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta") or config.rope_theta

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_add_space_prefix(False)
    writer.add_add_bos_token(False)
    writer.add_token_list(tokens)
    writer.add_token_types([_TOKEN_CONTROL if token in specials else _TOKEN_NORMAL for token in tokens])
    writer.add_token_merges(_merges(tokenizer))
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    for tensor_name, weights in gguf_tensors(model, permute=permute).items():
        writer.add_tensor(tensor_name, np.ascontiguousarray(weights, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
