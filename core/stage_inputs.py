"""What a recipe's stages read besides the model: the preference pairs and their seeded split, the
tokenizer of the starting model, and where prepared corpora are cached. Shared by the pipeline
(harness/pipeline.py) and the rank-1 command (harness/rank1/), so both read the same inputs."""

from __future__ import annotations

import random
from pathlib import Path

from weightgeom.core.config import RunConfig
from weightgeom.core.data import build_embedded_preferences, load_preference_pairs, load_texts
from weightgeom.core.processes import main_print
from weightgeom.core.tokenizer import load_tokenizer, tokenizer_from_config


def corpus_cache(cfg: RunConfig) -> Path:
    """Where prepared token shards of ``data.source`` are cached: beside the tokenizer's cache."""
    return Path(cfg.tokenizer.cache_dir).expanduser() / "corpora"


def load_pairs(cfg: RunConfig) -> tuple[list[dict], dict]:
    """The preference pairs (the embedded set built from the local corpus, or a local file) and
    what was read: ``{"source", "rows", "used", "identical_dropped", "conversational"}``."""
    if cfg.align.data == "embedded":
        texts = load_texts(cfg.data.source, text_field=cfg.data.text_field)
        pairs = build_embedded_preferences(texts, n_pairs=cfg.align.n_pairs, seed=cfg.seed)
        return pairs, {"source": "embedded", "rows": len(pairs), "used": len(pairs), "identical_dropped": 0,
                       "conversational": False}
    pairs, stats = load_preference_pairs(cfg.align.data)
    main_print(f"[data] {cfg.align.data}: {stats.n_valid} of {stats.n_rows} rows used"
          f"{f', {stats.n_identical_dropped} dropped (chosen == rejected)' if stats.n_identical_dropped else ''} "
          f"({'conversational' if stats.conversational else 'plain'})")
    return pairs, {"source": str(cfg.align.data), "rows": stats.n_rows, "used": stats.n_valid,
                   "identical_dropped": stats.n_identical_dropped, "conversational": stats.conversational}


def split_pairs(pairs: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded split into training and held-out pairs: ``round(eval_fraction * n)`` held out, at least one
    and at most n - 1 when ``eval_fraction > 0`` and there are two pairs or more."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(pairs) - 1, max(1, round(len(pairs) * eval_fraction))) if eval_fraction > 0 and len(pairs) >= 2 \
        else 0
    return [pairs[i] for i in order[n_eval:]], [pairs[i] for i in order[:n_eval]]


def alignment_tokenizer(cfg: RunConfig, init_dir: Path):
    """The tokenizer saved with the starting model, else the recipe's."""
    if any((Path(init_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return load_tokenizer(str(init_dir), cfg.tokenizer.vocab_size, Path(cfg.tokenizer.cache_dir).expanduser())
    return tokenizer_from_config(cfg.tokenizer)
