"""Trackers other than JSONL / TensorBoard, each run offline, where its package is installed
(`pip install wandb mlflow-skinny`); skipped otherwise. Rows reach the tracker with the same keys."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from weightgeom import recipes
from weightgeom.core.config import load_config
from weightgeom.core.sinks import read_metrics
from weightgeom.trainers.ce import pretrain

pytestmark = pytest.mark.slow


def tiny_run(tmp_path: Path, cache: Path, tracker: str):
    corpus = tmp_path / "corpus"  # two documents: the held-out split is by document
    corpus.mkdir()
    for name in ("textwrap.py", "bisect.py", "colorsys.py", "shlex.py"):
        (corpus / f"{name}.txt").write_text((Path(sysconfig.get_paths()["stdlib"]) / name).read_text())
    cfg = load_config(recipes.bundled()["ce_tiny"], [
        f"output_dir={tmp_path}", f"name=with_{tracker}", f"tokenizer.cache_dir={cache}", "tokenizer.vocab_size=512",
        f"data.source={corpus}", "model.hidden_size=32", "data.seq_len=32", "train.batch_size=4", "train.steps=4",
        "train.log_every=1", "train.eval_every=0", "instruments.every_n=2", "instruments.zscores=false",
        "instruments.log_spaced=false", f"tracking.report_to=[jsonl, {tracker}]"])
    result = pretrain(cfg, progress=False)
    return result, read_metrics(result.run_dir / "metrics.jsonl")


def test_wandb_offline(tmp_path, tokenizer_cache, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    _, rows = tiny_run(tmp_path, tokenizer_cache, "wandb")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))  # the run's log, for `wandb sync`
    log = next(runs[0].glob("*.wandb")).read_bytes()  # protobuf records, keys stored as plain UTF-8
    assert log.count(b"train/loss") >= sum("train/loss" in r for r in rows) == 4
    assert b"rsf_in/L0/q" in log and b"train.steps" in log  # geometry rows and the config's keys


def test_mlflow_offline(tmp_path, tokenizer_cache, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow >= 3.1x: the file store needs an opt-in
    result, rows = tiny_run(tmp_path, tokenizer_cache, "mlflow")
    mlflow.set_tracking_uri(f"file:{tmp_path / 'mlruns'}")
    client = mlflow.tracking.MlflowClient()
    experiment = client.get_experiment_by_name("with_mlflow")  # the run's name
    (run,) = client.search_runs([experiment.experiment_id])
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]
    assert losses == pytest.approx([r["train/loss"] for r in rows if "train/loss" in r])
    assert run.data.params["train.steps"] == "4"
    assert "rsf_in/L0/q" in run.data.metrics
