"""The top-k eigensolver against torch.linalg.eigh: the subspace it returns, the bound it reports on
that subspace's error, warm starts, and a gap too small to pin anything."""

from __future__ import annotations

import pytest
import torch

from weightgeom.hooks import eigensolver as eig


def spiked(n: int, values: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    return (Q * values) @ Q.T


def power_law(n: int, decay: float) -> torch.Tensor:
    return torch.tensor([10.0 / (i + 1) ** decay for i in range(n)], dtype=torch.float64)


def sin_largest_angle(A: torch.Tensor, B: torch.Tensor) -> float:
    """sin of the largest principal angle between span(A) and span(B) (orthonormal columns)."""
    return float(torch.linalg.matrix_norm(A - B @ (B.T @ A), ord=2))


@pytest.mark.parametrize("n,decay", [(64, 0.5), (200, 1.0), (300, 0.3)])
def test_top_k_subspace_and_values_match_eigh_and_the_bound_holds(n, decay):
    C = spiked(n, power_law(n, decay))
    k = 8
    top = eig.top_eigenpairs(lambda X: C @ X, n, k, device=C.device)
    full = eig.full_eigenpairs(C, k)
    true = sin_largest_angle(top.top(k), full.top(k))
    assert true <= float(top.error)  # the bound bounds
    assert float(top.error) < 1e-6
    torch.testing.assert_close(top.values[: k + 1], full.values[: k + 1], rtol=1e-10, atol=0)
    assert not top.full and full.full and full.values.shape == (n,)


def test_a_warm_start_from_a_nearby_matrix_takes_fewer_products():
    n, k = 400, 8
    C = spiked(n, power_law(n, 0.4))
    cold = eig.top_eigenpairs(lambda X: C @ X, n, k, device=C.device)
    nudged = C + 1e-4 * spiked(n, torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1)), 2)
    again = eig.top_eigenpairs(lambda X: nudged @ X, n, k, device=C.device, warm=cold.vectors)
    fresh = eig.top_eigenpairs(lambda X: nudged @ X, n, k, device=C.device)
    assert again.iterations < fresh.iterations, (again.iterations, fresh.iterations)
    assert float(again.error) < 1e-6


def test_a_degenerate_gap_says_the_subspace_is_not_pinned():
    """l_k == l_{k+1}: which k of the tied directions are the top k is arbitrary, for eigh as for the
    solver; both bounds say so (at or above 1), where a clear gap gives a bound near 0."""
    n, k = 100, 4
    values = torch.cat([torch.tensor([9.0, 8.0, 7.0, 5.0, 5.0]), torch.linspace(1.0, 0.1, n - 5)]).double()
    C = spiked(n, values)
    assert float(eig.full_eigenpairs(C, k).error) >= 1.0
    assert float(eig.top_eigenpairs(lambda X: C @ X, n, k, device=C.device).error) >= 1.0
    assert float(eig.full_eigenpairs(C, 3).error) < 1e-10


def test_full_eigenpairs_is_eigh_descending_and_clipped():
    C = spiked(50, torch.cat([power_law(49, 1.0), torch.tensor([-1e-18], dtype=torch.float64)]))
    full = eig.full_eigenpairs(C, 4)
    assert torch.all(full.values[:-1] >= full.values[1:]) and float(full.values.min()) >= 0
    torch.testing.assert_close(full.values[:5], torch.linalg.eigvalsh(C).flip(0)[:5].clamp_min(0))


def test_k_out_of_range_is_an_error():
    with pytest.raises(ValueError, match=r"k must be in \[1, 9\]"):
        eig.top_eigenpairs(lambda X: X, 10, 10, device=torch.device("cpu"))
