"""InputRSF: the input side of each written matrix against the top-k eigenvectors of its input group's
``C_a`` (live, and frozen after the first step), with z-scores and eigengaps, against brute force."""

from __future__ import annotations

import pytest

from tests.hooks.brute_force import REL, K
from weightgeom.hooks import geometry as geo
from weightgeom.hooks import keys
from weightgeom.hooks.quantities import InputRSF


def test_rsf_in_of_each_view_z_and_gap_match_brute_force(trained):
    metrics = trained.compute(InputRSF())
    U, evals = geo.top_eigvecs(trained.C_a, K)
    for view, M in (("", trained.dW["q"]), ("_update", trained.update["q"]), ("_grad", trained.grads["q"][-1])):
        expected = geo.relative_rsf(geo.rsf_in(M, U), K, 32)
        assert metrics[f"rsf_in{view}/L0/q"] == pytest.approx(expected, rel=REL), view
    assert metrics["gap_in/L0/q"] == pytest.approx(geo.eigengap(evals, K), rel=REL)
    z = geo.rsf_zscore(trained.dW["q"], geo.rsf_in(trained.dW["q"], U), K, "in")  # exact; sampled: test_geometry
    assert metrics["z_in/L0/q"] == pytest.approx(z, rel=REL)
    U_down = geo.top_eigvecs(trained.C_down_in, K)[0]
    assert metrics["rsf_in/L1/down"] == pytest.approx(geo.relative_rsf(geo.rsf_in(trained.dW["down"], U_down), K, 64),
                                                      rel=REL)


def test_frozen_subspace_is_the_covariance_after_the_first_step(trained):
    metrics = trained.compute(InputRSF())
    frozen = geo.relative_rsf(geo.rsf_in(trained.dW["q"], geo.top_eigvecs(trained.C_a_step1, K)[0]), K, 32)
    assert metrics["rsf_in_frozen/L0/q"] == pytest.approx(frozen, rel=REL)
    assert abs(frozen - metrics["rsf_in/L0/q"]) > 1e-3  # the two subspaces differ, so this can fail


def test_only_its_own_families(trained):
    families = {keys.family(k) for k in trained.compute(InputRSF())}
    assert families == {"rsf_in", "rsf_in_update", "rsf_in_grad", "z_in", "gap_in", "rsf_in_frozen"}
