"""A tiny instrumented CE run with three checkpoints (steps 2, 4, 6), shared by the series and snapshot tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from weightgeom.harness.cli import main

TINY_RUN = ["model.hidden_size=32", "tokenizer.vocab_size=512", "data.max_tokens=20000", "data.seq_len=32",
            "stages=[pretrain]", "train.steps=6", "train.save_every=2", "train.batch_size=4", "train.eval_every=0",
            "train.log_every=2", "train.warmup_steps=1", "instruments.every_n=2", "instruments.k=4"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tokenizer_cache) -> Path:
    """RUN/checkpoints/step_000000{2,4,6} and RUN/instruments/ (snapshots and the phase's W0 file)."""
    out = tmp_path_factory.mktemp("tiny_run")
    assert main(["run", "ce_tiny", f"output_dir={out}", "name=run", f"tokenizer.cache_dir={tokenizer_cache}",
                 *TINY_RUN, "--no-progress"]) == 0
    return out / "run"
