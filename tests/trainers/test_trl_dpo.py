"""TRL DPOTrainer with the instruments as a callback: a tiny Llama from config, a word-level tokenizer."""

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
from weightgeom.trainers.trl_dpo import InstrumentCallback, checkpointing_off, micro_batches_in_step, run_trl_dpo


def train(tmp_path, pairs, callbacks=(), **overrides):
    kwargs = dict(steps=3, lr=1e-2, beta=0.5, batch_size=2, max_length=16, seed=0, callbacks=callbacks)
    kwargs.update(overrides)
    return run_trl_dpo(make_model("llama"), tiny_tokenizer(), pairs, tmp_path, **kwargs)


class RecordingSuite:
    """Stands in for weightgeom.hooks.suite.InstrumentSuite: records the calls and what it could see."""

    def __init__(self, geometry_every: int = 2) -> None:
        self.events: list[str] = []
        self.normalizers: list[float] = []
        self.grads_present: list[bool] = []
        self.geometry_every = geometry_every
        self.model = self.optimizer = None

    def attach(self, model, optimizer) -> None:
        self.events.append("attach")
        self.model, self.optimizer = model, optimizer

    def detach(self) -> None:
        self.events.append("detach")

    def set_loss_normalizer(self, n: float) -> None:
        self.normalizers.append(n)

    def before_optimizer_step(self) -> None:
        self.events.append("before")
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.grads_present.append(all(p.grad is not None for p in trainable))

    def after_optimizer_step(self, step: int, force: bool = False) -> dict[str, float] | None:
        self.events.append("after")
        return {"geo/step": float(step)} if force or step % self.geometry_every == 0 else None


class RaiseAtStep(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("boom")


@pytest.mark.parametrize("batches, accum, expected", [
    (4, 2, [2, 2, 2, 2]),     # epoch divides evenly
    (5, 2, [2, 2, 1, 2, 2, 1]),  # last step of each epoch takes the remainder
    (1, 3, [1, 1]),           # fewer batches than accumulation steps
    (None, 3, [3, 3]),        # unknown length
])
def test_micro_batches_in_step_follows_the_trainers_chunking(batches, accum, expected):
    assert [micro_batches_in_step(s, accum, batches) for s in range(len(expected))] == expected


def test_dpo_loss_falls_on_a_learnable_pair_set(tmp_path):
    trainer = train(tmp_path, constant_pairs(4), steps=6)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 6
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)  # reference = copy of the policy at step 0
    assert losses[-1] < 0.5 * losses[0]
    assert trainer.state.log_history[-2]["rewards/accuracies"] == 1.0


def test_callback_drives_suite_and_forwards_preference_metrics(tmp_path):
    suite, sink = RecordingSuite(), ListSink()
    # 6 pairs / batch 2 = 3 micro-batches per epoch, accumulated 2 then 1: 2 optimizer steps per epoch.
    trainer = train(tmp_path, constant_pairs(6), [InstrumentCallback(suite, sink, phase="align/dpo")],
                    steps=3, grad_accum=2)

    assert suite.events == ["attach"] + ["before", "after"] * 3 + ["detach"]
    assert type(suite.optimizer).__module__.startswith("torch.optim")  # accelerate's wrapper removed
    assert {id(p) for g in suite.optimizer.param_groups for p in g["params"]} == \
        {id(p) for p in trainer.model.parameters()}
    assert suite.model is trainer.model
    assert suite.grads_present == [True] * 3
    assert suite.normalizers == [4, 2, 4]  # pairs whose mean loss (over micro-batches) made each step

    assert [step for step, _ in sink.rows] == [1, 2, 3]
    history = [row for row in trainer.state.log_history if "rewards/chosen" in row]
    for (step, row), trl_row in zip(sink.rows, history, strict=True):
        assert row["phase"] == "align/dpo"
        assert row["pref/loss"] == pytest.approx(trl_row["loss"])
        assert row["pref/reward_chosen"] == pytest.approx(trl_row["rewards/chosen"])
        assert row["pref/reward_rejected"] == pytest.approx(trl_row["rewards/rejected"])
        assert row["pref/margin"] == pytest.approx(trl_row["rewards/margins"])
        assert row["pref/accuracy"] == pytest.approx(trl_row["rewards/accuracies"])
        # geometry merged into its step's row: step 2 by the schedule, step 3 as the phase's last step
        assert ("geo/step" in row) == (step in (2, 3))


def test_suite_is_detached_when_training_raises(tmp_path):
    suite = RecordingSuite()
    with pytest.raises(RuntimeError, match="boom"):
        train(tmp_path, constant_pairs(4), [InstrumentCallback(suite, ListSink()), RaiseAtStep(2)])
    assert suite.events == ["attach", "before", "after", "before", "after", "detach"]


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
