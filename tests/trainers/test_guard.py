"""The divergence guard: non-finite losses, gradients or statistics stop the run at once (or skip the
step) and never reach the weights, the statistics or a checkpoint; a dead model is stopped."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import weightgeom.trainers.ce
from tests.conftest import count_host_reads, make_model
from weightgeom.core.config import load_config
from weightgeom.core.sinks import read_metrics
from weightgeom.harness.cli import main
from weightgeom.trainers.ce import pretrain
from weightgeom.trainers.guard import DivergenceError, DivergenceGuard, gradient_norm, nonfinite_grads
from weightgeom.trainers.trl_dpo import GuardCallback


def corpus(directory: Path) -> Path:
    import sysconfig  # noqa: PLC0415

    path = directory / "corpus"  # two documents: the held-out split is by document
    path.mkdir(exist_ok=True)
    for name in ("textwrap.py", "bisect.py", "colorsys.py", "shlex.py"):
        (path / f"{name}.txt").write_text((Path(sysconfig.get_paths()["stdlib"]) / name).read_text())
    return path


def overrides(tmp_path: Path, cache: Path, *extra: str) -> list[str]:
    return [f"output_dir={tmp_path}", f"tokenizer.cache_dir={cache}", f"data.source={corpus(tmp_path)}",
            "tokenizer.vocab_size=512", "model.hidden_size=32", "data.seq_len=32", "data.max_tokens=20000",
            "train.batch_size=4", "train.log_every=1", "train.eval_every=0", "instruments.every_n=2",
            "instruments.zscores=false", "instruments.log_spaced=false", "stages=[pretrain]", *extra]


def all_finite(tensors: dict) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


# ----- the guard itself -------------------------------------------------------------------------------
def test_guard_stops_skips_and_detects_a_dead_model():
    model = make_model("llama")
    model(input_ids=torch.tensor([[3, 4, 5]])).logits.sum().backward()
    assert nonfinite_grads(model) == [] and math.isfinite(gradient_norm(model))
    model.model.layers[1].mlp.down_proj.weight.grad[0, 0] = float("nan")
    assert nonfinite_grads(model) == ["model.layers.1.mlp.down_proj.weight"]
    assert math.isnan(gradient_norm(model))

    with pytest.raises(DivergenceError, match=r"step 7: non-finite gradient norm.*model\.layers\.1\.mlp\.down_proj"):
        DivergenceGuard("stop").check(7, grad_norm=float("nan"), model=model)
    with pytest.raises(DivergenceError, match="non-finite loss"):
        DivergenceGuard("stop").check(1, grad_norm=1.0, loss_finite=False)

    skip = DivergenceGuard("skip", patience=3)
    assert skip.check(1, grad_norm=float("inf")) is False
    assert skip.check(2, grad_norm=1.0) is True  # a good step resets the run of skips
    assert skip.check(3, grad_norm=float("nan")) is False and skip.check(4, grad_norm=float("nan")) is False
    with pytest.raises(DivergenceError, match="3 consecutive steps"):
        skip.check(5, grad_norm=float("nan"))
    assert skip.skipped == 4

    dead = DivergenceGuard("stop", patience=3)
    assert dead.check(1, grad_norm=0.0) and dead.check(2, grad_norm=0.0)
    with pytest.raises(DivergenceError, match="exactly zero for 3 consecutive steps"):
        dead.check(3, grad_norm=0.0)
    assert DivergenceGuard("stop", patience=0).check(1, grad_norm=0.0)  # 0 disables the stall check


def test_trl_guard_callback_raises_before_the_optimizer_step():
    class State:
        global_step, max_steps = 4, 10

    model = make_model("llama")
    model(input_ids=torch.tensor([[3, 4, 5]])).logits.sum().backward()
    callback = GuardCallback(DivergenceGuard("stop", phase="align/dpo"))
    callback.on_pre_optimizer_step(None, State(), None, model=model)  # finite: nothing happens
    model.lm_head.weight.grad.fill_(float("inf"))
    with pytest.raises(DivergenceError, match=r"align/dpo diverged at step 5.*lm_head\.weight"):
        callback.on_pre_optimizer_step(None, State(), None, model=model)


# ----- whole runs ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_nan_stops_the_run_before_anything_nonfinite_is_written(tmp_path, tokenizer_cache, capsys):
    """train.lr=1e30: NaN from step 2. Before the guard: 148 NaN steps, a NaN checkpoint, then a
    crash inside linalg.eigh while writing the report."""
    args = overrides(tmp_path, tokenizer_cache, "name=nan", "train.lr=1e30", "train.steps=20", "train.save_every=1")
    assert main(["run", "ce_tiny", *args, "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert "harness: stopped: pretrain diverged at step 2: non-finite" in err and "Traceback" not in err
    assert "the first: model." in err  # names the first offending parameter
    run = tmp_path / "nan"
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1]  # the bad step logged nothing
    assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    ckpts = sorted((run / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step_0000001"]
    for name in ("model.safetensors", "instruments.safetensors"):
        assert all_finite(load_file(str(ckpts[0] / name))), name
    assert not (run / "report").exists()


@pytest.mark.slow
def test_dead_model_is_stopped(tmp_path, tokenizer_cache):
    """train.lr=1e3 at hidden 64: the loss explodes, then sits at exactly ln(vocab) with a zero
    gradient (before the guard: 140 such steps, exit 0, a report of a dead model)."""
    cfg = load_config("recipes/ce_tiny.yaml", overrides(tmp_path, tokenizer_cache, "name=dead", "model.hidden_size=64",
                                                          "train.lr=1e3", "train.steps=40", "train.stall_patience=5"))
    with pytest.raises(DivergenceError, match="exactly zero for 5 consecutive steps") as err:
        pretrain(cfg, progress=False)
    rows = read_metrics(cfg.run_dir / "metrics.jsonl")
    assert rows[-1]["step"] == err.value.step - 1 < 40
    dead = [r for r in rows if r["train/grad_norm"] == 0.0]
    assert len(dead) == 4 and all(r["train/loss"] == pytest.approx(math.log(512), abs=1e-3) for r in dead)
    assert not (cfg.run_dir / "checkpoints").exists()  # save_every=0: only a final one, never reached


@pytest.mark.slow
def test_skip_mode_drops_the_step_and_its_statistics(tmp_path, tokenizer_cache, monkeypatch, capsys):
    """on_nonfinite=skip: a NaN loss at step 3 skips that update, and the covariance sums that the
    step's backward had already accumulated are rolled back (else they would be NaN)."""
    real = weightgeom.trainers.ce.lm_loss_sum
    calls = {"train": 0}

    def nan_at_step_3(model, ids):
        loss, n = real(model, ids)
        if torch.is_grad_enabled():
            calls["train"] += 1
            if calls["train"] == 3:
                loss = loss * float("nan")
        return loss, n

    monkeypatch.setattr(weightgeom.trainers.ce, "lm_loss_sum", nan_at_step_3)
    cfg = load_config("recipes/ce_tiny.yaml", overrides(tmp_path, tokenizer_cache, "name=skip", "train.steps=6",
                                                          "train.on_nonfinite=skip"))
    result = pretrain(cfg, progress=False)
    assert "step 3: non-finite loss" in capsys.readouterr().err
    rows = {r["step"]: r for r in read_metrics(result.run_dir / "metrics.jsonl")}
    assert math.isnan(rows[3]["train/grad_norm"]) and math.isfinite(rows[4]["train/grad_norm"])
    state = load_file(str(result.checkpoint / "instruments.safetensors"))
    assert all_finite(state) and all_finite(load_file(str(result.checkpoint / "model.safetensors")))
    assert int(state["cov_in/L0/attn_in/count"]) == 5 * 4 * 32  # 5 applied steps x 4 blocks x 32 tokens
    assert int(state["weights/steps"]) == 5


