"""Symmetric Gram matrices ``X^T X`` as the covariance instrument accumulates them, in a chosen precision.

A Gram matrix is symmetric, so only its upper block triangle is computed: the columns are cut into
``b`` blocks (:func:`gram_bounds`) and block row ``i`` is ``X[:, i]^T X[:, i:]``, which costs
``(b + 1) / (2 b)`` of the full product (0.625 for 4 blocks). Accumulators hold the upper triangle
(anything below the diagonal is never read); :func:`symmetric` mirrors it.

Precision (``instruments.gram_precision``) says how the products ``x_i x_j`` are formed; the sums are
always accumulated in the statistics' dtype:

* ``"fp32"``: in ``X``'s own dtype (fp32 or fp64): exact to that dtype. The default.
* ``"tf32"``: on CUDA, fp32 GEMMs on tensor cores with TF32 inputs (10-bit mantissa, fp32
  accumulation), enabled for these products only (``torch.set_float32_matmul_precision("high")``
  around them, restored after). Elsewhere TF32 does not exist and the products are fp32 (identical
  to ``"fp32"``).
* ``"bf16"``: inputs rounded to bfloat16 (8-bit mantissa), products summed in fp32. On CUDA a
  bf16 GEMM with fp32 output (``torch.mm(..., out_dtype=torch.float32)``, tensor cores); elsewhere
  the rounded inputs are multiplied in fp32, which gives the same numbers without the speed (a
  bf16 x bf16 product is exact in fp32), so the error can be measured on CPU.

Rounding the inputs perturbs each entry of ``X^T X / N`` by about ``u * |x_i| |x_j|`` per token
(``u`` = 2^-11 for TF32, 2^-9 for bf16) with random signs, so the relative error of the mean falls
like ``u / sqrt(N)`` for diagonal-dominated matrices: far below the sampling error of a covariance
estimated from ``N`` tokens (about ``1/sqrt(N)``). ``benchmarks/bench_instruments.py --gram-error``
measures both.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor

GRAM_PRECISIONS = ("fp32", "tf32", "bf16")

Blocks = list[tuple[tuple[int, int], Tensor]]


def gram_bounds(n: int) -> list[tuple[int, int]]:
    """Column blocks for a Gram matrix of width ``n``: up to 4 blocks of >= 64 columns. More, thinner
    blocks save flops but lose GEMM efficiency (measured on CPU, n = 128 ... 1024)."""
    b = max(1, min(4, n // 64))
    edges = [round(i * n / b) for i in range(b + 1)]
    return list(zip(edges[:-1], edges[1:]))


def symmetric(upper: Tensor, chunk: int = 512) -> Tensor:
    """The full symmetric matrix whose upper triangle (diagonal included) is ``upper``'s; anything
    below the diagonal is ignored. A new tensor, built ``chunk`` columns at a time so that nothing but
    the result is as large as ``upper`` (``triu(U) + triu(U, 1)^T`` at once would hold three such)."""
    out = torch.triu(upper)
    for c0 in range(0, upper.shape[1], chunk):
        c1 = min(upper.shape[1], c0 + chunk)
        # entry (i, j) of the slice is (i, c0 + j) of ``upper``: above the diagonal where j - i >= 1 - c0
        out[c0:c1] += torch.triu(upper[:, c0:c1], diagonal=1 - c0).T  # columns c0:c1 above the diagonal, mirrored
    return out


def block_upper(acc: Tensor) -> Tensor:
    """Zero, in place, what lies below the diagonal blocks of ``acc`` (n, n): the layout :class:`Gram`
    accumulates into (full diagonal blocks, upper off-diagonal blocks), which
    :func:`symmetric_matmul` relies on. Returns ``acc``."""
    for r0, r1 in gram_bounds(acc.shape[0]):
        acc[r1:, r0:r1] = 0
    return acc


def symmetric_matmul(acc: Tensor, X: Tensor) -> Tensor:
    """``S X`` for the symmetric ``S`` whose upper block triangle ``acc`` holds (:func:`block_upper`
    layout), without forming ``S``: ``acc X + acc^T X`` counts the diagonal blocks twice, so one of them
    is taken off. ``X`` (n, j) in ``acc``'s dtype."""
    out = acc @ X + acc.T @ X
    for r0, r1 in gram_bounds(acc.shape[0]):
        out[r0:r1] -= acc[r0:r1, r0:r1] @ X[r0:r1]
    return out


