"""Directions for the rank-1 interventions: tested ones and the matched control families.

Every function is pure and returns float64 unit vectors as columns ``(dim, count)``. Randomness
comes only from a CPU ``torch.Generator`` built by :func:`family_generator` from the run's seed and
labels naming the family (layer, role, side, tested direction), so each control family can be
reproduced on its own, whatever other families a run asks for; the vectors are moved to the
reference tensor's device afterwards.

Control families (what a tested direction ``t`` is compared with):

* ``haar``: Haar-random unit directions (columns of Haar-random orthonormal frames).
* ``matched``: directions whose quadratic form ``w^T Q w`` lies within a relative tolerance of
  ``t^T Q t`` (``Q = C_a`` on the input side; on the output side ``Q = C_delta``, or
  ``Q = M^T M`` with ``M = W_U diag(g)`` for prediction-subspace directions, whose value for a
  singular vector is its squared singular value). See :func:`variance_matched`: in a spiked
  spectrum only directions that overlap the top eigenvector can reach its value, so these controls
  overlap ``t``; their overlaps are returned and reported.
* ``lower``: lower principal directions of the same ``Q`` (ranks spread from just below the tested
  ones to the bottom of the spectrum).
* ``layer``: the same direction (same source, same rank) measured in another layer.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from harness import geometry as geo


def family_generator(seed: int, *labels: object) -> torch.Generator:
    """A CPU generator seeded by hashing ``(seed, *labels)`` (63 bits of sha256): distinct labels give
    independent streams, equal ones the same stream."""
    digest = hashlib.sha256(repr((int(seed), *map(str, labels))).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def haar_directions(dim: int, count: int, generator: torch.Generator) -> Tensor:
    """``count`` Haar-random unit directions of R^dim as columns (dim, count), float64 on CPU.

    Drawn as Haar-random orthonormal frames (:func:`harness.geometry.haar_subspace`): the columns are
    orthonormal when ``count <= dim``; beyond ``dim``, further frames are drawn (orthonormal within
    each block of ``dim`` columns). Each column is marginally uniform on the sphere.
    """
    if dim < 1 or count < 1:
        raise ValueError(f"need dim >= 1 and count >= 1, got dim={dim}, count={count}")
    blocks, left = [], count
    while left:
        k = min(left, dim)
        blocks.append(geo.haar_subspace(dim, k, generator))
        left -= k
    return torch.cat(blocks, dim=1)


def lower_ranks(n_top: int, dim: int, count: int) -> list[int]:
    """0-based eigen-ranks for the ``lower`` family: ``count`` ranks spread evenly over
    ``[n_top, dim - 1]`` (the first is just below the tested top ``n_top``), duplicates merged."""
    if not 0 <= n_top < dim:
        raise ValueError(f"n_top must be in [0, {dim - 1}] for dim {dim}, got {n_top}")
    if count < 1:
        return []
    if count == 1:
        return [n_top]
    step = (dim - 1 - n_top) / (count - 1)
    return sorted({n_top + round(i * step) for i in range(count)})


@dataclass(frozen=True)
class Matched:
    """Variance-matched controls of one tested direction ``t``.

    ``directions`` (d, count) unit columns; ``values`` their ``w^T Q w``; ``overlaps`` ``|<w, t>|``;
    ``target = t^T Q t`` and the band ``[lo, hi]`` they were matched into; ``min_overlap`` the least
    overlap any unit vector in the band must have with ``t`` when ``t`` is an eigenvector of ``Q``
    (0.0 when the band is reachable orthogonally to ``t``; None when ``t`` is no eigenvector).
    """

    directions: Tensor
    values: Tensor
    overlaps: Tensor
    target: float
    lo: float
    hi: float
    min_overlap: float | None


def variance_matched(Q: Tensor, t: Tensor, count: int, tol: float, generator: torch.Generator) -> Matched:
    """``count`` unit directions ``w`` with ``w^T Q w`` within ``[(1 - tol) q, (1 + tol) q]``,
    ``q = t^T Q t``, each as far from ``t`` as the band allows.

    Construction: draw ``r`` Haar-random on the unit sphere of ``t``'s orthogonal complement and walk
    the great circle ``w(theta) = cos(theta) t + sin(theta) r`` from ``t`` (theta = 0, inside the band)
    towards ``r`` (theta = pi/2, overlap 0). On that circle
    ``w^T Q w = A + R cos(2 theta - phi)`` (a sinusoid), so the band's edges are solved in closed form
    and the feasible ``theta`` with the largest ``|sin theta|`` (the smallest overlap ``|cos theta|``)
    is taken. ``r`` is the random part; the overlap is the price of matching. For ``t`` the top
    eigenvector of a spiked ``Q`` (``l1 >> l2``) every matched direction has
    ``cos^2 >= ((1 - tol) l1 - l2) / (l1 - l2)``: such controls are close to ``t`` by necessity, and
    ``min_overlap`` / ``overlaps`` say how close.
    """
    if not 0 <= tol < 1:
        raise ValueError(f"tolerance must be in [0, 1) (relative to t^T Q t), got {tol}")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    Q = Q.detach().double().cpu()
    Q = (Q + Q.T) / 2
    t = t.detach().double().cpu()
    t = t / torch.linalg.vector_norm(t)
    d = t.shape[0]
    if tuple(Q.shape) != (d, d) or d < 2:
        raise ValueError(f"Q must be ({d}, {d}) to match t, with d >= 2; got {tuple(Q.shape)}")
    q_t = float(t @ Q @ t)
    lo, hi = q_t * (1 - tol), q_t * (1 + tol)
    cols, values, overlaps = [], [], []
    for _ in range(count):
        g = torch.randn(d, generator=generator, dtype=torch.float64)
        r = g - (t @ g) * t
        r = r / torch.linalg.vector_norm(r)
        theta = _widest_matched_angle(q_t, float(r @ Q @ r), float(t @ Q @ r), lo, hi)
        w = math.cos(theta) * t + math.sin(theta) * r
        w = w / torch.linalg.vector_norm(w)
        cols.append(w)
        values.append(float(w @ Q @ w))
        overlaps.append(abs(float(w @ t)))
    return Matched(torch.stack(cols, dim=1), torch.tensor(values, dtype=torch.float64),
                   torch.tensor(overlaps, dtype=torch.float64), q_t, lo, hi, _min_overlap(Q, t, lo, hi))


def _widest_matched_angle(q_t: float, q_r: float, c: float, lo: float, hi: float) -> float:
    """The angle in [0, pi) with ``f(theta) = cos^2 q_t + sin^2 q_r + 2 sin cos c`` in [lo, hi] and the
    largest ``|sin theta|``. Feasible angles form arcs whose ends solve ``f = lo`` or ``f = hi``;
    ``|sin|`` on an arc peaks at pi/2 or at an end, so those are the only candidates."""
    A, B = (q_t + q_r) / 2, (q_t - q_r) / 2
    R, phi = math.hypot(B, c), math.atan2(c, B)
    candidates = [0.0, math.pi / 2]
    for level in (lo, hi):
        if R > 0 and abs(level - A) <= R:
            alpha = math.acos(max(-1.0, min(1.0, (level - A) / R)))
            candidates += [((phi + alpha) / 2) % math.pi, ((phi - alpha) / 2) % math.pi]
    slack = 1e-12 * max(abs(lo), abs(hi), 1e-300)

    def f(theta: float) -> float:
        return A + B * math.cos(2 * theta) + c * math.sin(2 * theta)

    feasible = [th for th in candidates if lo - slack <= f(th) <= hi + slack]
    return max(feasible, key=lambda th: abs(math.sin(th)))


def _min_overlap(Q: Tensor, t: Tensor, lo: float, hi: float) -> float | None:
    """Least ``|<w, t>|`` over unit ``w`` with ``w^T Q w`` in [lo, hi], when ``t`` is an eigenvector of
    ``Q`` (else None). Writing ``w = c t + s z`` (z orthogonal to t), ``w^T Q w = c^2 l_t + s^2 z^T Q z``;
    the complement's quadratic form spans [nu, mu] (its smallest and largest eigenvalues)."""
    Qt = Q @ t
    l_t = float(t @ Qt)
    if float(torch.linalg.vector_norm(Qt - l_t * t)) > 1e-8 * max(float(torch.linalg.matrix_norm(Q)), 1e-300):
        return None
    P = torch.eye(Q.shape[0], dtype=Q.dtype) - torch.outer(t, t)
    evals, evecs = torch.linalg.eigh(P @ Q @ P)
    # the complement's spectrum: drop the eigenpair that belongs to t itself (eigenvalue 0, vector t)
    own = int(torch.argmax((evecs.T @ t).abs()))
    rest = torch.cat([evals[:own], evals[own + 1:]])
    nu, mu = float(rest.min()), float(rest.max())
    c2 = 0.0
    if lo > mu and l_t > mu:
        c2 = max(c2, (lo - mu) / (l_t - mu))
    if hi < nu and l_t < nu:
        c2 = max(c2, (nu - hi) / (nu - l_t))
    return math.sqrt(min(1.0, c2))
