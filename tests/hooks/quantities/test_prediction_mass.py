"""PredictionMass: the share of ``C_delta`` in the prediction subspace, against the per-token ``delta``
stored by plain hooks (energy of the deltas inside the subspace over their total energy), and its
closed-form z-score against sampled Haar subspaces."""

from __future__ import annotations

import pytest
import torch

from tests.hooks.brute_force import REL, K
from weightgeom.hooks import geometry as geo
from weightgeom.hooks import keys
from weightgeom.hooks.quantities import PredictionMass


def test_mass_is_the_energy_of_the_stored_deltas_inside_the_prediction_subspace(trained):
    metrics = trained.compute(PredictionMass())
    model = trained.model
    V, _ = geo.prediction_subspace(model.lm_head.weight, model.model.norm.weight, k=K)
    # every non-padding token's delta at L1/o's output, at the per-token loss scale (as C_delta holds them)
    deltas = trained.o_deltas
    inside = float((deltas @ V).square().sum())
    total = float(deltas.square().sum())
    expected = inside / total * 32 / K
    assert metrics["mass_pred/L1/o"] == pytest.approx(expected, rel=REL)
    assert metrics["mass_pred/L1/o"] == pytest.approx(geo.prediction_mass(trained.C_delta, V, K), rel=REL)


def test_z_score_is_the_haar_null_of_the_mass(trained):
    metrics = trained.compute(PredictionMass())
    C = trained.C_delta
    g = torch.Generator().manual_seed(0)
    samples = torch.stack([geo.subspace_energies(C, P).sum() / torch.trace(C)
                           for P in geo.haar_subspaces(4000, 32, K, g)])
    mass = metrics["mass_pred/L1/o"] * K / 32
    sampled = (mass - float(samples.mean())) / float(samples.std())
    assert metrics["mass_pred_z/L1/o"] == pytest.approx(sampled, rel=0.05)
    assert metrics["mass_pred_z/L1/o"] == pytest.approx(geo.mass_zscore(C, mass, K), rel=REL)


def test_only_write_roles_and_its_own_families(trained):
    metrics = trained.compute(PredictionMass())
    assert {keys.family(k) for k in metrics} == {"mass_pred", "mass_pred_z"}
    assert {keys.parse(k).name for k in metrics} == {"o", "down"}
    assert "mass_pred/all/o" in metrics and "mass_pred_z/all/down" in metrics
