"""core.preflight's role-table check agrees with the instruments: a local model whose type has no row
passes when the generic fallback maps it by module names, and fails with the role-table error when not."""

from __future__ import annotations

import pytest
import transformers

from weightgeom.core.config import ConfigError
from weightgeom.core.preflight import check_instruments, skeleton_model
from weightgeom.hooks.roles import ARCHITECTURES, InferredRolesWarning
from weightgeom.hooks.suite import SuiteConfig


def test_a_type_the_fallback_maps_passes_and_one_it_cannot_fails(tmp_path):
    assert "starcoder2" not in ARCHITECTURES
    transformers.Starcoder2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=48).save_pretrained(tmp_path / "sc2")
    skeleton = skeleton_model(None, str(tmp_path / "sc2"))
    with pytest.warns(InferredRolesWarning, match="up=mlp.c_fc"):
        assert check_instruments(skeleton, SuiteConfig(k=4)) == []
    with pytest.raises(ConfigError, match="instruments.k=32 is not below the smallest measured dimension"):
        check_instruments(skeleton, SuiteConfig(k=32))  # the fallback's matrices are checked like a row's
    transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                            intermediate_size=64).save_pretrained(tmp_path / "bert")
    with pytest.raises(ConfigError, match="holds a 'bert' model, which has no role table"):
        skeleton_model(None, str(tmp_path / "bert"))
