"""Pure weight-geometry math: tensors in, python floats or float64 tensors out.

Definitions: docs/metrics.md. Conventions:

- A weight (or delta, update, gradient) is ``(m, n)`` = out x in, as PyTorch stores ``nn.Linear``.
- Bases are column-orthonormal: ``U`` is ``(n, k)`` on the input side, ``V`` is ``(m, k)`` on the
  output side.
- The scalar functions (``rsf_in``, ``spikiness``, ...) return Python floats and compute in float64;
  they are the reference, and what reports use. Each wraps a batched kernel (``*_batched``: a
  leading batch dimension, tensors in, tensors out, on the inputs' device, in the inputs' dtype), which
  the live metrics use to measure every layer at once with a single host synchronisation.
- Degenerate inputs give defined numbers, never NaN: a zero delta has RSF 0.0 (it writes nowhere),
  a zero spectrum has spikiness 0.0 in every entry, zero gradient sums have coherence 0.0.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Side = Literal["in", "out"]  # which dim of a (m, n) = out x in matrix a subspace lives in
_SIDES = ("in", "out")


# ----- eigendecompositions ------------------------------------------------------------------------

def sym_eigh(C: Tensor) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a symmetric PSD matrix ``C`` (n, n), largest first.

    ``C`` is symmetrised as ``(C + C^T) / 2`` (accumulated sums drift from exact symmetry) and
    decomposed in float64. Returns ``(evals (n,), evecs (n, n))`` with ``evecs[:, i]`` belonging to
    ``evals[i]``; eigenvalues are sorted descending and the tiny negative ones that round-off
    produces for a PSD matrix are clipped to 0.
    """
    _check_square(C, "C")
    evals, evecs = sym_eigh_batched(C.detach().double()[None])
    return evals[0], evecs[0]


