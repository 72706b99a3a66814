"""The pipeline's ``rank1`` stage: the causal test on the run's own pretrained model, with the run's
preference pairs (G from the training pairs, measured on the alignment runs' held-out pairs) and the
held-out split of its pretraining corpus; writes ``RUN/rank1/`` for the asymmetry report."""

from __future__ import annotations

from pathlib import Path

import torch

from weightgeom.core.config import RunConfig
from weightgeom.core.shards import load_corpus
from weightgeom.core.stage_inputs import corpus_cache
from weightgeom.harness.rank1.experiment import run_rank1
from weightgeom.harness.rank1.report import write_rank1_report

RANK1_DIR = "rank1"


def run_rank1_stage(cfg: RunConfig, run_dir: Path, base: Path, *, tokenizer, pairs: list[dict],
                    eval_pairs: list[dict], progress: bool = True) -> Path:
    """Edit the model at ``base`` (the pretraining checkpoint) and write ``run_dir/rank1/``."""
    if not eval_pairs:
        raise ValueError("the rank1 stage needs held-out preference pairs: set align.eval_fraction > 0")
    s = cfg.rank1
    _, held_text = load_corpus(cfg.data, tokenizer, cfg.seed, corpus_cache(cfg), progress=False, announce=False)
    if len(held_text) == 0:
        raise ValueError("the rank1 stage measures CE and KL on held-out text: set data.eval_fraction > 0")
    train = pairs[: s.max_pairs] if s.max_pairs else pairs
    result = run_rank1(base, pairs=train, eval_pairs=eval_pairs, text_blocks=held_text[: s.text_blocks], config=s,
                       seed=cfg.seed, beta=cfg.align.beta, max_len=cfg.align.max_len, tokenizer=tokenizer,
                       dtype=torch.float32, progress=progress)
    result.config.update(source=str(run_dir), text_source=f"held-out split of the recipe's corpus ({cfg.data.source})",
                         eval_fraction=cfg.align.eval_fraction)
    return write_rank1_report(result, Path(run_dir) / RANK1_DIR)
