"""Recipe validation: each section checks its own fields, every alignment loss takes exactly its own
settings, and errors name the key and the file."""

from __future__ import annotations

import pytest
import yaml

from weightgeom.core.config import (
    ConfigError,
    GradedObjective,
    MixtureObjective,
    TrlObjective,
    load_config,
    saved_objective,
)
from weightgeom.harness.pipeline import validate_recipe


def write(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("override, message", [
    ("train.lr=0", "key 'train.lr' must be > 0, got 0"),
    ("align.train.steps=0", "key 'align.train.steps' must be > 0"),
    ("model.num_heads=3", "key 'model.hidden_size' (128) must be divisible by model.num_heads (3)"),
    ("model.arch=opt", "key 'model.arch' must be one of ['gemma', 'gemma2', 'gemma3_text', 'gpt2', "
                       "'gpt_neox', 'llama', 'mistral', 'mixtral', 'olmo', 'olmo2', 'phi3', 'qwen2', "
                       "'qwen2_moe', 'qwen3', 'qwen3_moe']"),
    ("instruments.k=0", "instruments.k must be >= 1, got 0"),
    ("instruments.n_random=20", "key 'instruments.n_random' is gone: z-scores are now exact"),
    ("instruments.metric_dtype=float16", "key 'instruments.metric_dtype' must be one of ['float32', 'float64']"),
    ("instruments.roles=[q,zz]", "instruments.roles has unknown roles ['zz']"),
    ("data.eval_fraction=1.5", "key 'data.eval_fraction' must be in [0, 1)"),
    ("align.objectives=[{name: a},{name: a}]", "key 'align.objectives' names must be unique"),
    ("rank1.n_random=1", "key 'rank1.n_random' must be >= 2 (a z-score needs a spread), got 1"),
    ("rank1.roles=[q,zz]", "key 'rank1.roles' needs at least one of"),
    ("rank1.eps=-0.5", "key 'rank1.eps' (the edit's Frobenius norm) must be a finite number > 0"),
    ("rank1.text_blocks=0", "key 'rank1.text_blocks' must be > 0, got 0"),
])
def test_a_bad_value_names_its_key_and_where_it_came_from(tmp_path, override, message):
    """From the command line: the error names the override, not the recipe file. In the file: the file."""
    path = write(tmp_path, "name: x\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["seed=1", override])
    assert message in str(err.value) and str(err.value).startswith(f"command line ({override}): ")
    key, _, value = override.partition("=")
    tree = yaml.safe_load(value)
    for part in reversed(key.split(".")):  # the same setting written in the recipe file
        tree = {part: tree}
    path = write(tmp_path, yaml.safe_dump(tree))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value) and str(err.value).startswith(f"{path}: ")


def test_a_setting_of_another_loss_is_an_error_naming_it(tmp_path):
    path = write(tmp_path, "align:\n  objectives:\n    - {name: d, loss: dpo, grade: 0.3}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'align.objectives\[0\].grade'; valid keys here for loss "
                                          r"'dpo': \['loss', 'name'\]"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"'align.objectives\[0\].loss' must be one of"):
        load_config(write(tmp_path, "align:\n  objectives:\n    - {name: d, loss: orpo}\n"))


def test_objectives_get_their_own_dataclass_and_contrast_grade():
    cfg = load_config(None, ["align.objectives=[{name: a, loss: graded, grade: 0.5}, {name: b, loss: mixture},"
                             " {name: c, loss: trl, loss_type: ipo}, {name: d, loss: trl}, {name: e}]"])
    a, b, c, d, e = cfg.align.objectives
    assert isinstance(a, GradedObjective) and a.contrast_grade() == 0.5
    assert isinstance(b, MixtureObjective) and b.lam == 0.5 and b.contrast_grade() is None
    assert isinstance(c, TrlObjective) and c.contrast_grade() is None  # TRL's ipo is not on the graded axis
    assert d.contrast_grade() == 1.0  # TRL sigmoid is DPO
    assert isinstance(e, GradedObjective) and e.grade == 1.0  # loss defaults to graded


def test_loss_values_are_checked_before_anything_runs():
    cfg = load_config(None, ["align.objectives=[{name: m, loss: mixture, lam: 1.5}]"])
    with pytest.raises(ConfigError, match=r"align.objectives\[0\] \(m\): lam must be in \[0, 1\]"):
        validate_recipe(cfg)
    with pytest.raises(ConfigError, match="beta must be a finite number > 0"):
        validate_recipe(load_config(None, ["align.beta=0"]))


def test_saved_configs_of_older_runs_still_read():
    """Runs written before one-dataclass-per-loss saved every loss's keys with each objective."""
    old = {"name": "dpo", "loss": "trl", "grade": 1.0, "lam": 0.5, "loss_type": "sigmoid"}
    assert saved_objective(old) == TrlObjective("dpo")
