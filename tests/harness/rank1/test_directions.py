"""The control directions of the rank-1 test: Haar, lower-principal and variance-matched directions,
and the z-score against a family."""

from __future__ import annotations

import math

import pytest
import torch

from tests.harness.rank1.helpers import rand_psd
from weightgeom.core.config import Rank1Config
from weightgeom.harness.rank1.directions import (
    family_generator,
    haar_directions,
    lower_ranks,
    variance_matched,
    widest_angle_in_band,
)
from weightgeom.harness.rank1.experiment import control_layers, zscore, zscore_se
from weightgeom.hooks import geometry as geo

# ----- controls --------------------------------------------------------------------------------------

def test_haar_controls_are_orthonormal_unit_and_reproducible_from_the_seed():
    H = haar_directions(16, 10, family_generator(7, "haar", "L0/q", "in"))
    assert torch.allclose(H.T @ H, torch.eye(10, dtype=torch.float64), atol=1e-12)
    assert torch.equal(H, haar_directions(16, 10, family_generator(7, "haar", "L0/q", "in")))
    assert not torch.allclose(H, haar_directions(16, 10, family_generator(8, "haar", "L0/q", "in")))
    assert not torch.allclose(H, haar_directions(16, 10, family_generator(7, "haar", "L1/q", "in")))
    wide = haar_directions(4, 10, family_generator(0))  # more than dim: orthonormal frames of 4
    assert torch.allclose(wide.norm(dim=0), torch.ones(10, dtype=torch.float64))
    assert torch.allclose(wide[:, :4].T @ wide[:, :4], torch.eye(4, dtype=torch.float64), atol=1e-12)


def test_lower_ranks_spread_from_below_the_tested_ones_to_the_bottom():
    assert lower_ranks(2, 32, 4) == [2, 12, 21, 31]
    assert lower_ranks(1, 3, 8) == [1, 2]
    assert lower_ranks(1, 8, 0) == []


def test_variance_matched_controls_lie_in_the_band_with_the_least_overlap_the_spectrum_allows():
    Q = rand_psd(12, 4, spike=20.0)  # one spiked direction
    evals, evecs = geo.sym_eigh(Q)
    tol = 0.1
    mixed = evecs[:, 0] + 0.5 * evecs[:, 1] + 0.3 * evecs[:, 5]  # no eigenvector
    for rank, t in ((0, evecs[:, 0]), (3, evecs[:, 3]), (None, mixed / mixed.norm())):
        match = variance_matched(Q, t, 25, tol, family_generator(0, "matched", rank))
        W = match.directions
        q = float(t @ Q @ t)
        values = torch.einsum("ic,ij,jc->c", W, Q, W)
        assert torch.allclose(W.norm(dim=0), torch.ones(25, dtype=torch.float64))
        assert float(values.min()) >= q * (1 - tol) * (1 - 1e-10) and float(values.max()) <= q * (1 + tol) * (1 + 1e-10)
        assert torch.allclose(values, match.values)
        assert torch.allclose((W.T @ t).abs(), match.overlaps)
        assert torch.equal(W, variance_matched(Q, t, 25, tol, family_generator(0, "matched", rank)).directions)
        assert float((W.T @ W - torch.eye(25, dtype=torch.float64)).abs().max()) < 1 - 1e-6  # distinct controls
        assert (match.min_overlap is None) == (rank is None)
        assert rank is None or float(match.overlaps.min()) >= match.min_overlap - 1e-9
        # no point of the great circle from t through a control is in the band and farther from t
        for c in range(25):
            w = W[:, c]
            r = w - w.dot(t) * t
            r = r / r.norm()
            thetas = torch.linspace(0, math.pi, 20001, dtype=torch.float64)
            circle = torch.cos(thetas)[:, None] * t + torch.sin(thetas)[:, None] * r
            f = torch.einsum("ti,ij,tj->t", circle, Q, circle)
            feasible = (f >= q * (1 - tol)) & (f <= q * (1 + tol))
            assert float(torch.sin(thetas[feasible]).abs().max()) <= math.sqrt(1 - float(match.overlaps[c]) ** 2) + 1e-4
    # the spiked top eigenvector: every vector in the band must overlap it (the spectrum's bound); the
    # controls come within the tol slack of the bound: they mix t with a direction of >= (1 - tol) l2
    l1, l2 = float(evals[0]), float(evals[1])
    top = variance_matched(Q, evecs[:, 0], 25, tol, family_generator(1))
    assert top.min_overlap == pytest.approx(math.sqrt(((1 - tol) * l1 - l2) / (l1 - l2)), rel=1e-9)
    worst = math.sqrt(((1 - tol) * l1 - (1 - tol) * l2) / (l1 - (1 - tol) * l2))
    assert top.min_overlap > 0.8 and float(top.overlaps.max()) <= worst + 1e-9
    # a lower eigenvector's band, and a top one without a dominant spike, are reachable orthogonally
    assert variance_matched(Q, evecs[:, 3], 5, tol, family_generator(1)).overlaps.max() < 1e-9
    flat = torch.diag(torch.tensor([10.0, 9.5, 9.2, 3.0, 2.0, 1.0, 1.0, 0.5], dtype=torch.float64))
    near = variance_matched(flat, torch.eye(8, dtype=torch.float64)[:, 0], 10, tol, family_generator(2))
    assert near.min_overlap == 0.0 and float(near.overlaps.max()) < 1e-9
    gram = (near.directions.T @ near.directions).abs()
    assert near.pairwise_overlap == pytest.approx(float((gram.sum() - 10) / 90), rel=1e-9)
    assert near.pairwise_overlap > 0.5  # the band [9, 11] holds little besides e_2 = 9.5 and e_3 = 9.2
    assert variance_matched(torch.eye(8, dtype=torch.float64), torch.eye(8, dtype=torch.float64)[:, 0], 10, tol,
                            family_generator(3)).pairwise_overlap < 0.5  # isotropic: spread-out controls


