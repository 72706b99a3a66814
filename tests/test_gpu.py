"""CUDA checks (skipped without a GPU; CI has none): the instruments give the same statistics on
the GPU as on the CPU, and the CE pipeline runs under bf16 autocast with finite geometry."""

from __future__ import annotations

import math

import pytest
import torch

from core.config import load_config
from core.sinks import read_metrics
from hooks.suite import InstrumentSuite
from tests.conftest import make_batch, make_model, token_loss_sum
from trainers.ce import pretrain

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _state_after_steps(device: str) -> dict[str, torch.Tensor]:
    model = make_model("llama").to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    suite = InstrumentSuite(model, k=4, every_n=10**6, zscores=False)
    with suite.attached(model, opt):
        for seed in (1, 2):
            batch = {k: v.to(device) for k, v in make_batch(seed=seed).items()}
            loss, n = token_loss_sum(model, batch)
            suite.set_loss_normalizer(n)
            (loss / n).backward()
            opt.step()
            opt.zero_grad()
            suite.after_optimizer_step(seed)
    return {k: v.detach().cpu() for k, v in suite.state_dict().items()}


def test_cuda_statistics_match_cpu():
    cpu, gpu = _state_after_steps("cpu"), _state_after_steps("cuda")
    for key in cpu:
        if key.startswith(("cov_", "weights/")) and cpu[key].is_floating_point():
            torch.testing.assert_close(gpu[key], cpu[key], rtol=1e-3, atol=1e-5, msg=key)


def test_ce_pipeline_under_bf16_autocast(tmp_path):
    cfg = load_config("recipes/asymmetry_smoke.yaml", [
        f"output_dir={tmp_path}", f"tokenizer.cache_dir={tmp_path / 'tok'}", "stages=[pretrain]",
        "train.mixed_precision=bf16", "train.steps=30"])
    result = pretrain(cfg, tmp_path / "run", progress=False)
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses[-1] < losses[0]
    geometry = [r for r in rows if "rsf_in/all/q" in r][-1]
    assert all(math.isfinite(v) for k, v in geometry.items() if k.startswith(("rsf_", "z_")))
