"""Tiny inputs of the rank-1 tests: preference pairs with padding, text blocks, PSD matrices."""

from __future__ import annotations

import random

import torch

from tests.tiny import PROMPTS
from weightgeom.hooks.roles import resolve_tracked

CPU = torch.device("cpu")
WORDS = ["the", "a", "cat", "dog", "bird", "sat", "ran", "flew", "on", "under", "mat", "tree", "yes", "no", "good",
         "bad", "very"]


def random_pairs(n: int, seed: int = 0) -> list[dict]:
    """Pairs of different lengths (so the batches have padding) in the tiny word-level vocabulary."""
    rng = random.Random(seed)

    def words() -> str:
        return " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))

    return [{"prompt": PROMPTS[i % len(PROMPTS)], "chosen": words(), "rejected": words()} for i in range(n)]


def text_blocks(n: int = 3, length: int = 12) -> torch.Tensor:
    return torch.randint(3, len(WORDS), (n, length), generator=torch.Generator().manual_seed(0))


def tracked_matrix(model, key: str):
    layer, role = key.split("/")
    return next(tm for tm in resolve_tracked(model, (role,)) if tm.layer == int(layer[1:]))


def rand_psd(n: int, seed: int, spike: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3 * n, generator=g, dtype=torch.float64)
    C = X @ X.T / (3 * n)
    if spike:
        e = torch.randn(n, generator=g, dtype=torch.float64)
        C = C + spike * torch.outer(e, e) / e.dot(e)
    return C


