"""Spikiness: top-1 share, top-k share, participation ratio and effective rank of every measured
covariance, against the spectra of the brute-force second moments."""

from __future__ import annotations

import math

import pytest
import torch

from tests.hooks.brute_force import REL, K
from weightgeom.hooks import keys
from weightgeom.hooks.quantities import Spikiness


def test_spikiness_of_c_a_and_c_delta_match_their_spectra(trained):
    metrics = trained.compute(Spikiness())
    for key, C in (("spike_in/L0/attn_in", trained.C_a), ("spike_in/L1/o_in", trained.C_o_in),
                   ("spike_in/L1/down_in", trained.C_down_in), ("spike_out/L1/o", trained.C_delta)):
        l = torch.linalg.eigvalsh(C).flip(0).clamp_min(0)  # descending, clipped at 0
        p = l / l.sum()
        expected = {"top1": float(p[0]), "topk": float(p[:K].sum()), "pr": float(l.sum() ** 2 / l.pow(2).sum()),
                    "erank": math.exp(float(-(p[p > 0] * p[p > 0].log()).sum()))}
        for stat, value in expected.items():
            assert metrics[f"{key}/{stat}"] == pytest.approx(value, rel=REL), (key, stat)


def test_only_its_own_families(trained):
    metrics = trained.compute(Spikiness())
    assert {keys.family(k) for k in metrics} == {"spike_in", "spike_out"}
    assert {keys.parse(k).stat for k in metrics} == {"top1", "topk", "pr", "erank"}
