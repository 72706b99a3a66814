"""WeightGeomCallback under every HF trainer: its statistics equal a float64 brute force built from the
per-token output gradients and inputs of the forwards the trainer really ran, rescaled by that
trainer's own loss scaling (computed here from the batches, independently of the callback), with
gradient accumulation 2; the geometry reaches TensorBoard through ``report_to``; a resumed Trainer
continues the statistics exactly; PEFT through ``peft_config`` and streaming datasets just work.

The brute force: a plain forward pre-hook on the model keeps each grad-enabled top-level forward's
attention mask and labels; plain forward hooks keep each watched module's input and add a zero leaf
``eps`` to its output, whose ``.grad`` after backward is the ``delta`` the trainer back-propagated.
``C_delta = sum_t (s delta_t)(s delta_t)^T / N`` over the non-padding tokens, with ``s`` what the
trainer divided that micro-batch's loss by; ``C_a = sum_t a_t a_t^T / N``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from tests.conftest import make_model
from tests.tiny import PROMPTS, constant_pairs, tiny_tokenizer
from weightgeom.core.sinks import read_metrics, read_tensorboard_scalars
from weightgeom.trainers.callback import CHECKPOINT_FILE, WeightGeomCallback

trl = pytest.importorskip("trl")

COMMON = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-2,
              logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
              dataloader_drop_last=True)
INSTRUMENTS = dict(k=2, every_n=1, dtype="float64", metric_dtype="float64", zscores=False)


class Capture:
    """Per grad-enabled top-level forward: the attention mask, the labels, each watched module's input,
    and the leaf whose gradient is the module's output gradient."""

    def __init__(self, model, inputs: dict, outputs: dict) -> None:
        self.forwards: list[dict] = []
        root = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.handles = [root.register_forward_pre_hook(self._begin, with_kwargs=True)]
        self.handles += [m.register_forward_hook(self._input(name)) for name, m in inputs.items()]
        self.handles += [m.register_forward_hook(self._output(name)) for name, m in outputs.items()]

    def _begin(self, module, args, kwargs):
        if torch.is_grad_enabled():
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            self.forwards.append({"ids": ids.detach().clone(), "labels": kwargs.get("labels"), "inputs": {}, "eps": {},
                                  "mask": torch.ones_like(ids) if mask is None else mask.detach().clone()})

    def _input(self, name):
        def hook(module, args, out):
            if torch.is_grad_enabled():
                self.forwards[-1]["inputs"][name] = args[0].detach().double().clone()
        return hook

    def _output(self, name):
        def hook(module, args, out):
            if torch.is_grad_enabled():
                eps = torch.zeros_like(out, requires_grad=True)
                self.forwards[-1]["eps"][name] = eps
                return out + eps
            return None
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def backpropagated(self) -> list[dict]:
        """The forwards whose backward ran (a grad-enabled forward without backward, e.g. a generation
        step that is not differentiated, has no gradient on its leaves)."""
        return [f for f in self.forwards if f["eps"] and all(e.grad is not None for e in f["eps"].values())]


def second_moment(rows: list[torch.Tensor]) -> torch.Tensor:
    X = torch.cat(rows)
    return X.T @ X / X.shape[0]


def kept(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])[mask.reshape(-1).bool()].double()


def check_statistics(callback, forwards: list[dict], scales: list[float], atol=1e-9):
    """The callback's C_delta of L1/o and L1/down and C_a of L0/attn_in against the brute force, with
    ``scales[i]`` the loss scaling of forward ``i``. Returns the largest relative difference."""
    assert len(forwards) == len(scales) and forwards
    cov = callback.suite.cov
    worst = 0.0
    for key, name in (("L1/o", "o"), ("L1/down", "down")):
        expected = second_moment([kept(f["eps"][name].grad, f["mask"]) * s for f, s in zip(forwards, scales)])
        got = cov.covariance_out(key)
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=atol * float(expected.abs().max()))
        worst = max(worst, float((got - expected).abs().max() / expected.abs().max()))
    expected_a = second_moment([kept(f["inputs"]["attn_in"], f["mask"]) for f in forwards])
    torch.testing.assert_close(cov.covariance_in("L0/attn_in"), expected_a, rtol=1e-9, atol=1e-12)
    return worst


def watch(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, "model", None) or base.base_model
    L0, L1 = body.layers[0], body.layers[1]
    return Capture(model, {"attn_in": L0.self_attn.q_proj},
                   {"o": L1.self_attn.o_proj, "down": L1.mlp.down_proj})


