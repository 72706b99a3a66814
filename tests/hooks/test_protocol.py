"""Both suites implement the one trainer-facing interface, hooks.protocol.Suite, method for method and
with the same parameters: a method added to the protocol and missing from either suite fails here."""

from __future__ import annotations

import inspect

import pytest

from weightgeom.hooks.protocol import Suite
from weightgeom.hooks.suite import InstrumentSuite, NullSuite

MEMBERS = sorted(name for name, value in vars(Suite).items() if inspect.isfunction(value) and not name.startswith("_"))


def test_the_protocol_lists_what_trainers_call():
    assert {"attach", "detach", "attached", "set_loss_normalizer", "before_optimizer_step", "after_optimizer_step",
            "statistics_finite", "nonfinite_statistics", "snapshot_state", "load_state_dict"} <= set(MEMBERS)


@pytest.mark.parametrize("cls", [InstrumentSuite, NullSuite])
@pytest.mark.parametrize("name", MEMBERS)
def test_each_suite_has_every_method_with_the_protocols_parameters(cls, name):
    method = getattr(cls, name, None)
    assert callable(method), f"{cls.__name__} lacks {name}"
    expected = list(inspect.signature(getattr(Suite, name)).parameters)
    assert list(inspect.signature(method).parameters) == expected, (cls.__name__, name)


def test_a_null_suite_is_a_suite_at_run_time():
    assert isinstance(NullSuite(), Suite)


@pytest.mark.parametrize("cls", [InstrumentSuite, NullSuite])
def test_each_suite_says_what_it_skipped(cls, tiny_llama):
    suite = cls(tiny_llama) if cls is InstrumentSuite else cls()
    assert suite.skipped == []  # a causal LM with every role: nothing skipped
    assert isinstance(suite, Suite)
