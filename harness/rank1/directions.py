"""Directions for the rank-1 interventions: tested ones and the matched control families.

Every function is pure and returns float64 unit vectors as columns ``(dim, count)``. Randomness
comes only from a CPU ``torch.Generator`` built by :func:`family_generator` from the run's seed and
labels naming the family (layer, role, side, tested direction), so each control family can be
reproduced on its own, whatever other families a run asks for; the vectors are moved to the
reference tensor's device afterwards.

Control families (what a tested direction ``t`` is compared with):

* ``haar``: Haar-random unit directions (columns of Haar-random orthonormal frames).
* ``matched``: random directions whose quadratic form ``w^T Q w`` lies within a relative tolerance
  of ``t^T Q t`` (``Q = C_a`` on the input side; on the output side ``Q = C_delta``, or
  ``Q = M^T M`` with ``M = W_U diag(g)`` for prediction-subspace directions, whose value for a
  singular vector is its squared singular value), orthogonal to ``t`` where the spectrum allows.
  See :func:`variance_matched`: in a spiked spectrum only directions that overlap the top
  eigenvector can reach its value, so those controls overlap ``t``; their overlaps and the least
  possible overlap are returned and reported. Each control is a continuous function of ``Q`` and its
  random draw (:func:`matched_control`: a mirror-image tie is broken by the draw, not by rounding).
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

from weightgeom.hooks import geometry as geo


def family_generator(seed: int, *labels: object) -> torch.Generator:
    """A CPU generator seeded by hashing ``(seed, *labels)`` (63 bits of sha256): distinct labels give
    independent streams, equal ones the same stream."""
    digest = hashlib.sha256(repr((int(seed), *map(str, labels))).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def haar_directions(dim: int, count: int, generator: torch.Generator) -> Tensor:
    """``count`` Haar-random unit directions of R^dim as columns (dim, count), float64 on CPU.

    Drawn as Haar-random orthonormal frames (:func:`weightgeom.hooks.geometry.haar_subspace`): the columns are
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

    @property
    def pairwise_overlap(self) -> float:
        """Mean ``|<w_i, w_j>|`` over pairs of controls: near 1 when the band leaves little room, so that
        the controls are nearly one direction (their spread, and so a z-score's denominator, is small)."""
        k = self.directions.shape[1]
        if k < 2:
            return float("nan")
        gram = (self.directions.T @ self.directions).abs()
        return float((gram.sum() - gram.diagonal().sum()) / (k * (k - 1)))


