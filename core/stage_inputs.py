"""What a recipe's stages read besides the training text: the model a run starts from, its
tokenizer, the preference pairs and their seeded split, and where prepared corpora are cached.
Shared by the pipeline (harness/pipeline.py), the trainers and the rank-1 command (harness/rank1/),
so all read the same inputs."""

from __future__ import annotations

import random
from pathlib import Path

from weightgeom.core.config import RunConfig
from weightgeom.core.data import build_embedded_preferences, load_preference_pairs, load_texts, render_pairs
from weightgeom.core.docstring_pairs import build_docstring_preferences
from weightgeom.core.model_sources import resolve_model
from weightgeom.core.processes import main_print
from weightgeom.core.tokenizer import load_tokenizer, tokenizer_from_config

# align.data values that name a built-in set instead of a file
BUILT_IN_PAIRS = ("embedded", "docstrings")


def corpus_cache(cfg: RunConfig) -> Path:
    """Where prepared token shards of ``data.source`` are cached: beside the tokenizer's cache."""
    return Path(cfg.tokenizer.cache_dir).expanduser() / "corpora"


def starting_model(cfg: RunConfig) -> Path | None:
    """The local HF directory the run starts from (``init_from``, else ``model.source``), a ``.gguf`` file
    or short name dequantized once into ``tokenizer.cache_dir/models/``; None for the tiny model built
    from config."""
    source = cfg.init_from or (None if cfg.model.source == "tiny" else cfg.model.source)
    return None if source is None else resolve_model(source, cfg.tokenizer.cache_dir)


def load_pairs(cfg: RunConfig, tokenizer=None) -> tuple[list[dict], dict]:
    """The preference pairs (a built-in set, :data:`BUILT_IN_PAIRS`, or a local file) as plain text
    (conversational pairs through ``tokenizer``'s chat template, ``core.data.render_pairs``) and what
    was read: ``{"source", "rows", "used", "identical_dropped", "conversational", "chat_template"}``."""
    if cfg.align.data == "embedded":
        texts = load_texts(cfg.data.source, text_field=cfg.data.text_field)
        pairs = build_embedded_preferences(texts, n_pairs=cfg.align.n_pairs, seed=cfg.seed)
        stats = {"source": "embedded", "rows": len(pairs), "used": len(pairs), "identical_dropped": 0,
                 "conversational": False}
    elif cfg.align.data == "docstrings":
        pairs = build_docstring_preferences(cfg.align.n_pairs, seed=cfg.seed)
        stats = {"source": "docstrings", "rows": len(pairs), "used": len(pairs), "identical_dropped": 0,
                 "conversational": True}
    else:
        pairs, read = load_preference_pairs(cfg.align.data, keep_messages=True)
        main_print(f"[data] {cfg.align.data}: {read.n_valid} of {read.n_rows} rows used"
                   f"{f', {read.n_identical_dropped} dropped (chosen == rejected)' if read.n_identical_dropped else ''}"
                   f" ({'conversational' if read.conversational else 'plain'})")
        stats = {"source": str(cfg.align.data), "rows": read.n_rows, "used": read.n_valid,
                 "identical_dropped": read.n_identical_dropped, "conversational": read.conversational}
    if stats["conversational"]:
        stats["chat_template"] = bool(getattr(tokenizer, "chat_template", None))
    return render_pairs(pairs, tokenizer), stats


def split_pairs(pairs: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded split into training and held-out pairs: ``round(eval_fraction * n)`` held out, at least one
    and at most n - 1 when ``eval_fraction > 0`` and there are two pairs or more."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(pairs) - 1, max(1, round(len(pairs) * eval_fraction))) if eval_fraction > 0 and len(pairs) >= 2 \
        else 0
    return [pairs[i] for i in order[n_eval:]], [pairs[i] for i in order[:n_eval]]


def stage_tokenizer(cfg: RunConfig, model_dir: Path | None):
    """The tokenizer saved with the model a stage starts from (an instruct model's own, a checkpoint's),
    else the recipe's (``tokenizer.source``, by default the embedded BPE)."""
    if model_dir is not None and any((Path(model_dir) / f).is_file() for f in ("tokenizer.json",
                                                                                "tokenizer_config.json")):
        return load_tokenizer(str(model_dir), cfg.tokenizer.vocab_size, Path(cfg.tokenizer.cache_dir).expanduser())
    return tokenizer_from_config(cfg.tokenizer)
