"""Metric and state key names: built and parsed by hooks/keys.py, round trips and layer means."""

from __future__ import annotations

import pytest

from weightgeom.hooks import keys


@pytest.mark.parametrize("key, expected", [
    ("rsf_in/L3/q", keys.Key("rsf_in", 3, "q")),
    ("rsf_in/all/q", keys.Key("rsf_in", None, "q", mean=True)),
    ("spike_out/L12/down/top1", keys.Key("spike_out", 12, "down", "top1")),
    ("spike_in/L0/attn_in/erank", keys.Key("spike_in", 0, "attn_in", "erank")),
])
def test_parse_and_build_round_trip(key, expected):
    assert keys.parse(key) == expected
    assert str(expected) == key
    assert keys.metric(expected.family, expected.layer, expected.name, expected.stat) == key


@pytest.mark.parametrize("key", ["train/loss", "gap_pred", "rsf_in/Lx/q", "rsf_in/L1", "a/L1/b/c/d", "pref/accuracy"])
def test_other_keys_are_not_layer_keys(key):
    assert keys.parse(key) is None


def test_layer_of_matches_exactly_one_family():
    assert keys.layer_of("rsf_in/L2/k", "rsf_in") == (2, "k")
    assert keys.layer_of("rsf_in_frozen/L2/k", "rsf_in") is None  # a prefix is not the family
    assert keys.layer_of("rsf_in/all/k", "rsf_in") is None
    assert keys.layer_of("spike_in/L0/attn_in/top1", "spike_in") is None  # has a stat


def test_state_keys():
    key = keys.state_key("cov_in", keys.matrix_key(3, "attn_in"), "sum_outer")
    assert key == "cov_in/L3/attn_in/sum_outer"
    assert keys.parse_state_key(key) == ("cov_in", 3, "attn_in", "sum_outer")
    assert keys.parse_state_key("pred/W_U") is None and keys.parse_state_key("meta/cov_generator") is None


def test_layer_means_average_rsf_and_z_over_layers_only():
    metrics = {"rsf_in/L0/q": 1.0, "rsf_in/L1/q": 3.0, "z_in/L0/q": 4.0, "gap_in/L0/q": 0.5,
               "spike_in/L0/attn_in/top1": 0.2, "rsf_out_pred/L1/o": 2.0}
    assert keys.layer_means(metrics) == {"rsf_in/all/q": 2.0, "z_in/all/q": 4.0, "rsf_out_pred/all/o": 2.0}
