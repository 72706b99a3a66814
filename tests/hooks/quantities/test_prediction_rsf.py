"""PredictionRSF: the output side of the write roles against the prediction subspace (top-k right
singular vectors of ``W_U diag(g)``), with z-scores and the eigengap ``gap_pred``, against brute force."""

from __future__ import annotations

import pytest
import torch

from tests.hooks.brute_force import REL, K
from weightgeom.hooks import geometry as geo
from weightgeom.hooks import keys
from weightgeom.hooks.quantities import PredictionRSF


def test_rsf_out_pred_of_each_view_z_and_gap_match_brute_force(trained):
    metrics = trained.compute(PredictionRSF())
    model = trained.model
    V, svals = geo.prediction_subspace(model.lm_head.weight, model.model.norm.weight, k=K)
    for view, M in (("", trained.dW["o"]), ("_update", trained.update["o"]), ("_grad", trained.grads["o"][-1])):
        expected = geo.relative_rsf(geo.rsf_out(M, V), K, 32)
        assert metrics[f"rsf_out_pred{view}/L1/o"] == pytest.approx(expected, rel=REL), view
    z = geo.rsf_zscore(trained.dW["o"], geo.rsf_out(trained.dW["o"], V), K, "out")
    assert metrics["z_out_pred/L1/o"] == pytest.approx(z, rel=REL)
    assert metrics["gap_pred"] == pytest.approx(geo.eigengap(svals.pow(2), K), rel=REL)


def test_prediction_subspace_is_built_by_hand_from_the_unembedding_and_gain(trained):
    """The brute force above uses geometry.prediction_subspace; here the subspace is the SVD of
    W_U diag(g) written out, so a wrong gain convention inside it would fail."""
    model = trained.model
    W = model.lm_head.weight.detach().double() * model.model.norm.weight.detach().double()[None, :]
    V = torch.linalg.svd(W, full_matrices=False).Vh[:K].T
    dW = trained.dW["down"]
    expected = float((V.T @ dW).pow(2).sum() / dW.pow(2).sum()) * 32 / K
    assert trained.compute(PredictionRSF())["rsf_out_pred/L1/down"] == pytest.approx(expected, rel=REL)


def test_only_write_roles_and_its_own_families(trained):
    metrics = trained.compute(PredictionRSF())
    assert {keys.family(k) for k in metrics} == {"rsf_out_pred", "rsf_out_pred_update", "rsf_out_pred_grad",
                                                  "z_out_pred", "gap_pred"}
    assert {parsed.name for k in metrics if (parsed := keys.parse(k))} == {"o", "down"}
