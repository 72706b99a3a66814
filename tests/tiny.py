"""Tiny inputs shared by the trainer tests: a word-level tokenizer, easily learnable preference pairs,
and a sink that keeps its rows in memory."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

WORDS = ["<|pad|>", "<|eos|>", "<unk>", "the", "a", "cat", "dog", "bird", "sat", "ran", "flew", "on", "under", "mat",
         "tree", "yes", "no", "good", "bad", "very"]
PROMPTS = ["the cat sat on", "a dog ran under", "the bird flew on", "a cat ran under", "the dog sat on", "a bird sat"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level, no chat template, ``<|pad|>`` / ``<|eos|>`` specials like the embedded tokenizer."""
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<|pad|>", eos_token="<|eos|>",
                                   unk_token="<unk>")


def constant_pairs(n: int) -> list[dict]:
    """Easily learnable: the chosen completion is always the same string, so is the rejected one."""
    return [{"prompt": PROMPTS[i % len(PROMPTS)], "chosen": " the mat", "rejected": " no bad tree"} for i in range(n)]


class ListSink:
    def __init__(self) -> None:
        self.rows: list[tuple[int, dict]] = []

    def log(self, metrics: dict, step: int) -> None:
        self.rows.append((step, dict(metrics)))
