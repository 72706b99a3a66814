"""Shared fixtures: tiny models built from config (no downloads), tiny batches with padding."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers

from weightgeom.core.models import build_tiny_model

# One thread: the tests run tiny matmuls, for which a second thread costs more than it gives
# (and on a busy 2-core machine, far more: 15.9 ms vs 0.03 ms measured for one small matmul).
torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

VOCAB = 97
REPO = Path(__file__).resolve().parents[1]  # the repository root


# The tests' model size, small enough for a 2-core machine; qwen2 and mistral keep grouped-query attention
# (2 key/value heads for 4 query heads), so that k and v are narrower than q somewhere in the suite.
TINY_SIZES = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                  max_position_embeddings=64)
GQA_KV_HEADS = {"qwen2": 2, "mistral": 2}


def make_model(arch: str = "llama", *, seed: int = 0, **sizes):
    """The project's one tiny-model builder, ``weightgeom.core.models.build_tiny_model``, at the tests'
    sizes (``TINY_SIZES``; keywords such as ``num_layers=1`` replace them): dropout off, seeded init."""
    return build_tiny_model(arch, seed=seed, **{**TINY_SIZES, "num_kv_heads": GQA_KV_HEADS.get(arch), **sizes})


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
