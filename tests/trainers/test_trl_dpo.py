"""TRL DPOTrainer as the recipe's ``loss: trl`` stage runs it (the WeightGeomCallback and the pref/* rows): a
tiny Llama from config, a word-level tokenizer."""

from __future__ import annotations

import dataclasses
import math

import peft
import pytest
import torch
import trl
from transformers import TrainerCallback

from tests.conftest import make_model
from tests.tiny import ListSink, constant_pairs, tiny_tokenizer
from weightgeom.trainers.callback import WeightGeomCallback
from weightgeom.trainers.trl_dpo import PreferenceRows, checkpointing_off, run_trl_dpo


def train(tmp_path, pairs, callbacks=(), **overrides):
    kwargs = dict(steps=3, lr=1e-2, beta=0.5, batch_size=2, max_length=16, seed=0, callbacks=callbacks)
    kwargs.update(overrides)
    return run_trl_dpo(make_model("llama"), tiny_tokenizer(), pairs, tmp_path, **kwargs)


class RaiseAtStep(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("boom")


def test_dpo_loss_falls_on_a_learnable_pair_set(tmp_path):
    trainer = train(tmp_path, constant_pairs(4), steps=6)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 6
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)  # reference = copy of the policy at step 0
    assert losses[-1] < 0.5 * losses[0]
    assert trainer.state.log_history[-2]["rewards/accuracies"] == 1.0


def test_the_stage_callbacks_set_each_steps_pairs_and_forward_preference_metrics(tmp_path):
    """6 pairs / batch 2 = 3 micro-batches per epoch, accumulated 2 then 1: the normaliser of each step is
    the pairs whose mean loss (over its micro-batches) made it; TRL's rows reach the sink as pref/*."""
    sink = ListSink()
    instruments = WeightGeomCallback(k=2, every_n=2, log_spaced=False, sink=sink, phase="align/dpo", summary=False)
    normalizers = []
    trainer = train(tmp_path, constant_pairs(6), [instruments, PreferenceRows(sink, phase="align/dpo"),
                                                  RecordNormalizer(instruments, normalizers)], steps=3, grad_accum=2)
    assert normalizers == [4, 4, 2, 4, 4]  # per micro-batch: steps of 2, 1 (the epoch's remainder), 2 micro-batches
    assert instruments.rule.startswith("pairs of the micro-batch x accumulation steps")
    geometry = [(step, row) for step, row in sink.rows if "rsf_in/all/q" in row]
    assert [step for step, _ in geometry] == [2, 3]  # by the schedule, and the phase's last step
    prefs = [(step, row) for step, row in sink.rows if "pref/loss" in row]
    history = [row for row in trainer.state.log_history if "rewards/chosen" in row]
    assert [step for step, _ in prefs] == [1, 2, 3]
    for (_, row), trl_row in zip(prefs, history, strict=True):
        assert row["phase"] == "align/dpo"
        assert row["pref/loss"] == pytest.approx(trl_row["loss"])
        assert row["pref/reward_chosen"] == pytest.approx(trl_row["rewards/chosen"])
        assert row["pref/reward_rejected"] == pytest.approx(trl_row["rewards/rejected"])
        assert row["pref/margin"] == pytest.approx(trl_row["rewards/margins"])
        assert row["pref/accuracy"] == pytest.approx(trl_row["rewards/accuracies"])


class RecordNormalizer(TrainerCallback):
    """Wraps the suite's set_loss_normalizer once the WeightGeomCallback has built it."""

    def __init__(self, instruments, out: list) -> None:
        self.instruments, self.out = instruments, out

    def on_train_begin(self, args, state, control, **kwargs):
        suite = self.instruments.suite
        original = suite.set_loss_normalizer

        def record(n):
            self.out.append(n)
            original(n)

        suite.set_loss_normalizer = record


def test_hooks_are_removed_when_training_raises(tmp_path):
    model = make_model("llama")
    instruments = WeightGeomCallback(k=2, every_n=1, sink=ListSink())
    with pytest.raises(RuntimeError, match="boom"):
        run_trl_dpo(model, tiny_tokenizer(), constant_pairs(4), tmp_path, steps=3, lr=1e-2, beta=0.5, batch_size=2,
                    max_length=16, seed=0, callbacks=[instruments, RaiseAtStep(2)])
    assert instruments.suite is not None and not instruments.suite.cov.is_attached
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_lora_trains_only_the_adapters(tmp_path):
    model = make_model("llama")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = run_trl_dpo(model, tiny_tokenizer(), constant_pairs(4), tmp_path, steps=3, lr=1e-2, beta=0.5,
                          batch_size=2, max_length=16, seed=0, peft_config=config)

    adapters = {name: p for name, p in trainer.model.named_parameters() if "lora_" in name}
    assert adapters and all(p.requires_grad for p in adapters.values())
    assert any(p.abs().sum() > 0 for name, p in adapters.items() if "lora_B" in name)  # B starts at zero
    for name, p in trainer.model.named_parameters():
        if "lora_" not in name:
            assert not p.requires_grad
            assert torch.equal(p, before[name.removeprefix("base_model.model.").replace(".base_layer", "")]), name


def test_bad_input_is_rejected_with_the_field_named(tmp_path):
    with pytest.raises(ValueError, match="pair 1 .*'rejected'"):
        train(tmp_path, [constant_pairs(1)[0], {"prompt": "the cat", "chosen": " yes"}])
    with pytest.raises(ValueError, match="max_length"):
        train(tmp_path, constant_pairs(4), max_length=3)  # every prompt fills 3 tokens


# ----- across transformers versions; a quiet console ------------------------------------------------
@dataclasses.dataclass
class ArgsWithActivationCheckpointing:  # transformers >= 5.2x: the new name, the old one a deprecated alias
    activation_checkpointing: bool | None = None
    gradient_checkpointing: bool | None = True


@dataclasses.dataclass
class ArgsWithGradientCheckpointingOnly:  # transformers 5.17 and 4.x: no activation_checkpointing field
    gradient_checkpointing: bool = True


def test_checkpointing_switch_fits_the_installed_config_class():
    """`DPOConfig(activation_checkpointing=...)` raised TypeError on transformers 5.17 (admitted by the
    pyproject): only the switch that the config class declares is passed."""
    new = checkpointing_off(ArgsWithActivationCheckpointing)
    assert new == {"activation_checkpointing": False, "gradient_checkpointing": None}
    assert ArgsWithActivationCheckpointing(**new).activation_checkpointing is False
    old = checkpointing_off(ArgsWithGradientCheckpointingOnly)
    assert old == {"gradient_checkpointing": False}
    assert ArgsWithGradientCheckpointingOnly(**old).gradient_checkpointing is False
    with pytest.raises(TypeError):
        ArgsWithGradientCheckpointingOnly(**new)  # what the old code did
    assert checkpointing_off(trl.DPOConfig)  # the installed one declares one of them


def test_progress_bar_prints_no_raw_log_dicts(tmp_path, capsys):
    """With the progress bar on, the HF Trainer's ProgressCallback wrote every log dict to the console."""
    train(tmp_path, constant_pairs(4), steps=3, extra_args={"disable_tqdm": False})
    out = capsys.readouterr()
    assert "{'loss'" not in out.out + out.err and "'rewards/" not in out.out + out.err
