"""Shared fixtures: tiny models built from config (no downloads), tiny batches with padding."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers

# One thread: the tests run tiny matmuls, for which a second thread costs more than it gives
# (and on a busy 2-core machine, far more: 15.9 ms vs 0.03 ms measured for one small matmul).
torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

VOCAB = 97
REPO = Path(__file__).resolve().parents[1]  # the repository root


def make_model(arch: str = "llama", hidden: int = 32, layers: int = 2, heads: int = 4, seed: int = 0):
    """A tiny causal LM of the given family, dropout off, deterministic init."""
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if arch in ("llama", "qwen2", "mistral"):
        cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
               "mistral": transformers.MistralConfig}[arch]
        cfg = cls(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=heads // 2 if arch != "llama" else heads,
                  intermediate_size=2 * hidden, max_position_embeddings=64, **common)
    elif arch == "gpt2":
        cfg = transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    elif arch == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                         intermediate_size=2 * hidden, max_position_embeddings=64,
                                         hidden_dropout=0.0, attention_dropout=0.0, **common)
    else:
        raise ValueError(arch)
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    return model


def make_batch(batch: int = 3, seq: int = 10, seed: int = 1, pad_last: int = 3):
    """Random tokens with right padding on the last row (mask 0, label -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad_last:
        mask[-1, -pad_last:] = 0
        ids[-1, -pad_last:] = 2
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def token_loss_sum(model, batch):
    """Sum of next-token CE over label tokens, and the number of such tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             targets.reshape(-1), ignore_index=-100, reduction="sum")
    return loss, int((targets != -100).sum())


@pytest.fixture
def tiny_llama():
    return make_model("llama")


@pytest.fixture(scope="session")
def tokenizer_cache(tmp_path_factory):
    """One embedded-tokenizer cache for the whole session: training one costs ~15 s."""
    return tmp_path_factory.mktemp("tokenizer_cache")


def count_host_reads(monkeypatch, *paths: str) -> dict[str, int]:
    """Count, per calling file (``paths`` end a file name, e.g. ``"trainers/session.py"``), the reads
    of a tensor's value on the host (``item``, ``tolist``, ``float``, ``bool``, ``int``): each is a host
    sync on a GPU. The returned dict fills while the monkeypatch is active."""
    reads = dict.fromkeys(paths, 0)

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            for path in reads:
                if caller.endswith(path):
                    reads[path] += 1
            return original(self, *args, **kwargs)

        return read

    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    return reads