def variance_matched(Q: Tensor, t: Tensor, count: int, tol: float, generator: torch.Generator) -> Matched:
    """``count`` random unit directions ``w`` with ``w^T Q w`` in ``[(1 - tol) q, (1 + tol) q]``,
    ``q = t^T Q t``, overlapping ``t`` as little as the spectrum allows.

    Each control comes from a Gaussian draw ``g`` (:func:`matched_control`): ``p``, the part of ``g``
    orthogonal to ``t``, if ``p^T Q p / p^T p`` is in the band; otherwise the band point nearest ``p``
    on the great circle through ``p`` and ``e``, the extreme eigenvector of ``Q`` restricted to ``t``'s
    orthogonal complement on the band's side (the top one when ``p`` lies below the band, the bottom
    one when above), whose value is ``mu``. Overlap with ``t``: 0. When only directions near ``e``
    reach the band (a spiked spectrum), the controls are near ``e`` (the random part is what the band
    leaves).

    When that circle misses the band (``mu`` short of it: ``t`` is, or is close to, the top
    eigenvector of a spiked ``Q``, and nothing orthogonal to it has enough variance), ``s`` is the
    point of the circle nearest ``p`` with value within ``tol`` of ``mu``, and ``w`` is the point of the
    circle from ``t`` towards ``s`` that lies in the band and is farthest from ``t``. For ``t`` the top
    eigenvector with ``l1 >> l2`` every direction in the band has ``cos^2 >= ((1 - tol) l1 - l2) / (l1
    - l2)`` with ``t`` (``min_overlap``); these controls come within the ``tol`` slack of that bound.

    The selection is a continuous function of ``Q`` (statistics perturbed at float-noise level move the
    controls at that level), except at isolated values: where ``lo`` or ``hi`` crosses ``mu`` (the
    circle starts or stops reaching the band: then ``min_overlap`` is near 0 and the overlaps are
    not) and where the complement's extreme eigenvalue is degenerate (``e`` turns).

    On each circle the quadratic form is a sinusoid in the angle, so the band's edges are solved in
    closed form (:func:`widest_angle_in_band`). ``overlaps`` and ``min_overlap`` say how close to ``t``
    the controls had to be.
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
    if tuple(Q.shape) != (d, d) or d < 3:
        raise ValueError(f"Q must be ({d}, {d}) to match t, with d >= 3; got {tuple(Q.shape)}")
    q_t = float(t @ Q @ t)
    lo, hi = q_t * (1 - tol), q_t * (1 + tol)
    P = torch.eye(d, dtype=torch.float64) - torch.outer(t, t)
    evals, evecs = torch.linalg.eigh(P @ Q @ P)
    own = int(torch.argmax((evecs.T @ t).abs()))  # the eigenpair (0, t) of P Q P
    keep = [i for i in range(d) if i != own]
    extremes = (evecs[:, keep[0]], evecs[:, keep[-1]])  # bottom and top of t's complement
    cols = [matched_control(Q, t, torch.randn(d, generator=generator, dtype=torch.float64), extremes, tol)
            for _ in range(count)]
    W = torch.stack(cols, dim=1)
    return Matched(W, torch.einsum("ic,ij,jc->c", W, Q, W), (W.T @ t).abs(), q_t, lo, hi, _min_overlap(Q, t, lo, hi))


def matched_control(Q: Tensor, t: Tensor, g: Tensor, extremes: tuple[Tensor, Tensor], tol: float) -> Tensor:
    """One control of :func:`variance_matched` from the Gaussian draw ``g``; ``extremes``: the bottom and
    top eigenvectors of ``Q`` restricted to the orthogonal complement of the unit vector ``t``.

    Mirror images: on a circle ``cos(a) x + sin(a) y`` with ``x^T Q y = 0`` the quadratic form is
    symmetric about ``y``, so ``w`` and its mirror image ``-cos(a) x + sin(a) y`` are equally good.
    That holds on every circle from ``e`` towards ``r`` (``e^T Q r = e^T (P Q P) r = mu e^T r = 0``),
    and on the circle from ``t`` towards ``s`` when ``t`` is an eigenvector of ``Q`` (every tested
    direction is). The two edits differ (``G w`` adds or subtracts ``G x``), so the choice decides the
    control, and it is taken from the draw, not from rounding: ``w``'s ``e`` part has the sign of
    ``<g, e>`` and its ``t`` part the sign of ``<g, t>`` (``w`` is the mirror image nearer ``g``), which
    also makes the controls independent of the arbitrary signs of the eigenvectors. Left to rounding,
    the choice flipped for most controls when ``Q`` changed by 1e-6 relative (docs/rank1.md).
    """
    q_t = float(t @ Q @ t)
    lo, hi = q_t * (1 - tol), q_t * (1 + tol)
    p = g - (t @ g) * t
    p = p / torch.linalg.vector_norm(p)
    q_p = float(p @ Q @ p)
    if lo <= q_p <= hi:
        return p
    climb = q_p < lo  # towards the top of the complement, or down towards its bottom
    e = extremes[1] if climb else extremes[0]
    mu = float(e @ Q @ e)
    r = p - (e @ p) * e
    r = r / torch.linalg.vector_norm(r)
    q_r, c_er = float(r @ Q @ r), float(e @ Q @ r)
    side_e, side_t = _sign(float(e @ g)), _sign(float(t @ g))
    phi = widest_angle_in_band(mu, q_r, c_er, lo, hi, prefer=side_e)
    if phi is not None:  # orthogonal to t
        return math.cos(phi) * e + math.sin(phi) * r
    # the complement falls short of the band: within tol of mu orthogonally, then towards t until the band
    near = (mu * (1 - tol), mu) if climb else (mu, mu * (1 + tol))
    phi = widest_angle_in_band(mu, q_r, c_er, *near, prefer=side_e)
    s = math.cos(phi) * e + math.sin(phi) * r
    theta = widest_angle_in_band(q_t, float(s @ Q @ s), float(t @ Q @ s), lo, hi, prefer=side_t)
    w = math.cos(theta) * t + math.sin(theta) * s
    return w / torch.linalg.vector_norm(w)


def _sign(x: float) -> float:
    return -1.0 if x < 0 else 1.0


# |sin| values closer than this are one point and its mirror image (equal up to rounding): the tie
# that widest_angle_in_band breaks by ``prefer``. Rounding makes them differ by ~1e-16; a genuinely
# asymmetric circle (t no eigenvector of Q) by far more.
MIRROR_TIE = 1e-9


def widest_angle_in_band(q_a: float, q_b: float, c: float, lo: float, hi: float, prefer: float = 1.0) -> float | None:
    """On the great circle ``w(theta) = cos(theta) a + sin(theta) b`` (orthonormal a, b), with
    ``f(theta) = w^T Q w = cos^2 q_a + sin^2 q_b + 2 sin cos c`` (``q_a = a^T Q a``, ``q_b = b^T Q b``,
    ``c = a^T Q b``): the angle in [0, pi) with ``f`` in [lo, hi] and the largest ``|sin theta|``
    (closest to ``b``, farthest from ``a``); None when no point of the circle is in the band.

    ``f = A + R cos(2 theta - phi)``; the feasible angles form arcs whose ends solve ``f = lo`` or
    ``f = hi``, and ``|sin|`` on an arc peaks at pi/2 or at an end, so those are the candidates.
    With ``c = 0``, ``f`` is symmetric about pi/2 and ``theta`` and ``pi - theta`` (the mirror images
    ``+-cos(theta) a + sin(theta) b``) tie; candidates within ``MIRROR_TIE`` of the largest ``|sin|``
    are such a tie, and the one whose ``cos theta`` has the sign of ``prefer`` is returned, so the
    choice never rests on rounding.
    """
    A, B = (q_a + q_b) / 2, (q_a - q_b) / 2
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
    if not feasible:
        return None
    widest = max(abs(math.sin(th)) for th in feasible)
    tied = [th for th in feasible if abs(math.sin(th)) >= widest - MIRROR_TIE]
    return max(tied, key=lambda th: _sign(prefer) * math.cos(th))


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
