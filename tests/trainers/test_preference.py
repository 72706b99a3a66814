"""Preference alignment, instrumented: the graded loop learns the embedded set, the instruments
count only the policy's tokens (never the reference pass), TRL + LoRA + real instruments agree."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import count_host_reads
from tests.gpu_checks import assert_policy_tokens_counted, check_trl_dpo_lora
from weightgeom.core.config import GradedObjective, LoraConfig, load_config
from weightgeom.core.stage_inputs import alignment_tokenizer, load_pairs, split_pairs
from weightgeom.trainers.ce import pretrain
from weightgeom.trainers.preference import align

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 2-layer model CE-pretrained for 40 steps on the embedded corpus, and its recipe."""
    root = tmp_path_factory.mktemp("pref")
    cfg = load_config("recipes/asymmetry_smoke.yaml", [
        f"output_dir={root}", f"tokenizer.cache_dir={root / 'tok'}", "train.steps=40", "instruments.enabled=false",
        "align.n_pairs=80", "align.train.steps=30", "align.train.batch_size=8", "align.train.lr=3e-3",
        "align.train.log_every=1", "align.train.warmup_steps=2", "align.beta=0.5", "instruments.every_n=10"])
    result = pretrain(cfg, root / "pretrain", progress=False)
    return cfg, result.checkpoint


def test_graded_dpo_learns_the_embedded_set_and_counts_policy_tokens_only(pretrained, tmp_path):
    cfg, ckpt = pretrained
    cfg.instruments.enabled = True
    tokenizer = alignment_tokenizer(cfg, ckpt)
    pairs, eval_pairs = split_pairs(load_pairs(cfg)[0], 0.1, cfg.seed)
    result = align(cfg, GradedObjective(name="g1", grade=1.0), ckpt, tmp_path / "g1",
                   tokenizer=tokenizer, pairs=pairs, eval_pairs=eval_pairs, progress=False)
    rows = [r for r in _rows(result.run_dir) if "pref/loss" in r]
    first, last = rows[:5], rows[-5:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "pref/loss") < mean(first, "pref/loss") - 0.1
    assert mean(last, "pref/accuracy") > mean(first, "pref/accuracy") + 0.2
    assert mean(last, "pref/accuracy") >= 0.8

    # The reference log-probs (and the eval passes) run under no_grad: the instruments count the
    # policy's non-pad tokens of chosen + rejected, step by step, and nothing else.
    assert_policy_tokens_counted(cfg, pairs, tokenizer, result.run_dir)


def test_trl_dpo_with_lora_and_real_instruments_ignores_the_reference_pass(tmp_path):
    """fp32 here; the same check under bf16 autocast runs in tests/e2e/test_gpu_checks_on_cpu.py and on GPUs."""
    check_trl_dpo_lora(tmp_path, steps=4, bf16=False)


def test_the_preference_loop_reads_the_device_once_per_step_and_once_per_logged_row(pretrained, tmp_path,
                                                                                      monkeypatch):
    """As the CE loop (tests/trainers/test_guard.py): the guard's one read per step, one per logged row
    (the pair-weighted pref/* sums come back together), none per micro-batch."""
    cfg, ckpt = pretrained
    cfg = copy.deepcopy(cfg)
    cfg.instruments.enabled = True
    cfg.align.train.steps, cfg.align.train.grad_accum, cfg.align.train.log_every = 6, 2, 4
    tokenizer = alignment_tokenizer(cfg, ckpt)
    pairs, _ = split_pairs(load_pairs(cfg)[0], 0.1, cfg.seed)
    reads = count_host_reads(monkeypatch, "trainers/session.py", "trainers/preference.py", "trainers/losses.py")
    result = align(cfg, GradedObjective(name="g05", grade=0.5), ckpt, tmp_path / "g05", tokenizer=tokenizer,
                   pairs=pairs, eval_pairs=[], progress=False)
    monkeypatch.undo()
    logged = [r for r in _rows(result.run_dir) if "pref/loss" in r]
    assert 0 < len(logged) < 6
    assert reads == {"trainers/session.py": 6, "trainers/preference.py": 0, "trainers/losses.py": len(logged)}


def _rows(run_dir):
    from weightgeom.core.sinks import read_metrics  # noqa: PLC0415

    return read_metrics(run_dir / "metrics.jsonl")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_alignment_resume_matches_continuous_run(pretrained, tmp_path, lora):
    cfg, ckpt = pretrained
    cfg = copy.deepcopy(cfg)
    cfg.instruments.enabled = True
    cfg.align.train.steps, cfg.align.train.save_every = 6, 3
    if lora:
        cfg.align.lora = LoraConfig(r=4, alpha=8)
    tokenizer = alignment_tokenizer(cfg, ckpt)
    pairs, eval_pairs = split_pairs(load_pairs(cfg)[0], 0.1, cfg.seed)
    objective = GradedObjective(name="g05", grade=0.5)
    kw = dict(tokenizer=tokenizer, pairs=pairs, eval_pairs=eval_pairs, progress=False)
    full = align(cfg, objective, ckpt, tmp_path / "full", **kw)
    cut = align(cfg, objective, ckpt, tmp_path / "cut", **kw)
    step3 = cut.run_dir / "checkpoints" / "step_0000003"
    assert (step3 / ("adapter_model.safetensors" if lora else "model.safetensors")).is_file()
    resumed = align(cfg, objective, ckpt, tmp_path / "cut", resume=step3, **kw)
    for name in ("model.safetensors", "instruments.safetensors"):
        a, b = load_file(str(full.checkpoint / name)), load_file(str(resumed.checkpoint / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    steps = [r["step"] for r in _rows(resumed.run_dir) if "pref/loss" in r]
    assert steps == sorted(set(steps)) == list(range(1, 7))
