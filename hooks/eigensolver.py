"""Leading eigenpairs of symmetric PSD matrices, without a full eigendecomposition when they are wide.

The metrics read a covariance through its top-``k`` eigenvectors (``k <= 32``), the eigengap after
them, its trace and its Frobenius norm; only the effective rank needs every eigenvalue. A full
``torch.linalg.eigh`` costs ``O(n^3)`` (seconds at ``n = 4096`` on a CPU), so wide matrices go
through :func:`top_eigenpairs` instead: restarted block Lanczos with full reorthogonalisation and a
Rayleigh-Ritz step, ``O(n^2 p)`` per block product (``p`` = block width, about ``k + 8``), warm-started
from the previous computation's vectors, which the covariance only nudges between two metric
computations. Narrow matrices take the exact full path (:func:`full_eigenpairs`); the choice is the
caller's (``instruments.dense_max_dim``).

Every result carries ``error``: an a-posteriori bound on ``sin`` of the largest principal angle
between the returned top-``k`` subspace and the exact one (the Davis-Kahan sin-theta theorem for
Ritz vectors: ``‖C Y - Y Theta‖_2 / delta`` with ``delta`` the gap from the k-th Ritz value to the
rest of the spectrum). The same bound is computed for the full path, where the residual is at the
round-off level, so ``error`` says when the eigengap is too small for *any* solver to pin the
subspace in this precision: then it is near or above 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]

# The solver works in float64 whatever the metric dtype: its products are O(n^2 p), cheap next to a
# full eigh even at float64 rates, and float32 round-off (about 1e-7 of the largest eigenvalue) would
# floor the bound below at 1e-5 or so and stall the restarts. It stops when the bound on sin(theta) of
# the top-k subspace is below TOL (tests/hooks/test_eigensolver.py measures the true angle against
# torch.linalg.eigh), or when a restart no longer halves it.
TOL = 1e-9
BLOCKS = 6  # Krylov blocks per restart: the basis is (BLOCKS + 1) * p wide
# Restarts per call (35 products of an (n, p) block at most). Real covariances converge in 2 to 4 from a cold
# start (SmolLM2's: 15 to 28 products), fewer warm; a subspace not pinned by then sits in a flat stretch of
# its spectrum (the bound says so, e.g. the covariance of a few hundred tokens through a random model), and
# the next computation starts from these vectors and refines them further.
MAX_RESTARTS = 5


@dataclass
class Eigenpairs:
    """The leading part of a spectrum: ``values`` (p,) descending and clipped at 0, ``vectors`` (n, p)
    with orthonormal columns, ``full`` when they are the whole spectrum (p == n), ``error`` (0-d) the
    bound on sin of the largest angle of the top-``k`` subspace (``k`` as requested), ``iterations``
    the block products it took (0 on the full path)."""

    values: Tensor
    vectors: Tensor
    full: bool
    error: Tensor
    iterations: int = 0

    def top(self, k: int) -> Tensor:
        """The top-``k`` eigenvectors (n, k)."""
        return self.vectors[:, :k]


def symmetrize(C: Tensor) -> Tensor:
    """``(C + C^T) / 2``: accumulated sums drift from exact symmetry."""
    return (C + C.transpose(-1, -2)) / 2


def full_eigenpairs(C: Tensor, k: int) -> Eigenpairs:
    """Every eigenpair of symmetric ``C`` (n, n) in ``C``'s dtype, descending, with the round-off
    residual bound of its top-``k`` subspace."""
    S = symmetrize(C)
    evals, evecs = torch.linalg.eigh(S)
    values, vectors = evals.flip(-1), evecs.flip(-1)
    error = _ritz_error(S @ vectors[:, : k + 1], vectors[:, : k + 1], values[: k + 1], k)
    return Eigenpairs(values.clamp_min(0.0), vectors, True, error)


def top_eigenpairs(matvec: MatVec, n: int, k: int, *, device: torch.device, warm: Tensor | None = None,
                   block: int | None = None, seed: int = 0, tol: float = TOL) -> Eigenpairs:
    """The top ``block`` eigenpairs (default ``k + max(8, k // 2)``) of the symmetric PSD operator
    ``X -> C X`` on R^n, by restarted block Lanczos with full reorthogonalisation, in float64
    (``matvec`` receives and must return float64 (n, j) tensors on ``device``).

    ``warm``: (n, j) vectors to start from (a previous result's; padded with seeded Gaussian columns).
    Converged when the sin-theta bound of the top-``k`` subspace is below ``tol``, or when a restart
    no longer halves it, or after :data:`MAX_RESTARTS` restarts (the bound says how far it got). Cost per restart:
    ``BLOCKS + 1`` products with an (n, block) matrix and an orthogonalisation of ``O(n b^2)`` with
    ``b = (BLOCKS + 1) * block``; memory ``O(n b)``.
    """
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for a top-k eigensolve of an {n} x {n} operator, got {k}")
    p = min(n, block or k + max(8, k // 2))
    dtype = torch.float64
    X = _start(n, p, warm, dtype, device, seed)
    iterations, result, previous = 0, None, float("inf")
    for _ in range(MAX_RESTARTS):
        basis, products = _krylov(matvec, X, max(1, min(BLOCKS, -(-n // p) - 1)))  # at most the whole space
        iterations += len(basis)
        Q, CQ = torch.cat(basis, 1), torch.cat(products, 1)
        T = symmetrize(Q.T @ CQ)  # the small Rayleigh-Ritz problem
        theta, S = torch.linalg.eigh(T)
        values, S = theta.flip(0)[:p], S.flip(1)[:, :p]
        Y, CY = Q @ S, CQ @ S
        error = _ritz_error(CY[:, : k + 1], Y[:, : k + 1], values[: k + 1], k)
        result = Eigenpairs(values.clamp_min(0.0), Y, False, error, iterations)
        bound = float(error)  # one host read per restart
        if bound <= tol or bound > previous / 2:
            break
        X, previous = Y, bound
    return result


def _start(n: int, p: int, warm: Tensor | None, dtype, device, seed: int) -> Tensor:
    """An orthonormal (n, p) start: the warm vectors first, seeded Gaussian columns after them."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    if warm is not None and warm.shape[0] == n:
        j = min(p, warm.shape[1])
        X[:, :j] = warm[:, :j].to(device=device, dtype=dtype)
    return torch.linalg.qr(X).Q


def _krylov(matvec: MatVec, X: Tensor, blocks: int) -> tuple[list[Tensor], list[Tensor]]:
    """Orthonormal blocks ``[X, C X, ...]`` (reorthogonalised twice against all earlier blocks, in one
    preallocated basis) and their images under ``C``; stops early when a new block has no new direction."""
    n, p = X.shape
    Q = X.new_empty(n, (blocks + 1) * p)
    Q[:, :p] = X
    filled = p
    basis, products = [Q[:, :p]], [matvec(X)]
    for _ in range(blocks):
        B = Q[:, :filled]
        W = products[-1] - B @ (B.T @ products[-1])
        W = W - B @ (B.T @ W)  # twice is enough (Kahan's "twice is enough" for Gram-Schmidt)
        # the new directions the block really has (its singular values, relative to the operator's scale), no
        # more than the space has left: a dependent column would make QR return an arbitrary vector
        U, sv, _ = torch.linalg.svd(W, full_matrices=False)
        scale = products[-1].norm(dim=0).max().clamp_min(torch.finfo(W.dtype).tiny)
        Z = U[:, sv > scale * 1e-10][:, : n - filled]
        if Z.shape[1] == 0:
            break
        Z = torch.linalg.qr(Z - B @ (B.T @ Z)).Q  # one more pass: round-off leaves a little of the old basis
        j = Z.shape[1]
        Q[:, filled:filled + j] = Z
        basis.append(Q[:, filled:filled + j])
        filled += j
        products.append(matvec(basis[-1]))
    return basis, products


def _ritz_error(CY: Tensor, Y: Tensor, values: Tensor, k: int) -> Tensor:
    """Bound on sin of the largest angle between span(Y[:, :k]) and the exact top-k eigenspace:
    ``‖C Y_k - Y_k Theta_k‖_2 / delta`` with ``delta = theta_k - (theta_{k+1} + ‖r_{k+1}‖)``, a lower
    bound of the gap to the rest of the spectrum (Ritz values are lower bounds of the eigenvalues, and
    each lies within its residual of one). ``inf`` when that gap is not positive."""
    R = CY - Y * values[None, :]
    top = torch.linalg.matrix_norm(R[:, :k], ord=2)
    if values.shape[0] <= k:  # the whole space: nothing left to separate from
        return top.new_zeros(())
    delta = values[k - 1] - values[k] - R[:, k].norm()
    scale = values[0].abs().clamp_min(torch.finfo(values.dtype).tiny)
    return torch.where(delta > 0, top / delta.clamp_min(torch.finfo(values.dtype).tiny * scale),
                       torch.full_like(top, float("inf")))
