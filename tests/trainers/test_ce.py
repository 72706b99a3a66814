"""The CE pretraining recipe end to end: loss falls, files stream, resume is exact, bad input fails clean."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from weightgeom.core.config import ConfigError, load_config
from weightgeom.core.sinks import read_metrics, read_tensorboard_scalars
from weightgeom.harness.pipeline import run_recipe
from weightgeom.trainers.ce import pretrain

pytestmark = pytest.mark.slow


def tiny_cfg(tmp_path: Path, cache: Path, *extra: str):
    return load_config("recipes/ce_tiny.yaml", [
        f"output_dir={tmp_path}", f"tokenizer.cache_dir={cache}", "tokenizer.vocab_size=512",
        "model.hidden_size=32", "data.seq_len=32", "data.max_tokens=40000", "train.steps=40",
        "train.batch_size=8", "train.log_every=5", "train.eval_every=20", "instruments.every_n=10",
        "instruments.log_spaced=false", *extra])


@pytest.fixture(scope="session")
def cache_dir(tokenizer_cache):
    return tokenizer_cache


def test_recipe_trains_streams_and_reports(tmp_path, cache_dir):
    cfg = tiny_cfg(tmp_path, cache_dir)
    run_dir = run_recipe(cfg, progress=False)
    rows = read_metrics(run_dir / "metrics.jsonl")
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses[-1] < losses[0] - 0.5, losses
    geometry = [r for r in rows if "rsf_in/L0/q" in r]
    assert [r["step"] for r in geometry] == [10, 20, 30, 40]
    for key in ("rsf_in/L1/q", "rsf_out_pred/L0/o", "rsf_out_delta/L1/down", "z_in/L0/k", "gap_in/L0/up",
                "spike_in/L0/attn_in/top1", "coherence/L1/down", "rsf_in_frozen/L0/q", "rsf_in_update/L0/v",
                "rsf_in_grad/L0/v", "rsf_in/all/q"):
        assert isinstance(geometry[-1][key], float), key
    scalars = read_tensorboard_scalars(run_dir / "tb")
    assert [s for s, _ in scalars["train/loss"]] == [r["step"] for r in rows if "train/loss" in r]
    snap = load_file(str(run_dir / "instruments" / "step_0000040.safetensors"))
    assert snap["cov_in/L0/attn_in/sum_outer"].shape == (32, 32)
    assert int(snap["cov_in/L0/attn_in/count"]) == 40 * 8 * 32  # every token of every step
    assert (run_dir / "checkpoints" / "step_0000040" / "model.safetensors").is_file()
    report = (run_dir / "report" / "report.md").read_text()
    pngs = list((run_dir / "report").glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert "rsf_in" in report


def test_resume_matches_continuous_run(tmp_path, cache_dir):
    full = pretrain(tiny_cfg(tmp_path, cache_dir, "name=full", "train.steps=20"), progress=False)
    cut = tiny_cfg(tmp_path, cache_dir, "name=cut", "train.steps=20", "train.save_every=10")
    # stop at step 10: run the same recipe with a checkpoint at 10, then resume from it
    first = pretrain(cut, progress=False)
    ckpt10 = first.run_dir / "checkpoints" / "step_0000010"
    resumed = pretrain(cut, resume=ckpt10, progress=False)
    a = load_file(str(full.checkpoint / "model.safetensors"))
    b = load_file(str(resumed.checkpoint / "model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    sa = load_file(str(full.checkpoint / "instruments.safetensors"))
    sb = load_file(str(resumed.checkpoint / "instruments.safetensors"))
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)
    steps = [r["step"] for r in read_metrics(resumed.run_dir / "metrics.jsonl")]
    assert steps == sorted(set(steps)), "resumed metrics must not duplicate steps"


def test_bad_inputs_fail_clean(tmp_path, cache_dir):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: {hidden_size: 32\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(bad_yaml)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train: {stepz: 3}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.stepz'.*") as err:
        load_config(unknown)
    assert str(unknown) in str(err.value)

    out = tmp_path / "runs"
    cases = {
        "missing": [f"data.source={tmp_path / 'nope.txt'}"],
        "empty": [f"data.source={_write(tmp_path / 'empty.txt', '   ')}"],
        "noweights": [f"init_from={_model_dir_without_weights(tmp_path)}"],
    }
    for name, overrides in cases.items():
        cfg = tiny_cfg(out, cache_dir, f"name={name}", *overrides)
        with pytest.raises((FileNotFoundError, ValueError)):
            run_recipe(cfg, progress=False)
        assert not (out / name).exists(), f"{name}: run directory was created despite bad input"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _model_dir_without_weights(tmp_path: Path) -> Path:
    d = tmp_path / "model_no_weights"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    return d


def test_two_process_pretraining_matches_one_process(tmp_path, cache_dir):
    """torchrun with 2 CPU processes (gloo): the same global batches, so the same logged loss and the
    same instrument statistics (all-reduced) as one process."""
    import shutil  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    args = [f"output_dir={tmp_path}", f"tokenizer.cache_dir={cache_dir}", "stages=[pretrain]", "train.steps=10",
            "train.log_every=5", "instruments.every_n=5", "instruments.zscores=false", "--no-progress"]
    single = subprocess.run([sys.executable, "-m", "weightgeom", "run", "asymmetry_smoke", "name=one", *args],
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    # --standalone: a free port of its own (the default 29500 may be held by another job on the machine)
    multi = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "weightgeom", "run",
                            "asymmetry_smoke", "name=two", *args], capture_output=True, text=True, timeout=300)
    assert multi.returncode == 0, multi.stderr[-2000:]
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for key in ("train/loss", "rsf_in/all/q", "rsf_out_pred/all/o", "rsf_out_delta/all/down"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-3), key
    sa = load_file(str(tmp_path / "one" / "instruments" / "step_0000010.safetensors"))
    sb = load_file(str(tmp_path / "two" / "instruments" / "step_0000010.safetensors"))
    assert int(sb["cov_in/L0/attn_in/count"]) == int(sa["cov_in/L0/attn_in/count"])
    # Float32 sums over 2560 tokens in another order: an entry that cancels to ~1 inside a matrix whose
    # entries reach ~4e3 carries absolute noise of a few 1e-4, so the absolute tolerance scales with the matrix.
    scale = float(sa["cov_in/L1/mlp_in/sum_outer"].abs().max())
    torch.testing.assert_close(sb["cov_in/L1/mlp_in/sum_outer"], sa["cov_in/L1/mlp_in/sum_outer"], rtol=1e-4,
                               atol=max(1e-4, 1e-6 * scale))


def test_instruments_disabled_trains_without_measuring(tmp_path, cache_dir):
    """instruments.enabled: false gives the do-nothing suite: training and checkpoints as usual,
    no geometry rows, no instrument state anywhere."""
    result = pretrain(tiny_cfg(tmp_path, cache_dir, "instruments.enabled=false", "train.steps=10"), progress=False)
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert any("train/loss" in r for r in rows)
    assert not any(k.startswith(("rsf_", "z_", "spike_", "coherence/")) for r in rows for k in r)
    assert (result.checkpoint / "model.safetensors").is_file()
    assert not (result.checkpoint / "instruments.safetensors").exists()
    assert not (result.run_dir / "instruments").exists()