@pytest.mark.slow
def test_nonfinite_statistics_stop_the_run_with_finite_loss_and_gradients(tmp_path, tokenizer_cache, monkeypatch):
    """Covariance sums can overflow while the loss and the gradients stay finite: the run stops at that
    step, names the sum, and no metric or checkpoint holds it."""
    from weightgeom.hooks.covariance import CovarianceInstrument  # noqa: PLC0415

    add_output, calls = CovarianceInstrument._add_output, []

    def overflowing(self, key, d, count):
        add_output(self, key, d, count)
        calls.append(key)
        if key == "L1/down" and calls.count(key) == 3:  # the third micro-batch: step 3 (grad_accum 1)
            self.sums_out[key][0][0, 0] = math.inf

    monkeypatch.setattr(CovarianceInstrument, "_add_output", overflowing)
    cfg = load_config("recipes/ce_tiny.yaml", overrides(tmp_path, tokenizer_cache, "name=stats", "train.steps=6",
                                                          "train.save_every=1"))
    with pytest.raises(DivergenceError, match=r"diverged at step 3: the instruments' statistics are not finite "
                                              r"\(cov_out/L1/down\)") as err:
        pretrain(cfg, progress=False)
    assert err.value.step == 3
    rows = read_metrics(cfg.run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["train/loss"]) and math.isfinite(r["train/grad_norm"]) for r in rows)
    ckpts = sorted(p.name for p in (cfg.run_dir / "checkpoints").iterdir())
    assert ckpts == ["step_0000001", "step_0000002"]
    assert all_finite(load_file(str(cfg.run_dir / "checkpoints" / ckpts[-1] / "instruments.safetensors")))


@pytest.mark.slow
def test_the_loop_reads_the_device_once_per_step_and_once_per_logged_row(tmp_path, tokenizer_cache, monkeypatch):
    """On a GPU every read of a tensor's value on the host (``item``, ``tolist``, ``float``, ``bool``)
    drains the launch queue. The training loop needs one per optimizer step (the guard's decision:
    gradient norm, loss and statistics finite, in one read), one per logged loss and one per held-out
    evaluation; none per micro-batch. Counted here on the CPU by the caller's file."""
    reads = count_host_reads(monkeypatch, "trainers/session.py", "trainers/ce.py")
    steps = 6
    cfg = load_config("recipes/ce_tiny.yaml", overrides(tmp_path, tokenizer_cache, "name=reads", f"train.steps={steps}",
                                                          "train.grad_accum=2", "train.log_every=3"))
    pretrain(cfg, progress=False)
    monkeypatch.undo()
    rows = read_metrics(cfg.run_dir / "metrics.jsonl")
    logged, evaluated = [r for r in rows if "train/loss" in r], [r for r in rows if "eval/loss" in r]
    assert 0 < len(logged) < steps and len(evaluated) == 1  # eval_every=0: the last step only
    assert reads == {"trainers/session.py": steps, "trainers/ce.py": len(logged) + len(evaluated)}
