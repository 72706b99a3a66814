"""weightgeom.hooks.geometry on planted problems and brute-force references (tiny float64 tensors)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from weightgeom.hooks import geometry as geo


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=torch.float64)


def orthonormal(dim: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.linalg.qr(randn(dim, k, seed=seed))[0]


def projector(B: torch.Tensor) -> torch.Tensor:
    return B @ B.T


def beta_sd(k: int, dim: int, other: int) -> float:
    """Std of the RSF of an iid Gaussian (other x dim) delta against a fixed k-subspace of R^dim.

    vec(dW) is isotropic in R^(other*dim) and the subspace is other*k-dimensional, so the RSF is
    Beta(a, b) with a = other*k/2, b = other*(dim-k)/2: mean k/dim, variance ab/((a+b)^2 (a+b+1)).
    """
    a, b = other * k / 2, other * (dim - k) / 2
    return math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))


# ----- eigendecompositions and covariances --------------------------------------------------------

def test_top_eigvecs_matches_numpy_eigh():
    X = randn(40, 6, seed=1)
    C = X.T @ X / 40 + 0.1 * torch.eye(6, dtype=torch.float64)
    U, evals = geo.top_eigvecs(C, 3)
    np_evals, np_evecs = np.linalg.eigh(C.numpy())
    np_evals, np_evecs = np_evals[::-1], np_evecs[:, ::-1]
    assert U.shape == (6, 3) and U.dtype == torch.float64
    np.testing.assert_allclose(evals.numpy(), np_evals, rtol=1e-10)
    # eigenvectors are defined up to sign: compare |cosines| and the spanned projector
    np.testing.assert_allclose(np.abs(np.sum(U.numpy() * np_evecs[:, :3], axis=0)), 1.0, atol=1e-8)
    np.testing.assert_allclose(projector(U).numpy(), np_evecs[:, :3] @ np_evecs[:, :3].T, atol=1e-8)


def test_sym_eigh_symmetrises_and_clips():
    A = randn(5, 5, seed=2)
    C = A @ A.T
    C[0, 1] += 1e-3  # slightly asymmetric, as accumulated fp32 sums are
    evals, evecs = geo.sym_eigh(C.float())
    reference = torch.linalg.eigvalsh((C + C.T) / 2).flip(0)
    torch.testing.assert_close(evals, reference.clamp_min(0), rtol=1e-5, atol=1e-5)
    assert torch.all(evals[:-1] >= evals[1:])
    rank_one = torch.outer(torch.ones(4), torch.ones(4))  # eigenvalues 4, 0, 0, 0 (+/- round-off)
    assert torch.all(geo.sym_eigh(rank_one)[0] >= 0)
    torch.testing.assert_close(evecs @ torch.diag(evals) @ evecs.T, (C + C.T).double() / 2, rtol=1e-5, atol=1e-4)


def test_covariance_from_sums_matches_torch_cov_and_gram():
    X = randn(50, 4, seed=3) + torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    sum_outer, sum_vec, count = X.T @ X, X.sum(0), torch.tensor(50.0)
    centered = geo.covariance_from_sums(sum_outer, sum_vec, count, centered=True)
    torch.testing.assert_close(centered, torch.cov(X.T, correction=0))
    uncentered = geo.covariance_from_sums(sum_outer.float(), sum_vec, 50)
    torch.testing.assert_close(uncentered, X.T @ X / 50, rtol=1e-6, atol=1e-6)
    assert uncentered.dtype == torch.float64


def test_covariance_from_sums_empty_and_bad_input():
    zeros = geo.covariance_from_sums(torch.zeros(3, 3), torch.zeros(3), 0, centered=True)
    assert torch.equal(zeros, torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="sum_vec"):
        geo.covariance_from_sums(torch.eye(3), None, 5, centered=True)
    with pytest.raises(ValueError, match="sum_vec"):
        geo.covariance_from_sums(torch.eye(3), torch.zeros(4), 5)


# ----- RSF ----------------------------------------------------------------------------------------

def test_rsf_matches_brute_force():
    dW, U, V = randn(5, 7, seed=4), orthonormal(7, 3, seed=5), orthonormal(5, 2, seed=6)
    total = sum(float(dW[i, j] ** 2) for i in range(5) for j in range(7))
    in_energy = sum(float(torch.dot(dW[i], U[:, c]) ** 2) for i in range(5) for c in range(3))
    out_energy = sum(float(torch.dot(V[:, c], dW[:, j]) ** 2) for j in range(7) for c in range(2))
    assert geo.rsf_in(dW, U) == pytest.approx(in_energy / total, rel=1e-12)
    assert geo.rsf_out(dW, V) == pytest.approx(out_energy / total, rel=1e-12)


def test_planted_delta_inside_subspace_has_rsf_one():
    U, V = orthonormal(12, 3, seed=7), orthonormal(10, 2, seed=8)
    dW_in = randn(10, 3, seed=9) @ U.T  # every row lies in span(U)
    dW_out = V @ randn(2, 12, seed=10)  # every column lies in span(V)
    assert geo.rsf_in(dW_in.float(), U) == pytest.approx(1.0, abs=1e-6)
    assert geo.rsf_out(dW_out, V) == pytest.approx(1.0, abs=1e-12)
    assert geo.relative_rsf(1.0, 3, 12) == pytest.approx(4.0)
    complement = geo.sym_eigh(torch.eye(12, dtype=torch.float64) - projector(U))[1][:, :9]
    assert geo.rsf_in(dW_in, complement) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("side", ["in", "out"])
def test_isotropic_delta_rsf_is_k_over_dim(side):
    m, n, k, seeds = 16, 32, 4, 50
    dim, other = (n, m) if side == "in" else (m, n)
    basis = orthonormal(dim, k, seed=12)
    rsf = geo.rsf_in if side == "in" else geo.rsf_out
    values = [rsf(randn(m, n, seed=100 + s), basis) for s in range(seeds)]
    mean = sum(values) / seeds
    # 5 standard errors of the exact Beta distribution of one sample: fails by chance ~1 in 10^6
    tolerance = 5 * beta_sd(k, dim, other) / math.sqrt(seeds)
    assert mean == pytest.approx(k / dim, abs=tolerance)
    assert geo.relative_rsf(mean, k, dim) == pytest.approx(1.0, abs=tolerance * dim / k)


def test_zero_delta_gives_zero_not_nan():
    dW = torch.zeros(6, 8)
    assert geo.rsf_in(dW, orthonormal(8, 2)) == 0.0
    assert geo.rsf_out(dW, orthonormal(6, 2)) == 0.0
    assert geo.zscore_vs_random(dW, 0.0, 2, "in") == 0.0
    assert geo.rsf_curve(dW, orthonormal(8, 8), [1, 2, 4]) == {1: 0.0, 2: 0.0, 4: 0.0}
    assert not torch.isnan(geo.random_subspace_rsf(dW, 2, "out", n_samples=3)).any()


@pytest.mark.parametrize("side", ["in", "out"])
def test_rsf_curve_matches_per_k_rsf(side):
    dW = randn(6, 9, seed=13)
    dim = 9 if side == "in" else 6
    evecs = geo.sym_eigh(randn(dim, dim, seed=14) @ randn(dim, dim, seed=14).T)[1]
    rsf = geo.rsf_in if side == "in" else geo.rsf_out
    curve = geo.rsf_curve(dW, evecs, [1, 2, 4, 8, 16, 32], side=side)
    expected_ks = sorted({min(k, dim) for k in [1, 2, 4, 8, 16, 32]})
    assert sorted(curve) == expected_ks
    for k in expected_ks:
        assert curve[k] == pytest.approx(geo.relative_rsf(rsf(dW, evecs[:, :k]), k, dim), rel=1e-10)
    assert curve[dim] == pytest.approx(1.0)  # the whole space holds all of dW


def test_rsf_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="U must be a \\(8, k\\)"):
        geo.rsf_in(torch.ones(6, 8), torch.ones(6, 2))
    with pytest.raises(ValueError, match="V must be a \\(6, k\\)"):
        geo.rsf_out(torch.ones(6, 8), torch.ones(8, 2))
    with pytest.raises(ValueError, match="side"):
        geo.random_subspace_rsf(torch.ones(6, 8), 2, "left")
    with pytest.raises(ValueError, match="k must be in"):
        geo.relative_rsf(0.5, 0, 8)


# ----- random baseline ----------------------------------------------------------------------------

def test_haar_subspace_orthonormal_signfixed_and_seeded():
    Q = geo.haar_subspace(7, 3, gen(15))
    torch.testing.assert_close(Q.T @ Q, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(Q, geo.haar_subspace(7, 3, gen(15)))
    # the sign fix makes R = Q^T G have a positive diagonal for the Gaussian G that was drawn
    G = torch.randn(7, 3, generator=gen(15), dtype=torch.float64)
    assert torch.all(torch.diagonal(Q.T @ G) > 0)
    # Haar: the mean projector over many draws is (k/dim) I
    g = gen(16)
    mean_projector = sum(projector(geo.haar_subspace(6, 2, g)) for _ in range(400)) / 400
    torch.testing.assert_close(mean_projector, torch.eye(6, dtype=torch.float64) / 3, atol=0.06, rtol=0)


def test_random_subspace_rsf_leaves_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = geo.random_subspace_rsf(randn(5, 8, seed=17), 2, "in", n_samples=5, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    second = geo.random_subspace_rsf(randn(5, 8, seed=17), 2, "in", n_samples=5, seed=3)
    assert torch.equal(first, second) and first.shape == (5,)
    assert not torch.equal(first, geo.random_subspace_rsf(randn(5, 8, seed=17), 2, "in", n_samples=5, seed=4))


def test_zscore_planted_is_large_and_isotropic_is_small():
    m, n, k = 12, 24, 3
    U = orthonormal(n, k, seed=18)
    planted = randn(m, k, seed=19) @ U.T
    # random RSFs of this rank-k delta sit near k/n = 0.125 with sd ~ 0.06 (a low-rank delta
    # spreads more than an isotropic one); a planted RSF of 1 is ~14 sds away
    assert geo.zscore_vs_random(planted, geo.rsf_in(planted, U), k, "in") > 5
    isotropic = randn(m, n, seed=20)
    z_isotropic = geo.zscore_vs_random(isotropic, geo.rsf_in(isotropic, U), k, "in")
    assert abs(z_isotropic) < 3
    V = orthonormal(m, k, seed=21)
    planted_out = V @ randn(k, n, seed=22)
    # out side: mean k/m = 0.25, sd ~ 0.10, so z ~ 7
    assert geo.zscore_vs_random(planted_out, geo.rsf_out(planted_out, V), k, "out") > 5


def test_zscore_without_spread_is_zero():
    dW = randn(4, 5, seed=23)
    assert geo.zscore_vs_random(dW, 1.0, 5, "in") == 0.0  # k == dim: every subspace scores 1
    with pytest.raises(ValueError, match="n_samples"):
        geo.zscore_vs_random(dW, 0.5, 2, "in", n_samples=1)


@pytest.mark.parametrize("side, shape, k", [("in", (6, 9), 3), ("out", (9, 6), 2), ("in", (12, 5), 1)])
def test_closed_form_null_moments_match_haar_samples(side, shape, k):
    """The sampled check of the closed form: mean k/dim and the variance formula, against 20,000
    Haar subspaces of a low-rank (anisotropic) delta. Sampling error of the variance ~ sqrt(2/N) = 1%."""
    dW = randn(*shape[:1], 2, seed=40) @ randn(2, shape[1], seed=41) + 0.1 * randn(*shape, seed=42)
    samples = geo.random_subspace_rsf(dW, k, side, n_samples=20_000, seed=7)
    mean, var = geo.rsf_null_moments(dW[None], k, side)
    assert samples.mean().item() == pytest.approx(mean.item(), rel=0.01)
    assert samples.var().item() == pytest.approx(var.item(), rel=0.05)
    basis = orthonormal(shape[1] if side == "in" else shape[0], k, seed=43)
    rsf = geo.rsf_in(dW, basis) if side == "in" else geo.rsf_out(dW, basis)
    sampled = geo.zscore_vs_random(dW, rsf, k, side, n_samples=20_000, seed=7)
    assert geo.rsf_zscore(dW, rsf, k, side) == pytest.approx(sampled, rel=0.05, abs=0.05)


def test_closed_form_zscore_edge_cases():
    dW = randn(4, 5, seed=23)
    assert geo.rsf_zscore(dW, 1.0, 5, "in") == 0.0  # k == dim: no spread
    assert geo.rsf_zscore(torch.zeros(4, 5, dtype=torch.float64), 0.0, 2, "in") == 0.0  # nothing written
    # an isotropic-in-expectation delta: A = I/n has tr(A^2) = 1/n, so the null has no spread either
    assert geo.rsf_zscore(torch.eye(5, dtype=torch.float64), 0.4, 2, "in") == 0.0


def test_batched_kernels_equal_the_scalar_reference():
    """Each layer of a stack, measured at once, gives what the float64 scalar functions give."""
    dWs = torch.stack([randn(6, 8, seed=s) for s in range(4)])
    Cs = torch.stack([(lambda X: X.T @ X)(randn(20, 8, seed=10 + s)) for s in range(4)])
    evals, evecs = geo.sym_eigh_batched(Cs)
    for i in range(4):
        ev, V = geo.sym_eigh(Cs[i])
        torch.testing.assert_close(evals[i], ev)
        assert torch.allclose((evecs[i, :, :3].T @ V[:, :3]).abs(), torch.eye(3, dtype=torch.float64), atol=1e-8)
    rsf = geo.rsf_batched(dWs, evecs[:, :, :3], "in")
    z = geo.rsf_zscore_batched(rsf, dWs, 3, "in")
    spikes = geo.spikiness_batched(evals, 3)
    gaps = geo.eigengap_batched(evals, 3)
    for i in range(4):
        U = evecs[i, :, :3]
        assert rsf[i].item() == pytest.approx(geo.rsf_in(dWs[i], U), rel=1e-12)
        assert z[i].item() == pytest.approx(geo.rsf_zscore(dWs[i], geo.rsf_in(dWs[i], U), 3, "in"), rel=1e-10)
        assert gaps[i].item() == pytest.approx(geo.eigengap(evals[i], 3), rel=1e-12)
        for name, value in geo.spikiness(evals[i], 3).items():
            assert spikes[name][i].item() == pytest.approx(value, rel=1e-12), name


# ----- spectra ------------------------------------------------------------------------------------

def test_spikiness_single_spike_and_flat():
    spike = geo.spikiness(torch.tensor([5.0, 0.0, 0.0, 0.0]), 2)
    assert spike == pytest.approx({"top1": 1.0, "topk": 1.0, "pr": 1.0, "erank": 1.0})
    flat = geo.spikiness(torch.ones(8), 2)
    assert flat == pytest.approx({"top1": 1 / 8, "topk": 2 / 8, "pr": 8.0, "erank": 8.0})


def test_spikiness_general_spectrum_clips_and_sorts():
    l = np.array([3.0, 1.0, 2.0, -0.5])  # negative round-off is clipped, order does not matter
    p = np.array([3.0, 2.0, 1.0, 0.0]) / 6
    expected = {"top1": 0.5, "topk": 5 / 6, "pr": 36 / 14,
                "erank": math.exp(-sum(x * math.log(x) for x in p if x > 0))}
    assert geo.spikiness(torch.tensor(l), 2) == pytest.approx(expected)
    assert geo.spikiness(torch.tensor(l), 100)["topk"] == pytest.approx(1.0)  # k capped at n


def test_spikiness_of_zero_spectrum_is_defined():
    assert geo.spikiness(torch.zeros(5), 2) == {"top1": 0.0, "topk": 0.0, "pr": 0.0, "erank": 0.0}


def test_eigengap():
    evals = torch.tensor([4.0, 2.0, 1.0])
    assert geo.eigengap(evals, 1) == pytest.approx(0.5)
    assert geo.eigengap(evals, 2) == pytest.approx(0.5)
    assert geo.eigengap(evals, 3) == 1.0  # k == dim: the subspace is the whole space
    assert geo.eigengap(torch.tensor([1.0, 0.0, 0.0]), 2) == 0.0  # l_k == 0: degenerate
    assert geo.eigengap(torch.ones(4), 2) == 0.0  # flat spectrum: no preferred subspace
    with pytest.raises(ValueError, match="k must be in"):
        geo.eigengap(evals, 4)


def test_coherence_identical_cancelling_and_zero():
    G = randn(3, 4, seed=24)
    T = 5
    assert geo.coherence(T * G, T * G.square().sum()) == pytest.approx(T)
    assert geo.coherence(G - G, 2 * G.square().sum()) == 0.0
    assert geo.coherence(torch.zeros(3, 4), torch.tensor(0.0)) == 0.0


# ----- prediction subspace ------------------------------------------------------------------------

def test_prediction_subspace_spans_known_row_space():
    vocab, d, k = 30, 10, 3
    B = orthonormal(d, k, seed=25)
    W_U = randn(vocab, k, seed=26) @ B.T
    V, svals = geo.prediction_subspace(W_U, k=k)
    assert V.shape == (d, k) and svals.shape == (d,)
    torch.testing.assert_close(projector(V), projector(B))
    # from the Gram matrix: zeros past the rank come back as sqrt(round-off) ~ 1e-7
    torch.testing.assert_close(svals, torch.linalg.svdvals(W_U), atol=1e-6, rtol=1e-10)


def test_prediction_subspace_folds_in_the_gain():
    vocab, d, k = 30, 10, 3
    B = orthonormal(d, k, seed=27)
    gain = torch.linspace(0.2, 3.0, d, dtype=torch.float64)
    W_U = randn(vocab, k, seed=28) @ B.T / gain  # W_U diag(gain) = A B^T
    V, _ = geo.prediction_subspace(W_U, gain=gain.float(), k=k)
    torch.testing.assert_close(projector(V), projector(B), atol=1e-6, rtol=0)
    V_no_gain, _ = geo.prediction_subspace(W_U, k=k)
    assert (projector(V_no_gain) - projector(B)).norm() > 0.1


def test_prediction_subspace_layernorm_removes_ones_direction():
    vocab, d, k = 30, 10, 3
    ones = torch.ones(d, 1, dtype=torch.float64) / math.sqrt(d)
    B = orthonormal(d, k, seed=29)
    B = torch.linalg.qr(B - ones @ (ones.T @ B))[0]  # planted directions are mean-free
    offsets = 20 * randn(vocab, 1, seed=30)  # each token adds a large multiple of the ones vector
    W_U = randn(vocab, k, seed=31) @ B.T + offsets @ torch.ones(1, d, dtype=torch.float64)
    V_raw, _ = geo.prediction_subspace(W_U, k=k)
    assert (V_raw.T @ ones).norm() > 0.9  # the ones direction dominates a raw W_U
    V, _ = geo.prediction_subspace(W_U, k=k, layernorm=True)
    assert (V.T @ ones).norm() < 1e-8
    torch.testing.assert_close(projector(V), projector(B))


def test_prediction_subspace_centered_removes_shared_row():
    vocab, d, k = 30, 10, 3
    B = orthonormal(d, k, seed=32)
    shared = 50 * randn(1, d, seed=33)  # the same logit-direction row added to every token
    W_U = randn(vocab, k, seed=34) @ B.T + shared
    V_raw, _ = geo.prediction_subspace(W_U, k=k)
    assert (projector(V_raw) - projector(B)).norm() > 0.1
    V, _ = geo.prediction_subspace(W_U, k=k, centered=True)
    torch.testing.assert_close(projector(V), projector(B))


def test_prediction_subspace_bad_input():
    with pytest.raises(ValueError, match="gain must have shape \\(10,\\)"):
        geo.prediction_subspace(torch.ones(30, 10), gain=torch.ones(9), k=2)
    with pytest.raises(ValueError, match="k must be in \\[1, 10\\]"):
        geo.prediction_subspace(torch.ones(30, 10), k=11)
