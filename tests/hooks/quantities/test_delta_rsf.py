"""DeltaRSF: the output side against the top-k eigenvectors of ``C_delta`` (per-token output gradients
at the per-token loss scale), with z-scores and eigengaps, against brute force."""

from __future__ import annotations

import pytest

from tests.hooks.brute_force import REL, K
from weightgeom.hooks import geometry as geo
from weightgeom.hooks import keys
from weightgeom.hooks.quantities import DeltaRSF


def test_rsf_out_delta_z_and_gap_match_brute_force(trained):
    metrics = trained.compute(DeltaRSF())
    V, evals = geo.top_eigvecs(trained.C_delta, K)
    for view, M in (("", trained.dW["o"]), ("_update", trained.update["o"]), ("_grad", trained.grads["o"][-1])):
        expected = geo.relative_rsf(geo.rsf_out(M, V), K, 32)
        assert metrics[f"rsf_out_delta{view}/L1/o"] == pytest.approx(expected, rel=REL), view
    z = geo.rsf_zscore(trained.dW["o"], geo.rsf_out(trained.dW["o"], V), K, "out")
    assert metrics["z_out_delta/L1/o"] == pytest.approx(z, rel=REL)
    assert metrics["gap_out_delta/L1/o"] == pytest.approx(geo.eigengap(evals, K), rel=1e-4)


def test_only_its_own_families(trained):
    families = {keys.family(k) for k in trained.compute(DeltaRSF())}
    assert families == {"rsf_out_delta", "rsf_out_delta_update", "rsf_out_delta_grad", "z_out_delta",
                        "gap_out_delta"}