def sym_eigh_batched(C: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`sym_eigh` of a stack ``C`` (B, n, n) in ``C``'s dtype: ``(evals (B, n), evecs (B, n, n))``.

    float32 is several times faster (and the only fast option on most GPUs) but resolves eigenvalues
    only down to about 1e-7 of the largest: enough for the top-k subspaces and top-k shares, less
    so for the tail that the effective rank sums over (benchmarks/README.md gives measured errors).
    """
    evals, evecs = torch.linalg.eigh((C + C.transpose(-1, -2)) / 2)
    return evals.flip(-1).clamp_min(0.0), evecs.flip(-1)


def top_eigvecs(C: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-``k`` eigenvectors ``U (n, k)`` of symmetric ``C`` (n, n) and all eigenvalues, descending."""
    _check_square(C, "C")
    _check_k(k, C.shape[0], "C")
    evals, evecs = sym_eigh(C)
    return evecs[:, :k], evals


def covariance_from_sums(sum_outer: Tensor, sum_vec: Tensor | None, count: float | Tensor,
                         centered: bool = False) -> Tensor:
    """Covariance (n, n) float64 from streamed sums ``sum a a^T`` (n, n), ``sum a`` (n,), ``N``.

    Uncentered: ``sum_outer / N`` (K-FAC's A, the factor that enters ``sum delta a^T``).
    Centered: ``sum_outer / N - mu mu^T`` with ``mu = sum_vec / N`` (population covariance,
    i.e. ``torch.cov(X.T, correction=0)``). ``N == 0`` gives zeros: nothing was counted yet.
    """
    _check_square(sum_outer, "sum_outer")
    n = sum_outer.shape[0]
    count = float(count)
    if count < 0:
        raise ValueError(f"count must be >= 0 (tokens counted), got {count}")
    if centered and sum_vec is None:
        raise ValueError("centered=True needs sum_vec (the running sum of the vectors); pass it or use centered=False")
    if sum_vec is not None and tuple(sum_vec.shape) != (n,):
        raise ValueError(f"sum_vec must have shape ({n},) to match sum_outer {tuple(sum_outer.shape)}, "
                         f"got {tuple(sum_vec.shape)}")
    if count == 0:
        return torch.zeros_like(sum_outer, dtype=torch.float64)  # on the sums' device
    C = sum_outer.detach().double() / count
    if centered:
        mean = sum_vec.detach().double() / count
        C = C - torch.outer(mean, mean)
    return C


# ----- restricted subspace fraction ---------------------------------------------------------------

def rsf_in(dW: Tensor, U: Tensor) -> float:
    """Input-side RSF ``‖dW U‖_F² / ‖dW‖_F²`` for ``dW`` (m, n) and orthonormal ``U`` (n, k).

    The share of the delta's energy whose input direction lies in span(U). Isotropic value ``k/n``.
    A zero ``dW`` gives 0.0.
    """
    _check_matrix(dW, "dW")
    _check_basis(U, dW.shape[1], "U", "dW.shape[1] (the input dim n)")
    return rsf_batched(dW.detach().double()[None], U.detach().double()[None], "in").item()


def rsf_out(dW: Tensor, V: Tensor) -> float:
    """Output-side RSF ``‖V^T dW‖_F² / ‖dW‖_F²`` for ``dW`` (m, n) and orthonormal ``V`` (m, k).

    The share of the delta's energy written into span(V). Isotropic value ``k/m``. A zero ``dW``
    gives 0.0.
    """
    _check_matrix(dW, "dW")
    _check_basis(V, dW.shape[0], "V", "dW.shape[0] (the output dim m)")
    return rsf_batched(dW.detach().double()[None], V.detach().double()[None], "out").item()


def rsf_batched(dW: Tensor, basis: Tensor, side: Side) -> Tensor:
    """RSF (B,) of a stack of deltas ``dW`` (B, m, n) against bases (B, n, k) (side "in") or (B, m, k)
    (side "out"), computed in ``dW``'s dtype; 0 where a delta is zero."""
    projected = dW @ basis if side == "in" else basis.transpose(-1, -2) @ dW
    return _safe_ratio(projected.square().sum((-2, -1)), dW.square().sum((-2, -1)))


def relative_rsf(rsf: float, k: int, dim: int) -> float:
    """``rsf / (k / dim)``: 1.0 is what an isotropic delta scores; ``dim / k`` is the maximum."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    _check_k(k, dim, "the subspace")
    return float(rsf) * dim / k


def rsf_curve(dW: Tensor, basis: Tensor, ks: list[int], side: Side = "in") -> dict[int, float]:
    """Relative RSF for each ``k`` in ``ks`` from one ordered basis, ``{k: relative RSF}``.

    ``basis`` is (dim, r) with orthonormal columns ordered by importance, e.g. ``sym_eigh(C)[1]``
    or ``prediction_subspace(W_U, k=32)[0]``; the top-k subspace is its first k columns, so one
    projection serves every k (cumulative sums of per-direction energies). Each ``k`` is capped at
    ``r`` (keys are the capped values, so duplicates merge). ``dim`` is n for side "in", m for "out".
    """
    _check_matrix(dW, "dW")
    _check_side(side)
    dim = dW.shape[1] if side == "in" else dW.shape[0]
    _check_basis(basis, dim, "basis", f"the {side}put dim of dW ({dim})")
    dW = dW.detach().double()
    B = basis.detach().double()
    projected = dW @ B if side == "in" else B.T @ dW
    per_direction = projected.square().sum(dim=0 if side == "in" else 1)
    cumulative = torch.cumsum(per_direction, 0)
    total = dW.square().sum()
    curve = {}
    for k in ks:
        k_eff = min(int(k), B.shape[1])
        _check_k(k_eff, dim, "rsf_curve")
        curve[k_eff] = relative_rsf(_safe_ratio(cumulative[k_eff - 1], total).item(), k_eff, dim)
    return curve


def subspace_energies(C: Tensor, V: Tensor) -> Tensor:
    """``v_i^T C v_i`` for each column of ``V`` (d, j): the energy of the PSD ``C`` (d, d) along each
    direction, in ``C``'s dtype. ``sum(energies[:k]) / tr C`` is the mass of ``C`` in the top-k span."""
    return ((C @ V.to(C)) * V.to(C)).sum(0)


def prediction_mass(C_delta: Tensor, V: Tensor, k: int) -> float:
    """Relative mass of ``C_delta`` (m, m) in the subspace of the first ``k`` columns of ``V`` (m, j >= k):
    ``tr(V_k^T C_delta V_k) / tr(C_delta)`` over its isotropic value ``k / m``, float64. With ``V`` the
    prediction subspace this says whether the loss's per-token ``delta`` lies where the unembedding
    reads (docs/metrics.md); 1.0 is no preference, ``m / k`` all of it. 0.0 for a zero ``C_delta``."""
    C = C_delta.detach().double()
    _check_square(C, "C_delta")
    _check_basis(V, C.shape[0], "V", "C_delta's dimension")
    _check_k(k, V.shape[1], "prediction_mass")
    mass = _safe_ratio(subspace_energies(C, V.detach().double()[:, :k]).sum(), torch.diagonal(C).sum())
    return float(mass) * C.shape[0] / k


def mass_zscore(C_delta: Tensor, mass: float, k: int) -> float:
    """Exact z-score of a (non-relative) mass ``tr(P C) / tr C`` against Haar-random k-subspaces: the
    RSF null of :func:`rsf_null_moments` with ``A = C / tr C``, so ``tr(A²) = ‖C‖_F² / (tr C)²``."""
    C = C_delta.detach().double()
    tr_a2 = _safe_ratio(C.square().sum(), torch.diagonal(C).sum().square())
    return rsf_zscore_from_trace(torch.tensor(float(mass), dtype=torch.float64), tr_a2, k, C.shape[0]).item()


# ----- random-subspace baseline -------------------------------------------------------------------

def haar_subspace(dim: int, k: int, generator: torch.Generator) -> Tensor:
    """Haar-random orthonormal basis ``Q`` (dim, k) float64, drawn from ``generator`` only.

    QR of a standard Gaussian matrix with the signs of R's diagonal made positive (Mezzadri 2007);
    without the sign fix Q's columns are not Haar-distributed (the span would still be).
    """
    _check_k(k, dim, "haar_subspace")
    return haar_subspaces(1, dim, k, generator)[0]


def haar_subspaces(count: int, dim: int, k: int, generator: torch.Generator) -> Tensor:
    """``count`` Haar-random orthonormal bases (count, dim, k) float64 on the CPU, one batched QR."""
    G = torch.randn(count, dim, k, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(G)
    signs = torch.where(torch.diagonal(R, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(torch.float64)
    return Q * signs[:, None, :]


def random_subspace_rsf(dW: Tensor, k: int, side: Side, n_samples: int = 20, seed: int = 0) -> Tensor:
    """RSF of ``dW`` (m, n) against ``n_samples`` seeded Haar-random k-subspaces, (n_samples,) float64.

    Side "in" uses subspaces of R^n, "out" of R^m. Uses a private ``torch.Generator`` seeded with
    ``seed``: the global RNG (and so training) is untouched, and the same seed gives the same
    subspaces on every call, rank and resume.
    """
    _check_matrix(dW, "dW")
    _check_side(side)
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    dim = dW.shape[1] if side == "in" else dW.shape[0]
    generator = torch.Generator().manual_seed(seed)  # on the CPU; the bases then move to dW's device
    _check_k(k, dim, "random_subspace_rsf")
    bases = haar_subspaces(n_samples, dim, k, generator).to(dW.device)
    dW = dW.detach().double()
    return rsf_batched(dW.expand(n_samples, *dW.shape), bases, side).cpu()


def zscore_vs_random(dW: Tensor, rsf_value: float, k: int, side: Side, n_samples: int = 20,
                     seed: int = 0) -> float:
    """``(rsf_value - mean) / std`` over ``random_subspace_rsf`` (sample std, n_samples >= 2).

    The sampled estimate of :func:`rsf_zscore` (kept as its check). When the random RSFs have no
    spread (zero delta, or k == dim where every subspace is the whole space) there is no evidence
    either way and the result is 0.0.
    """
    if n_samples < 2:
        raise ValueError(f"n_samples must be >= 2 to estimate a standard deviation, got {n_samples}")
    samples = random_subspace_rsf(dW, k, side, n_samples=n_samples, seed=seed)
    mean, std = samples.mean().item(), samples.std().item()
    # RSF lives in [0, 1]; a spread at round-off level is "no spread", not a tiny denominator.
    if std <= 1e-12:
        return 0.0
    return (float(rsf_value) - mean) / std


def rsf_zscore(dW: Tensor, rsf_value: float, k: int, side: Side) -> float:
    """Exact z-score of an RSF against Haar-random k-subspaces: ``(rsf - k/dim) / sd``.

    Large positive: the delta prefers the measured subspace far beyond chance. See
    :func:`rsf_null_moments` for the closed form; 0.0 when the null has no spread.
    """
    _check_matrix(dW, "dW")
    _check_side(side)
    dim = dW.shape[1] if side == "in" else dW.shape[0]
    _check_k(k, dim, "rsf_zscore")
    value = torch.tensor([float(rsf_value)], dtype=torch.float64, device=dW.device)
    return rsf_zscore_batched(value, dW.detach().double()[None], k, side).item()


def rsf_null_moments(dW: Tensor, k: int, side: Side) -> tuple[Tensor, Tensor]:
    """Mean and variance (each (B,)) of the RSF of deltas ``dW`` (B, m, n) against a Haar-random
    k-subspace of R^dim (dim = n for side "in", m for "out").

    With ``A = dW^T dW / ‖dW‖_F²`` (side "in"; ``dW dW^T / ‖dW‖_F²`` for "out"), ``tr A = 1`` and the
    RSF is ``tr(P A)`` for a random rank-k projector ``P``; its moments are
    ``E = k / dim`` and ``Var = 2 k (dim - k) / ((dim - 1) dim (dim + 2)) * (tr(A²) - 1 / dim)``.
    ``tr(A²) = ‖G‖_F² / ‖dW‖_F⁴`` is the same on both sides, with ``G`` the smaller Gram matrix of
    ``dW`` (cost ``m n min(m, n)``). tests/hooks/test_geometry.py checks both moments against Haar samples.
    """
    B, m, n = dW.shape
    dim = n if side == "in" else m
    gram = dW @ dW.transpose(-1, -2) if m <= n else dW.transpose(-1, -2) @ dW
    norm2 = dW.square().sum((-2, -1))
    tr_a2 = _safe_ratio(gram.square().sum((-2, -1)), norm2.square())
    mean = torch.full_like(norm2, k / dim)
    if dim == 1:  # the only subspace is the whole line
        return mean, torch.zeros_like(norm2)
    scale = 2 * k * (dim - k) / ((dim - 1) * dim * (dim + 2))
    return mean, scale * (tr_a2 - 1 / dim).clamp_min(0.0)


def rsf_zscore_batched(rsf: Tensor, dW: Tensor, k: int, side: Side) -> Tensor:
    """Exact z-scores (B,) of RSF values ``rsf`` (B,) of deltas ``dW`` (B, m, n); 0 where the null
    distribution has no spread (a zero delta, or k == dim)."""
    mean, var = rsf_null_moments(dW, k, side)
    return _zscore(rsf, mean, var)


def rsf_zscore_from_trace(rsf: Tensor, tr_a2: Tensor, k: int, dim: int) -> Tensor:
    """:func:`rsf_zscore` from ``tr(A²) = ‖dW^T dW‖_F² / ‖dW‖_F⁴`` (the same on both sides, so one
    number serves every subspace a delta is measured against; see :func:`rsf_null_moments`)."""
    mean = torch.full_like(rsf, k / dim)
    if dim == 1:
        return torch.zeros_like(rsf)
    scale = 2 * k * (dim - k) / ((dim - 1) * dim * (dim + 2))
    return _zscore(rsf, mean, scale * (tr_a2 - 1 / dim).clamp_min(0.0))


def _zscore(rsf: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    std = var.sqrt()
    # RSF lives in [0, 1]; a spread at round-off level is "no spread", not a tiny denominator.
    return torch.where(std > 1e-12, (rsf - mean) / std.clamp_min(1e-12), torch.zeros_like(std))


# ----- spectra ------------------------------------------------------------------------------------

def spikiness(evals: Tensor, k: int) -> dict[str, float]:
    """Concentration of a spectrum ``evals`` (n,), clipped at 0, float64.

    ``top1 = l1 / sum l``, ``topk = sum_{i<=k} l_i / sum l`` (k capped at n),
    ``pr = (sum l)² / sum l²`` (participation ratio, in [1, n]),
    ``erank = exp(H(p))`` with ``p = l / sum l`` and ``0 log 0 = 0`` (effective rank, in [1, n]).
    One spike gives 1, 1, 1, 1; a flat spectrum gives 1/n, k/n, n, n. All entries are 0.0 for an
    all-zero spectrum (nothing was measured, so there are no directions).
    """
    l = _spectrum(evals, "evals")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return {name: v.item() for name, v in spikiness_batched(l[None], k).items()}


def spikiness_batched(evals: Tensor, k: int) -> dict[str, Tensor]:
    """:func:`spikiness` of a stack of spectra ``evals`` (B, n), sorted descending and clipped at 0
    (as :func:`sym_eigh_batched` returns them); each entry (B,)."""
    total = evals.sum(-1)
    p = evals / total.clamp_min(torch.finfo(evals.dtype).tiny)[:, None]
    entropy = -torch.where(p > 0, p * p.clamp_min(torch.finfo(evals.dtype).tiny).log(), torch.zeros_like(p)).sum(-1)
    measured = total > 0
    zero = torch.zeros_like(total)
    return {
        "top1": torch.where(measured, p[:, 0], zero),
        "topk": torch.where(measured, p[:, :k].sum(-1), zero),
        "pr": torch.where(measured, _safe_ratio(total.square(), evals.square().sum(-1)), zero),
        "erank": torch.where(measured, entropy.exp(), zero),
    }


def eigengap(evals_desc: Tensor, k: int) -> float:
    """Relative gap ``(l_k - l_{k+1}) / l_k`` after the k-th eigenvalue (1-based), in [0, 1].

    A small gap means the top-k subspace is ill-defined (a small perturbation rotates it), so an
    RSF against it is unstable. Edge cases: ``k == n`` gives 1.0 (the subspace is the whole space,
    unique); ``l_k == 0`` with ``k < n`` gives 0.0 (the k-th direction is picked from a degenerate
    null space). Eigenvalues are clipped at 0 and sorted descending first.
    """
    l = _spectrum(evals_desc, "evals_desc")
    _check_k(k, l.shape[0], "evals_desc")
    return eigengap_batched(l[None], k).item()


def eigengap_batched(evals: Tensor, k: int) -> Tensor:
    """:func:`eigengap` of a stack of descending spectra ``evals`` (B, n); (B,)."""
    if k == evals.shape[-1]:
        return torch.ones_like(evals[:, 0])
    lk, lnext = evals[:, k - 1], evals[:, k]
    return torch.where(lk > 0, (lk - lnext) / lk.clamp_min(torch.finfo(evals.dtype).tiny), torch.zeros_like(lk))


# ----- coherence ----------------------------------------------------------------------------------

def coherence(sum_G: Tensor, sum_sq_norms: float | Tensor) -> float:
    """``‖sum_t G_t‖_F² / sum_t ‖G_t‖_F²`` over T gradients: T for identical, ~1 for independent,
    0 for cancelling ones. Scales with T, so compare runs at equal step counts. 0.0 if all G_t = 0.
    """
    denominator = float(sum_sq_norms)
    if denominator < 0:
        raise ValueError(f"sum_sq_norms is a sum of squared norms and must be >= 0, got {denominator}")
    return _safe_ratio(sum_G.detach().double().square().sum(), torch.tensor(denominator, dtype=torch.float64)).item()


# ----- prediction subspace ------------------------------------------------------------------------

def prediction_subspace(W_U: Tensor, gain: Tensor | None = None, k: int = 8, layernorm: bool = False,
                        centered: bool = False, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Top-k right singular vectors ``V`` (d, k) of ``M = W_U diag(g)`` and all singular values (d,).

    ``W_U`` is the (vocab, d) unembedding (tied embeddings are fine), ``gain`` the final norm's
    (d,) weight (None: ones). Logits are ``W_U (g * x_hat)``, so the directions of the normalized
    residual ``x_hat`` that move logits are M's row space. Options:

    - ``layernorm``: LayerNorm's ``x_hat`` is mean-free, so the all-ones direction of d-space can
      never be written; use ``M (I - 1 1^T / d)``.
    - ``centered``: softmax ignores a logit shift shared by all tokens, so subtract M's mean row
      over the vocab (``W_U^T (p - y)`` lies in the centred row space).

    Computed from the (d, d) Gram ``M^T M`` (vocab >> d) in ``dtype`` (float64 by default); singular
    values are returned descending, with zeros past M's rank.
    """
    _check_matrix(W_U, "W_U")
    vocab, d = W_U.shape
    _check_k(k, d, "W_U (k is capped by the model dim d)")
    M = W_U.detach().to(dtype)
    if gain is not None:
        if tuple(gain.shape) != (d,):
            raise ValueError(f"gain must have shape ({d},) to match W_U {tuple(W_U.shape)}, got {tuple(gain.shape)}")
        M = M * gain.detach().to(dtype)
    if centered:
        M = M - M.mean(dim=0, keepdim=True)
    if layernorm:
        M = M - M.mean(dim=1, keepdim=True)
    evals, evecs = sym_eigh_batched((M.T @ M)[None])
    return evecs[0, :, :k], evals[0].sqrt()


# ----- helpers ------------------------------------------------------------------------------------

def _safe_ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator`` elementwise, 0 where the denominator is 0 (nothing to split)."""
    safe = torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    return torch.where(denominator == 0, torch.zeros_like(numerator), numerator / safe)


def _spectrum(evals: Tensor, name: str) -> Tensor:
    if evals.ndim != 1 or evals.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor of eigenvalues, got shape {tuple(evals.shape)}")
    return torch.sort(evals.detach().double().clamp_min(0.0), descending=True).values


def _check_matrix(X: Tensor, name: str) -> None:
    if X.ndim != 2 or X.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 2-D matrix (out x in), got shape {tuple(X.shape)}")


def _check_square(C: Tensor, name: str) -> None:
    if C.ndim != 2 or C.shape[0] != C.shape[1] or C.numel() == 0:
        raise ValueError(f"{name} must be a non-empty square (n, n) matrix, got shape {tuple(C.shape)}")


def _check_basis(B: Tensor, dim: int, name: str, what: str) -> None:
    if B.ndim != 2 or B.shape[0] != dim or B.shape[1] < 1:
        raise ValueError(f"{name} must be a ({dim}, k) basis with k >= 1 whose rows match {what}, "
                         f"got shape {tuple(B.shape)}")


def _check_k(k: int, dim: int, where: str) -> None:
    if not 1 <= k <= dim:
        raise ValueError(f"k must be in [1, {dim}] for {where}, got {k}")


def _check_side(side: str) -> None:
    if side not in _SIDES:
        raise ValueError(f"side must be 'in' (input dim of dW) or 'out' (output dim), got {side!r}")
