"""Coherence ``‖sum_t G_t‖² / sum_t ‖G_t‖²`` of the raw gradients over the phase's steps, against the
gradients read off the parameters at every step."""

from __future__ import annotations

import pytest

from tests.hooks.brute_force import REL
from weightgeom.hooks import keys
from weightgeom.hooks.quantities import Coherence


def test_coherence_matches_the_recorded_gradients(trained):
    metrics = trained.compute(Coherence())
    for name, key in (("q", "L0/q"), ("o", "L1/o"), ("down", "L1/down")):
        G = trained.grads[name]
        expected = float(sum(G).pow(2).sum()) / sum(float(g.pow(2).sum()) for g in G)
        assert metrics[f"coherence/{key}"] == pytest.approx(expected, rel=REL), key
        assert 0 <= expected <= len(G)  # between cancelling and identical gradients


def test_only_its_own_family(trained):
    assert {keys.family(k) for k in trained.compute(Coherence())} == {"coherence"}
