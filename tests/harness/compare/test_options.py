"""``CompareOptions``: the one settings object of a comparison. The CLI's flags fill it with the Python API's
defaults, keyword overrides replace its fields, and a bad value or an unknown name fails on construction."""

from __future__ import annotations

import argparse

import pytest

from weightgeom.harness.compare.cli import add_compare_parser, options_from_args
from weightgeom.harness.compare.options import CompareOptions, mass_loss


def parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_compare_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["compare", "BASE", "AFTER", *flags])


def test_the_cli_fills_the_same_object_with_the_same_defaults():
    assert options_from_args(parse()) == CompareOptions()
    got = options_from_args(parse("--text", "t.jsonl", "--text-field", "body", "--k", "4", "--k-curve", "1,2",
                                  "--unembed", "base", "--c-a", "s.safetensors", "--c-a-model", "after",
                                  "--n-tokens", "64", "--seq-len", "16", "--batch-size", "2", "--no-zscores",
                                  "--seed", "3", "--tokenizer", "tok"))
    assert got == CompareOptions(text="t.jsonl", text_field="body", k=4, k_curve=(1, 2), unembed="base",
                                 c_a="s.safetensors", c_a_model="after", n_tokens=64, seq_len=16, batch_size=2,
                                 zscores=False, seed=3, tokenizer="tok")
    got = options_from_args(parse("--no-read-side", "--layers", "3", "1", "--seeds", "0", "1", "2", "--mass", "ce",
                                  "dpo,g0.5", "--mass-model", "base", "--mass-tokens", "100", "--pairs", "p.jsonl",
                                  "--n-pairs", "9", "--max-len", "64", "--beta", "0.2"))
    assert got == CompareOptions(read_side=False, layers=(1, 3), seeds=(0, 1, 2), mass=("ce", "dpo", "g0.5"),
                                 mass_model="base", mass_tokens=100, pairs="p.jsonl", n_pairs=9, max_len=64, beta=0.2)
    assert options_from_args(parse("--seeds", "0,1,2")).seeds == (0, 1, 2)  # either way of listing


def test_overrides_replace_fields_and_are_checked():
    assert CompareOptions(k=2).replace(k_curve=[1, 2]) == CompareOptions(k=2, k_curve=(1, 2))
    assert CompareOptions(k_curve=[4, 8]).k_curve == (4, 8)  # a list (from a caller) is kept as a tuple
    with pytest.raises(TypeError, match="unknown compare option 'kk'; CompareOptions has .*'k_curve'"):
        CompareOptions().replace(kk=4)
    for changes, message in (({"k": 0}, "--k must be >= 1"), ({"k_curve": ()}, "--k-curve needs"),
                             ({"unembed": "before"}, "--unembed must be one of"),
                             ({"c_a_model": "x"}, "--c-a-model must be"), ({"seq_len": 0}, "--seq-len must be >= 1"),
                             ({"seeds": ()}, "--seeds needs"), ({"seeds": (1, 1)}, "--seeds repeats"),
                             ({"layers": (-1,)}, "--layers needs"), ({"mass": ("g",)}, "--mass: unknown loss 'g'"),
                             ({"n_pairs": 0}, "--n-pairs must be >= 1"), ({"max_len": 1}, "--max-len must be >= 2")):
        with pytest.raises(ValueError, match=message):
            CompareOptions(**changes)
        with pytest.raises(ValueError, match=message):
            CompareOptions().replace(**changes)


def test_mass_loss_names():
    assert [mass_loss(n) for n in ("ce", "dpo", "likelihood", "g0", "g0.5", "g1", "g.25", "mix0.5")] == [
        ("ce", None), ("graded", 1.0), ("graded", 0.0), ("graded", 0.0), ("graded", 0.5), ("graded", 1.0),
        ("graded", 0.25), ("mixture", 0.5)]
    assert CompareOptions().c_a_checkpoint(base_is_init=False) == "base"
    assert CompareOptions().c_a_checkpoint(base_is_init=True) == "after"
    assert CompareOptions(c_a_model="base").c_a_checkpoint(base_is_init=True) == "base"
