"""CUDA checks (skipped without a GPU; CI has none): the whole pipeline under bf16 on the GPU, and
the instruments' statistics on the GPU equal the CPU's. The bodies live in tests/gpu_checks.py and
run on the CPU in tests/e2e/test_gpu_checks_on_cpu.py, so they are exercised on every CI run.

Run on a GPU machine: ``pytest -m gpu -q`` (or ``bash benchmarks/gpu_check.sh``)."""

from __future__ import annotations

import pytest
import torch

from tests import gpu_checks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_cuda_statistics_match_cpu():
    assert gpu_checks.check_statistics_match_cpu("cuda") == len(gpu_checks.expected_state_keys())


def test_instruments_issue_no_host_sync():
    gpu_checks.check_no_host_sync("cuda")


def test_gram_precision_on_tensor_cores():
    gpu_checks.check_gram_precision("cuda")


@pytest.fixture(scope="module")
def pretrained_bf16(tmp_path_factory):
    return gpu_checks.check_ce_pretraining_bf16(tmp_path_factory.mktemp("ce_bf16"), steps=30)


def test_ce_pretraining_under_bf16_autocast(pretrained_bf16):
    assert (pretrained_bf16 / "model.safetensors").is_file()


def test_graded_loop_under_bf16_autocast(pretrained_bf16, tmp_path):
    gpu_checks.check_graded_loop_bf16(tmp_path, pretrained_bf16, steps=6)


def test_trl_dpo_with_lora_under_bf16(tmp_path):
    gpu_checks.check_trl_dpo_lora(tmp_path, steps=4)