def symmetric_fro2(acc: Tensor) -> Tensor:
    """``‖S‖_F²`` of that ``S``: twice the upper off-diagonal blocks' energy plus the diagonal blocks'."""
    diagonal = sum(acc[r0:r1, r0:r1].double().square().sum() for r0, r1 in gram_bounds(acc.shape[0]))
    return 2 * acc.double().square().sum() - diagonal


@contextlib.contextmanager
def _tf32_matmuls() -> Iterator[None]:
    """TF32 tensor cores for the fp32 matmuls inside the block (CUDA), the user's setting restored."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


class Gram:
    """Upper-block-triangle Gram products in one precision mode (see the module docstring).

    ``blocks(X)`` returns the new blocks (for the forward side, where the sums wait for backward);
    ``accumulate(acc, X)`` adds ``X^T X`` into the upper triangle of ``acc`` in place. ``X`` is
    ``(N, n)`` in the accumulation dtype; the result is in that dtype.
    """

    def __init__(self, precision: str = "fp32") -> None:
        if precision not in GRAM_PRECISIONS:
            raise ValueError(f"instruments.gram_precision must be one of {list(GRAM_PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self._warned = False

    def _context(self, x: Tensor):
        if self.precision == "tf32" and x.is_cuda and x.dtype == torch.float32:
            return _tf32_matmuls()
        return contextlib.nullcontext()

    def _operand(self, x: Tensor) -> Tensor:
        """``x`` as the GEMM reads it: rounded to bf16 in ``"bf16"`` mode (kept bf16 on CUDA, where the
        GEMM takes bf16 inputs; widened back to ``x``'s dtype elsewhere, which is exact)."""
        if self.precision != "bf16":
            return x
        rounded = x.to(torch.bfloat16)
        return rounded if x.is_cuda else rounded.to(x.dtype)

    def _product(self, left: Tensor, right: Tensor, out_dtype: torch.dtype) -> Tensor:
        if left.dtype != torch.bfloat16:
            return left @ right
        try:  # CUDA bf16 mode: tensor cores, fp32 output (torch >= 2.8)
            return torch.mm(left, right, out_dtype=out_dtype)
        except (RuntimeError, TypeError) as err:  # a torch without it: same numbers, fp32 speed
            if not self._warned:
                warnings.warn(f"gram_precision='bf16': torch.mm(..., out_dtype=float32) failed ({err}); "
                              "computing the bf16-rounded products in fp32 instead (same values, no speed-up)",
                              stacklevel=2)
                self._warned = True
            return left.to(out_dtype) @ right.to(out_dtype)

    def blocks(self, x: Tensor) -> Blocks:
        """``[((r0, r1), X[:, r0:r1]^T X[:, r0:])]`` for the blocks of :func:`gram_bounds`."""
        op = self._operand(x)
        with self._context(x):
            return [((r0, r1), self._product(op[:, r0:r1].T, op[:, r0:], x.dtype))
                    for r0, r1 in gram_bounds(x.shape[1])]

    def accumulate(self, acc: Tensor, x: Tensor) -> None:
        """``acc += X^T X`` on the upper block triangle, in place."""
        op = self._operand(x)
        with self._context(x):
            for r0, r1 in gram_bounds(x.shape[1]):
                if op.dtype == torch.bfloat16:
                    acc[r0:r1, r0:].add_(self._product(op[:, r0:r1].T, op[:, r0:], acc.dtype))
                else:
                    acc[r0:r1, r0:].addmm_(op[:, r0:r1].T, op[:, r0:])
