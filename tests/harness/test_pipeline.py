"""The pipeline's checks of the preference pairs before any directory exists: pairs the truncation made
identical are dropped and counted; too few pairs for one batch are refused."""

from __future__ import annotations

import pytest

from tests.core.test_data import CharTokenizer
from weightgeom.core.config import ConfigError, load_config
from weightgeom.harness.pipeline import usable_pairs


def recipe(*overrides: str):
    return load_config(None, ["stages=[pretrain, align]", "align.max_len=8", "align.eval_fraction=0.0",
                              "align.train.batch_size=2", *overrides])


def test_identical_after_truncation_are_dropped_and_counted():
    pairs = [{"prompt": "0123456789", "chosen": "abcdXY", "rejected": "abcdZW"}] + \
        [{"prompt": f"p{i}", "chosen": "yes", "rejected": "no"} for i in range(3)]
    stats = {"source": "x.jsonl", "used": 4}
    kept = usable_pairs(recipe(), pairs, stats, CharTokenizer())
    assert kept == pairs[1:] and stats["identical_after_truncation"] == 1 and stats["used"] == 3


def test_fewer_training_pairs_than_one_batch_are_refused():
    pairs = [{"prompt": f"p{i}", "chosen": "yes", "rejected": "no"} for i in range(3)]
    with pytest.raises(ConfigError, match="3 training pairs .* cannot fill one batch of align.train.batch_size=4"):
        usable_pairs(recipe("align.train.batch_size=4"), pairs, {"source": "x.jsonl"}, CharTokenizer())
    everything_identical = [{"prompt": "0123456789", "chosen": "abcdXY", "rejected": "abcdZW"}]
    with pytest.raises(ConfigError, match="no pair is left"):
        usable_pairs(recipe(), everything_identical, {"source": "x.jsonl"}, CharTokenizer())