def lm_rows(n: int, seed: int = 0) -> list[dict]:
    """Token sequences of different lengths; labels are the input ids (the model shifts them)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 4 + int(torch.randint(0, 6, (1,), generator=g))
        ids = torch.randint(3, 20, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] + ids[1:] if i % 2 else ids})
    return rows


def pad_collate(rows: list[dict]) -> dict:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows])
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
    labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def label_tokens(f: dict) -> int:
    return int(f["labels"][..., 1:].ne(-100).sum())


# ----- HF Trainer: a token-sum loss divided by num_items_in_batch ------------------------------------------

def test_trainer_undoes_num_items_in_batch_and_matches_per_token_autograd(tmp_path):
    model = make_model("llama")
    start = copy.deepcopy(model)
    callback = WeightGeomCallback(**INSTRUMENTS)
    capture = watch(model)
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), max_steps=1,
                                                          **{k: v for k, v in COMMON.items() if k != "max_steps"}),
                      train_dataset=lm_rows(8), data_collator=pad_collate, callbacks=[callback])
    trainer.train()
    capture.remove()
    forwards = capture.backpropagated()
    assert len(forwards) == 2  # one optimizer step of two micro-batches
    items = sum(label_tokens(f) for f in forwards)  # num_items_in_batch: label tokens of the whole step
    worst = check_statistics(callback, forwards, [items, items])
    assert "num_items_in_batch" in callback.rule and worst < 1e-9

    # the same C_delta from per-token autograd of the sum of token losses, on the unchanged weights
    recompute = watch(start)
    for f in forwards:
        logits = start(input_ids=f["ids"], attention_mask=f["mask"]).logits
        token_loss_sum = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                           f["labels"][:, 1:].reshape(-1), reduction="sum")
        token_loss_sum.backward()
    recompute.remove()
    per_token = [kept(f["eps"]["o"].grad, f["mask"]) for f in recompute.backpropagated()]
    expected = second_moment(per_token)  # float32 forwards on both sides: agreement to their round-off
    torch.testing.assert_close(callback.suite.cov.covariance_out("L1/o"), expected, rtol=1e-5,
                               atol=1e-6 * float(expected.abs().max()))


def run(trainer, model):
    """Train with the brute-force capture on; the forwards whose backward ran."""
    capture = watch(model)
    try:
        trainer.train()
    finally:
        capture.remove()
    return capture.backpropagated()


def no_checkpointing(config_cls) -> dict:
    """TRL turns activation checkpointing on by default; the capture's leaves would be re-created by the
    recompute (the instruments themselves count checkpointed forwards exactly: tests/hooks/test_covariance.py)."""
    from weightgeom.trainers.trl_dpo import checkpointing_off  # noqa: PLC0415

    return checkpointing_off(config_cls)


# ----- SFTTrainer: the same token rule, completion-only labels --------------------------------------------

def test_sft_trainer_undoes_num_items_in_batch(tmp_path):
    model, tok = make_model("llama"), tiny_tokenizer()
    data = Dataset.from_dict({"prompt": [PROMPTS[i % len(PROMPTS)] for i in range(8)],
                              "completion": [" the mat" if i % 2 else " a very good tree" for i in range(8)]})
    callback = WeightGeomCallback(**INSTRUMENTS)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_length=16, **COMMON, **no_checkpointing(trl.SFTConfig))
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[callback])
    forwards = run(trainer, model)
    assert len(forwards) == 4  # two steps of two micro-batches
    scales = []
    for step in range(2):
        items = sum(label_tokens(f) for f in forwards[2 * step: 2 * step + 2])
        scales += [items, items]
    assert all(f["labels"] is not None and int(f["labels"].eq(-100).sum()) > 0 for f in forwards)  # prompts masked
    check_statistics(callback, forwards, scales)
    assert "num_items_in_batch" in callback.rule


# ----- DPOTrainer and RewardTrainer: a mean over pairs --------------------------------------------------------

def test_dpo_trainer_undoes_the_pair_mean(tmp_path):
    model, tok = make_model("llama"), tiny_tokenizer()
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    callback = WeightGeomCallback(**INSTRUMENTS)
    args = trl.DPOConfig(output_dir=str(tmp_path), max_length=16, beta=0.5, **COMMON, **no_checkpointing(trl.DPOConfig))
    trainer = trl.DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(constant_pairs(8)),
                             processing_class=tok, callbacks=[callback])
    forwards = run(trainer, model)
    assert len(forwards) == 4 and all(f["ids"].shape[0] == 4 for f in forwards)  # [2 chosen; 2 rejected]
    check_statistics(callback, forwards, [2 * 2] * 4)  # pairs per micro-batch x accumulation steps
    assert callback.rule.startswith("pairs of the micro-batch")


def test_reward_trainer_undoes_the_pair_mean_and_skips_the_prediction_subspace(tmp_path, caplog):
    import transformers  # noqa: PLC0415

    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=64, num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(cfg)
    pairs = [{"chosen": p + " the mat", "rejected": p + " no bad tree"} for p in PROMPTS + PROMPTS[:2]]
    callback = WeightGeomCallback(**INSTRUMENTS)
    args = trl.RewardConfig(output_dir=str(tmp_path), max_length=16, **COMMON, **no_checkpointing(trl.RewardConfig))
    trainer = trl.RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs),
                                processing_class=tiny_tokenizer(), callbacks=[callback])
    with caplog.at_level("WARNING"):
        forwards = run(trainer, model)
    check_statistics(callback, forwards, [2 * 2] * len(forwards))
    metrics = callback.suite.compute(2)
    assert "rsf_in/L0/q" in metrics and not [k for k in metrics if "pred" in k]
    assert any("prediction" in line for line in callback.suite.skipped)
    assert sum("prediction" in r.getMessage() for r in caplog.records) == 1  # said once


# ----- KTOTrainer: a mean over unpaired examples -------------------------------------------------------------

def test_kto_trainer_undoes_the_example_mean(tmp_path):
    model, tok = make_model("llama"), tiny_tokenizer()
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    rows = [{"prompt": PROMPTS[i % len(PROMPTS)], "completion": " the mat" if i % 2 else " no bad tree",
             "label": bool(i % 2)} for i in range(8)]
    callback = WeightGeomCallback(**INSTRUMENTS)
    args = trl.KTOConfig(output_dir=str(tmp_path), max_length=16, **COMMON, **no_checkpointing(trl.KTOConfig))
    trainer = trl.KTOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tok, callbacks=[callback])
    forwards = run(trainer, model)
    assert len(forwards) == 4
    check_statistics(callback, forwards, [2 * 2] * 4)  # examples per micro-batch x accumulation steps
    assert callback.rule.startswith("examples of the micro-batch")


# ----- GRPOTrainer: by loss_type ----------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
def test_grpo_trainer_undoes_its_loss_types_scaling(tmp_path, loss_type):
    model, tok = make_model("llama"), tiny_tokenizer()
    tok.padding_side = "left"
    masks: list[torch.Tensor] = []
    callback = WeightGeomCallback(**INSTRUMENTS)
    args = trl.GRPOConfig(output_dir=str(tmp_path), num_generations=2, max_completion_length=4, loss_type=loss_type,
                          beta=0.0, **COMMON, **no_checkpointing(trl.GRPOConfig))
    trainer = trl.GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
                              args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS[:4] * 2}),
                              processing_class=tok, callbacks=[callback])
    original = trainer.compute_loss

    def recording(model, inputs, return_outputs=False, num_items_in_batch=None):
        if torch.is_grad_enabled():
            masks.append(inputs["completion_mask"].detach().clone())
        return original(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    trainer.compute_loss = recording  # under the callback's own wrapper, which train() adds
    forwards = run(trainer, model)
    assert len(forwards) == len(masks) == 4
    scales = []
    for step in range(2):
        pair = masks[2 * step: 2 * step + 2]
        scales += {"dapo": [float(sum(m.sum() for m in pair))] * 2,  # tokens of the generation batch
                   "bnpo": [float(m.sum()) * 2 for m in pair],
                   "dr_grpo": [2.0 * 4 * 2] * 2,  # sequences x max_completion_length x accumulation steps
                   "grpo": [2.0 * 2] * 2}[loss_type]
    check_statistics(callback, forwards, scales)
    assert callback.rule.startswith(f"GRPO {loss_type}")


# ----- report_to, resume, PEFT, streaming -------------------------------------------------------------------

def test_geometry_reaches_tensorboard_through_report_to(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))  # where HF TensorBoardCallback writes
    model = make_model("llama")
    callback = WeightGeomCallback(k=2, every_n=1)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), **{**COMMON, "report_to": ["tensorboard"]})
    Trainer(model=model, args=args, train_dataset=lm_rows(8), data_collator=pad_collate, callbacks=[callback]).train()
    scalars = read_tensorboard_scalars(tmp_path / "tb")
    geometry = sorted(tag for tag in scalars if tag.startswith("train/weightgeom/"))
    assert "train/weightgeom/rsf_in/all/q" in geometry and "train/weightgeom/rsf_out_pred/all/o" in geometry
    assert [step for step, _ in scalars["train/weightgeom/rsf_in/all/q"]] == [1, 2]
    rows = read_metrics(tmp_path / "out" / "weightgeom" / "metrics.jsonl")  # the full per-layer rows
    assert [r["step"] for r in rows] == [1, 2] and "rsf_in/L1/q" in rows[-1]
    assert (tmp_path / "out" / "weightgeom" / "instruments.safetensors").is_file()


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_from_a_trainer_checkpoint_continues_the_statistics_exactly(tmp_path):
    def trainer_for(out, callbacks):
        args = TrainingArguments(output_dir=str(out), **{**COMMON, "max_steps": 4, "save_strategy": "steps",
                                                         "save_steps": 2})
        return Trainer(model=make_model("llama"), args=args, train_dataset=lm_rows(16), data_collator=pad_collate,
                       callbacks=callbacks)

    whole = WeightGeomCallback(**INSTRUMENTS)
    trainer_for(tmp_path / "whole", [whole]).train()
    first = WeightGeomCallback(**INSTRUMENTS)
    trainer_for(tmp_path / "cut", [first, StopAt(2)]).train()
    assert (tmp_path / "cut" / "checkpoint-2" / CHECKPOINT_FILE).is_file()
    second = WeightGeomCallback(**INSTRUMENTS)
    trainer_for(tmp_path / "cut", [second]).train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2"))
    a, b = whole.suite.state_dict(), second.suite.state_dict()
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-9, msg=key)
    rows = read_metrics(tmp_path / "cut" / "weightgeom" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # each step once, also after the resume


def test_dpo_with_peft_config_instruments_the_adapted_model(tmp_path):
    peft = pytest.importorskip("peft")
    model, tok = make_model("llama"), tiny_tokenizer()
    callback = WeightGeomCallback(**INSTRUMENTS)
    args = trl.DPOConfig(output_dir=str(tmp_path), max_length=16, beta=0.5, **COMMON, **no_checkpointing(trl.DPOConfig))
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(constant_pairs(8)),
                             processing_class=tok, callbacks=[callback],
                             peft_config=peft.LoraConfig(r=2, target_modules=["q_proj", "o_proj"],
                                                         task_type="CAUSAL_LM"))
    trainer.train()
    wrapped = {tm.key for tm in callback.suite.tracked if hasattr(tm.module, "lora_A")}
    assert {"L0/q", "L1/o"} <= wrapped
    metrics = callback.suite.compute(2)
    assert metrics["rsf_in/L0/q"] > 0 and "rsf_in/L0/k" not in metrics  # k is frozen: nothing written to it


def test_a_streaming_dataset_trains(tmp_path):
    stream = Dataset.from_list(lm_rows(16)).to_iterable_dataset()
    callback = WeightGeomCallback(k=2, every_n=1)
    args = TrainingArguments(output_dir=str(tmp_path), **COMMON)
    Trainer(model=make_model("llama"), args=args, train_dataset=stream, data_collator=pad_collate,
            callbacks=[callback]).train()
    assert callback.rule is not None and callback.suite.cov.covariance_in("L0/attn_in").shape == (32, 32)


def test_a_deepspeed_trainer_is_refused_in_one_line_naming_fsdp2(tmp_path):
    """DeepSpeed (ZeRO-3 partitions the weights, ZeRO-1/2 replace the optimizer the instruments hook)
    cannot be run here, so it is refused before anything is attached."""
    args = TrainingArguments(output_dir=str(tmp_path), **COMMON)
    trainer = Trainer(model=make_model("llama"), args=args, train_dataset=Dataset.from_list(lm_rows(4)),
                      data_collator=pad_collate)
    trainer.is_deepspeed_enabled = True  # what accelerate's DeepSpeed plugin sets
    callback = WeightGeomCallback(k=2, trainer=trainer)
    with pytest.raises(RuntimeError, match=r"DeepSpeed is not supported.*FSDP2") as err:
        callback.on_train_begin(args, trainer.state, trainer.control)
    assert "\n" not in str(err.value) and callback.suite is None
