"""weightgeom.hooks.gram: upper-block-triangle Gram products in fp32 / tf32 / bf16, against dense float64 math,
and the suite's ``gram_precision`` option end to end (on CPU; tests/e2e/test_gpu.py repeats it on CUDA)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_batch, make_model, token_loss_sum
from weightgeom.hooks.gram import (
    Gram,
    _tf32_matmuls,
    block_upper,
    gram_bounds,
    symmetric,
    symmetric_fro2,
    symmetric_matmul,
)
from weightgeom.hooks.suite import InstrumentSuite, SuiteConfig

BF16_UNIT = 2.0 ** -8  # bf16 unit roundoff: 8 significand bits (7 stored), rounding to nearest


def _data(n_rows: int = 300, n: int = 200, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # a spiked, offset distribution like a residual stream: one strong direction plus noise
    spike = torch.randn(n, generator=g)
    return torch.randn(n_rows, 1, generator=g) * spike * 3 + torch.randn(n_rows, n, generator=g) + 0.5


def _full(gram: Gram, x: torch.Tensor) -> torch.Tensor:
    acc = torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype)
    gram.accumulate(acc, x)
    return symmetric(acc)


def _from_blocks(gram: Gram, x: torch.Tensor) -> torch.Tensor:
    acc = torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype)
    for (r0, r1), block in gram.blocks(x):
        acc[r0:r1, r0:] += block
    return symmetric(acc)


def test_bounds_cover_the_columns_once():
    for n in (1, 63, 64, 130, 200, 1024):
        bounds = gram_bounds(n)
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert 1 <= len(bounds) <= 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fp32_mode_is_the_dense_product(dtype):
    x = _data().to(dtype)
    expected = x.double().T @ x.double()
    for result in (_full(Gram("fp32"), x), _from_blocks(Gram("fp32"), x)):
        assert result.dtype == dtype
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        assert ((result.double() - expected).norm() / expected.norm()) < tol


def test_tf32_on_cpu_is_fp32():
    """TF32 exists on CUDA tensor cores only: on CPU the mode must give the fp32 numbers exactly."""
    x = _data()
    assert torch.equal(_full(Gram("tf32"), x), _full(Gram("fp32"), x))
    assert torch.equal(_from_blocks(Gram("tf32"), x), _from_blocks(Gram("fp32"), x))


def test_tf32_switch_is_scoped_and_restores_the_users_setting():
    """The TF32 switch (used around the CUDA products) holds inside its block only, also on error."""
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        with _tf32_matmuls():
            assert torch.get_float32_matmul_precision() == "high"
        assert torch.get_float32_matmul_precision() == "highest"
        with pytest.raises(RuntimeError, match="boom"), _tf32_matmuls():
            raise RuntimeError("boom")
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)


def test_bf16_mode_rounds_inputs_and_sums_in_fp32():
    """bf16 mode = the products of bf16-rounded inputs summed in fp32 (what a tensor-core GEMM with
    fp32 accumulation computes), within the rigorous bound ``2u |X|^T |X|`` of the exact Gram."""
    x = _data()
    rounded = x.to(torch.bfloat16).double()
    exact = x.double().T @ x.double()
    for result in (_full(Gram("bf16"), x), _from_blocks(Gram("bf16"), x)):
        assert result.dtype == torch.float32
        # the bf16-rounded inputs' product, summed at fp32 accuracy
        torch.testing.assert_close(result.double(), rounded.T @ rounded, rtol=1e-5, atol=1e-4)
        err = (result.double() - exact).abs()
        bound = 2.1 * BF16_UNIT * (x.double().abs().T @ x.double().abs())  # 2u(1+u) + fp32 summation slack
        assert bool((err <= bound).all())
        assert err.max() > 0  # the inputs really were rounded (this test can fail)


def test_unknown_precision_is_refused_with_the_field_name():
    with pytest.raises(ValueError, match="gram_precision"):
        Gram("fp16")
    with pytest.raises(ValueError, match="instruments.gram_precision"):
        SuiteConfig(gram_precision="fp8")
    with pytest.raises(ValueError, match="instruments.dtype float32"):
        SuiteConfig(gram_precision="bf16", dtype="float64")


def suite_statistics(precision: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Covariance state of the tiny llama after two SGD steps with ``gram_precision=precision``."""
    model = make_model("llama").to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    suite = InstrumentSuite(model, k=4, every_n=10**6, zscores=False, gram_precision=precision)
    with suite.attached(model, opt):
        for step, seed in enumerate((1, 2), 1):
            batch = {k: v.to(device) for k, v in make_batch(seed=seed).items()}
            opt.zero_grad()
            loss, n = token_loss_sum(model, batch)
            suite.set_loss_normalizer(n)
            (loss / n).backward()
            opt.step()
            suite.after_optimizer_step(step)
    return {k: v.cpu() for k, v in suite.cov.state_dict().items() if k.endswith(("sum_outer", "count"))}


def gram_precision_errors(device: str = "cpu") -> dict[str, float]:
    """Largest relative Frobenius difference of any ``sum_outer`` from the fp32 run, per mode."""
    ref = suite_statistics("fp32", device)
    out = {}
    for precision in ("tf32", "bf16"):
        other = suite_statistics(precision, device)
        assert other.keys() == ref.keys()
        for key in ref:
            if key.endswith("count"):
                assert torch.equal(other[key], ref[key]), key
        out[precision] = max(float((other[k] - ref[k]).norm() / ref[k].norm()) for k in ref if k.endswith("sum_outer"))
    return out


def test_suite_gram_precision_on_cpu():
    errors = gram_precision_errors("cpu")
    assert errors["tf32"] == 0.0  # no TF32 on CPU: fp32 numbers
    assert 0.0 < errors["bf16"] < 1e-2  # measured 1.5e-3 at 54 tokens per statistic


@pytest.mark.parametrize("n", [48, 130, 300])
def test_symmetric_products_read_the_accumulated_upper_blocks_without_forming_the_matrix(n):
    """What Gram.accumulate leaves (full diagonal blocks, upper off-diagonal blocks, zeros below) and what a
    restored state is cut back to (block_upper of a whole symmetric matrix) give S X and ‖S‖_F² of S."""
    g = torch.Generator().manual_seed(n)
    X = torch.randn(64, n, generator=g, dtype=torch.float64)
    acc = torch.zeros(n, n, dtype=torch.float64)
    Gram("fp32").accumulate(acc, X)
    S = X.T @ X
    restored = block_upper(S.clone())
    V = torch.randn(n, 5, generator=g, dtype=torch.float64)
    for upper in (acc, restored):
        torch.testing.assert_close(symmetric_matmul(upper, V), S @ V)
        torch.testing.assert_close(symmetric_fro2(upper), S.square().sum())
        torch.testing.assert_close(symmetric(upper), S)
        for chunk in (16, 100):  # mirrored a few columns at a time, as wide matrices are (past the first chunk too)
            torch.testing.assert_close(symmetric(upper, chunk=chunk), S)
