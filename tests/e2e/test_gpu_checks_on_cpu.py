"""The GPU tests' bodies (tests/gpu_checks.py) run once on the CPU, with fewer steps: CI has no GPU,
so this is what keeps tests/e2e/test_gpu.py's code paths working between GPU sessions."""

from __future__ import annotations

import pytest

from tests import gpu_checks


def test_statistics_check_on_cpu():
    assert gpu_checks.check_statistics_match_cpu("cpu") == len(gpu_checks.expected_state_keys())


def test_host_sync_check_on_cpu():
    gpu_checks.check_no_host_sync("cpu")


def test_gram_precision_check_on_cpu():
    errors = gpu_checks.check_gram_precision("cpu")
    assert errors["tf32"] == 0.0


@pytest.mark.slow
def test_bf16_pipeline_checks_on_cpu(tmp_path):
    ckpt = gpu_checks.check_ce_pretraining_bf16(tmp_path / "ce", steps=6)
    gpu_checks.check_graded_loop_bf16(tmp_path / "graded", ckpt, steps=2)
    gpu_checks.check_trl_dpo_lora(tmp_path / "trl", steps=2)