def _perturbed(Q: torch.Tensor, rel: float, seed: int) -> torch.Tensor:
    """``Q`` with every entry changed by ``rel`` relative (symmetric Gaussian factors)."""
    xi = torch.randn(Q.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return Q * (1 + rel * (xi + xi.T) / math.sqrt(2))


def _flat_top(n: int, seed: int) -> torch.Tensor:
    """A randomly rotated form whose top eigenvalue has close neighbours (10, 9.6, 9.3, then 3 .. 0.5)."""
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    spectrum = torch.cat([torch.tensor([10.0, 9.6, 9.3], dtype=torch.float64),
                          torch.linspace(3.0, 0.5, n - 3, dtype=torch.float64)])
    return (V * spectrum) @ V.T


@pytest.mark.parametrize(("form", "rank", "orthogonal"), [("spiked", 0, False), ("flat", 0, True), ("spiked", 1, True)])
def test_variance_matched_controls_move_with_the_form_not_with_rounding(form, rank, orthogonal):
    """Each control has an equally good mirror image (the form has no cross terms between t, e and r);
    the draw picks it, so a 1e-6 relative change of Q, and the arbitrary sign of the eigenvector t,
    move every control by about 1e-6 instead of re-drawing it. Spiked top eigenvector: controls
    rotated from t (construction 2); flat top and the second eigenvector: orthogonal to t (1)."""
    Q = rand_psd(12, 4, spike=20.0) if form == "spiked" else _flat_top(12, 4)
    t = geo.sym_eigh(Q)[1][:, rank]
    match = variance_matched(Q, t, 25, 0.1, family_generator(0, "matched", rank))
    assert (float(match.overlaps.max()) < 1e-9) == orthogonal  # the construction meant
    for seed in (1, 2, 3):
        Q2 = _perturbed(Q, 1e-6, seed)
        t2 = geo.sym_eigh(Q2)[1][:, rank]
        for sign in (1.0, -1.0):
            moved = variance_matched(Q2, sign * t2, 25, 0.1, family_generator(0, "matched", rank)).directions
            # a direction's edit ignores its sign: compare up to sign
            gap = torch.minimum((moved - match.directions).norm(dim=0), (moved + match.directions).norm(dim=0))
            assert float(gap.max()) < 1e-4, f"seed {seed}, sign {sign}: a control moved by {float(gap.max()):.3g}"


def test_widest_angle_in_band_breaks_a_mirror_tie_by_the_preferred_side_not_by_rounding():
    """c = 0: the circle's form is symmetric about b, theta and pi - theta (+-cos(theta) a + sin(theta) b)
    tie; ``prefer`` picks the side of a, whatever sign rounding gives c."""
    ahead = widest_angle_in_band(5.0, 1.0, 0.0, 4.0, 4.6, prefer=1.0)
    behind = widest_angle_in_band(5.0, 1.0, 0.0, 4.0, 4.6, prefer=-1.0)
    assert ahead < math.pi / 2 < behind and ahead + behind == pytest.approx(math.pi, abs=1e-12)
    for c in (1e-15, -1e-15):
        assert widest_angle_in_band(5.0, 1.0, c, 4.0, 4.6, prefer=1.0) == pytest.approx(ahead, abs=1e-9)
        assert widest_angle_in_band(5.0, 1.0, c, 4.0, 4.6, prefer=-1.0) == pytest.approx(behind, abs=1e-9)
    # a genuinely asymmetric circle has one widest point, whatever the preference
    assert widest_angle_in_band(5.0, 1.0, 1.5, 4.0, 4.6, prefer=1.0) == widest_angle_in_band(5.0, 1.0, 1.5, 4.0, 4.6,
                                                                                               prefer=-1.0)


def test_widest_angle_in_band_matches_a_brute_force_search_on_the_circle():
    thetas = torch.linspace(0, math.pi, 200001, dtype=torch.float64)[:-1]
    for q_a, q_b, c, lo, hi in ((5.0, 1.0, 1.5, 4.0, 4.6), (5.0, 1.0, -1.5, 4.0, 4.6), (2.0, 2.5, 0.7, 1.9, 2.1),
                                (3.0, 1.0, 0.0, 2.5, 3.5), (1.0, 6.0, 2.0, 6.5, 9.0)):
        f = q_a * torch.cos(thetas) ** 2 + q_b * torch.sin(thetas) ** 2 + 2 * c * torch.sin(thetas) * torch.cos(thetas)
        feasible = (f >= lo) & (f <= hi)
        angle = widest_angle_in_band(q_a, q_b, c, lo, hi)
        if not bool(feasible.any()):
            assert angle is None
            continue
        best = float(torch.sin(thetas[feasible]).abs().max())
        assert abs(math.sin(angle)) == pytest.approx(best, abs=1e-4)
        value = q_a * math.cos(angle) ** 2 + q_b * math.sin(angle) ** 2 + 2 * c * math.sin(angle) * math.cos(angle)
        assert lo - 1e-9 <= value <= hi + 1e-9
    assert widest_angle_in_band(1.0, 2.0, 0.0, 5.0, 6.0) is None


def test_zscore_uses_the_sample_std_and_refuses_to_divide_by_no_spread():
    z, mean, std = zscore(5.0, [1.0, 2.0, 3.0])
    assert (mean, std) == (2.0, 1.0) and z == 3.0
    assert zscore(5.0, [1.0])[0] is None
    assert zscore(5.0, [2.0, 2.0, 2.0])[0] is None


def test_zscore_se_is_the_spread_of_z_over_redrawn_normal_families():
    """The standard error of z is how far z moves when its n controls are drawn again (x fixed): checked
    against 100,000 redrawn normal families; the delta method's sqrt(1/n + z^2 / (2 (n - 1))) is low."""
    g = torch.Generator().manual_seed(0)
    for n in (8, 12):
        controls = torch.randn(100_000, n, generator=g, dtype=torch.float64)
        mean, std = controls.mean(1), controls.std(1)
        for z in (0.0, 1.0, 3.0):
            spread = float(((z - mean) / std).std())
            assert zscore_se(z, n) == pytest.approx(spread, rel=0.03)
            assert zscore_se(z, n) > math.sqrt(1 / n + z * z / (2 * (n - 1)))
    assert zscore_se(None, 10) is None and zscore_se(1.0, 3) == math.inf
    assert zscore_se(-2.0, 10) == zscore_se(2.0, 10)


def test_layer_controls_are_every_other_layer_or_an_even_spread_over_them():
    assert control_layers(2, 4, None) == [0, 1, 3]
    assert control_layers(15, 30, 4) == [0, 9, 20, 29]  # first and last of the 29 others kept
    assert control_layers(0, 30, 2) == [1, 29]
    assert control_layers(1, 4, 5) == [0, 2, 3]  # more than there are: all of them
    with pytest.raises(ValueError, match="layer_controls"):
        Rank1Config(layer_controls=1)
