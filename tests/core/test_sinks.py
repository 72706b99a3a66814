"""Metric sinks: JSONL rows stream and parse, TensorBoard scalars read back, resume truncation."""

from __future__ import annotations

import json
import math

import pytest

from weightgeom.core.sinks import build_sinks, read_metrics, read_tensorboard_scalars, truncate_after


def test_jsonl_and_tensorboard_receive_the_same_rows(tmp_path):
    sinks = build_sinks(tmp_path, ["jsonl", "tensorboard"])
    sinks.log({"phase": "pretrain", "train/loss": 2.5, "rsf_in/L0/q": 3.0}, step=1)
    # a row is readable before the sink closes (flushed per row)
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["train/loss"] == 2.5
    sinks.log({"phase": "pretrain", "train/loss": 2.0, "rsf_in/L0/q": float("nan")}, step=2)
    sinks.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[1])["rsf_in/L0/q"] is None  # strict JSON: NaN written as null
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert math.isnan(rows[1]["rsf_in/L0/q"])
    scalars = read_tensorboard_scalars(tmp_path / "tb")
    assert scalars["train/loss"] == [(1, 2.5), (2, 2.0)]
    assert scalars["rsf_in/L0/q"] == [(1, 3.0)]  # the NaN is not written to TensorBoard


def test_truncate_after_drops_later_steps_only(tmp_path):
    sinks = build_sinks(tmp_path, ["jsonl"])
    for step in range(1, 6):
        sinks.log({"train/loss": float(step)}, step)
    sinks.close()
    truncate_after(tmp_path / "metrics.jsonl", 3)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_read_metrics_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        read_metrics(tmp_path / "metrics.jsonl")
    bad = tmp_path / "metrics.jsonl"
    bad.write_text('{"step": 1}\n{"step": 2, "train/lo\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(bad)


def test_unknown_tracker_without_accelerator_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="report_to"):
        build_sinks(tmp_path, ["jsonl", "wandb"])
