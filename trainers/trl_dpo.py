"""DPO through TRL's ``DPOTrainer``: the recipe's ``loss: trl`` objectives, instrumented by the same
:class:`weightgeom.trainers.callback.WeightGeomCallback` a user adds to any HF trainer.

Callbacks of the recipe stage, in the order the Trainer calls them:

    GuardCallback          the divergence guard and stop signals (what TrainingSession does for our loops)
    WeightGeomCallback     the instruments: suite, loss normaliser (pairs x accumulation steps), metric rows
                           to the run directory, statistics for the final checkpoint
    PreferenceRows         TRL's logged loss and rewards/* as this project's pref/* keys, to the run directory

Pitfalls of TRL on this stack (measured with TRL 1.16) and how they are handled here:
- TRL replaces the LM head with a fused function: hooks on ``lm_head`` never fire (we hook none).
- ``ref_model=None`` without PEFT makes TRL reload the reference from ``config._name_or_path``,
  which fails for a model built from config: we pass a frozen deep copy instead.
- With PEFT the reference is the adapter-disabled model: a no-grad forward through the same
  modules, which the instruments must (and do) ignore.
- TRL turns activation checkpointing on by default. The instruments count recomputed forwards once
  (exactly), but on these small models recomputing costs more time than it saves memory: it is off here.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import datasets
import torch
from torch import nn
from transformers import PrinterCallback, ProgressCallback, TrainerCallback

from weightgeom.core.config import RunConfig
from weightgeom.core.data import prompt_budget, tokenize_pairs
from weightgeom.core.models import apply_lora, build_model
from weightgeom.core.processes import process_state
from weightgeom.core.rundir import SNAPSHOT_DIR, RunDirectory
from weightgeom.core.runinfo import model_facts, now, versions
from weightgeom.hooks.protocol import Suite
from weightgeom.hooks.suite import NullSuite
from weightgeom.trainers.callback import WeightGeomCallback
from weightgeom.trainers.guard import DivergenceError, DivergenceGuard, gradient_norm
from weightgeom.trainers.interrupt import Interrupted, StopSignals
from weightgeom.trainers.losses import DPOLoss, check_beta
from weightgeom.trainers.pairs import preference_eval, reference_logps
from weightgeom.trainers.session import RunResult, save_final

# TRL's logged key -> ours (docs/architecture.md). TRL 1.16 logs rewards/* as means over the pairs
# of the logging window and ``loss`` as the mean of the optimizer steps' losses.
TRL_TO_HARNESS = {
    "loss": "pref/loss",
    "rewards/chosen": "pref/reward_chosen",
    "rewards/rejected": "pref/reward_rejected",
    "rewards/margins": "pref/margin",
    "rewards/accuracies": "pref/accuracy",
    "learning_rate": "train/lr",
    "grad_norm": "train/grad_norm",
}


class PreferenceRows(TrainerCallback):
    """TRL's log rows under this project's names (:data:`TRL_TO_HARNESS`) to ``sink`` (anything with
    ``log(row, step)``), with ``phase`` when given. The geometry rows come from the WeightGeomCallback."""

    def __init__(self, sink, *, phase: str | None = None) -> None:
        self.sink, self.phase = sink, phase

    def on_log(self, args, state, control, logs=None, **kwargs):
        row = {ours: float(logs[theirs]) for theirs, ours in TRL_TO_HARNESS.items() if theirs in (logs or {})}
        if row:
            self.sink.log({"phase": self.phase, **row} if self.phase else row, state.global_step)


class GuardCallback(TrainerCallback):
    """The divergence guard and stop signals for the HF Trainer (what TrainingSession does for our loops).

    ``on_pre_optimizer_step`` (gradients populated and clipped, the optimizer not yet run): a
    non-finite gradient raises :class:`DivergenceError` naming the first offending parameter; an
    all-zero gradient for ``guard.patience`` steps too. ``on_step_end``: non-finite instrument sums
    raise before any metric is computed from them; a received SIGTERM/SIGINT raises
    :class:`Interrupted` (a TRL objective keeps no mid-run checkpoint: it restarts on resume). Put it
    before the :class:`WeightGeomCallback` in the callback list, so its check runs before any metric.
    """

    def __init__(self, guard: DivergenceGuard, *, suite: Suite | Callable[[], Suite | None] | None = None,
                 signals: StopSignals | None = None) -> None:
        self.guard, self._suite, self.signals = guard, suite, signals

    @property
    def suite(self) -> Suite | None:
        """The instruments (a callable is asked each time: a WeightGeomCallback builds its suite in on_train_begin)."""
        return self._suite() if callable(self._suite) else self._suite

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.guard.check(state.global_step + 1, grad_norm=gradient_norm(model), model=model)

    def on_step_end(self, args, state, control, **kwargs):
        bad = self.suite.nonfinite_statistics() if self.suite is not None else []
        if bad:
            raise DivergenceError(f"{self.guard.phase} diverged at step {state.global_step}: the instruments' "
                                  f"statistics are not finite ({', '.join(bad[:3])})", state.global_step)
        if self.signals is not None and self.signals.received is not None and state.global_step < state.max_steps:
            raise Interrupted(self.signals.received, state.global_step, None, self.guard.phase,
                              note="; a TRL objective keeps no mid-run checkpoint and restarts on --resume latest")


class QuietProgressCallback(ProgressCallback):
    """TRL's progress bar without the raw log dict it prints at every logging step (the numbers
    go to the run's metric sinks; the bar shows the loss)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix({"loss": f"{logs['loss']:.4g}"}, refresh=False)


def checkpointing_off(config_cls: type) -> dict:
    """``DPOConfig`` keywords that switch activation (gradient) checkpointing off, for the installed
    transformers: ``activation_checkpointing`` where it exists (>= 5.2x; the old name is then a
    deprecated alias, left unset), else ``gradient_checkpointing=False`` (TRL's default is True,
    and its recomputed forwards would double count the covariances)."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    if "activation_checkpointing" in names:
        out = {"activation_checkpointing": False}
        if "gradient_checkpointing" in names:
            out["gradient_checkpointing"] = None
        return out
    if "gradient_checkpointing" in names:
        return {"gradient_checkpointing": False}
    return {}


def preference_dataset(pairs: list[dict]) -> datasets.Dataset:
    """A ``datasets.Dataset`` of plain-text ``prompt`` / ``chosen`` / ``rejected`` columns."""
    if not pairs:
        raise ValueError("run_trl_dpo got no preference pairs")
    fields = ("prompt", "chosen", "rejected")
    for i, pair in enumerate(pairs):
        bad = [f for f in fields if not isinstance(pair.get(f), str)]
        if bad:
            raise ValueError(f"preference pair {i} needs string fields {list(fields)}; missing or not a string: {bad}")
    return datasets.Dataset.from_dict({f: [pair[f] for pair in pairs] for f in fields})


def frozen_copy(model: nn.Module) -> nn.Module:
    """An eval-mode, no-grad deep copy: the DPO reference for a model TRL cannot reload from disk."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No ``datasets`` progress bars while TRL tokenizes (a few tiny ``map`` calls), and no
    deprecation warning that TRL's own code triggers on every reference forward."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def run_trl_dpo(model: nn.Module, tokenizer, pairs: list[dict], out_dir: str | Path, *,
                ref_model: nn.Module | None = None, steps: int, lr: float, beta: float,
                loss_type: str | list[str] = "sigmoid", batch_size: int, grad_accum: int = 1, max_length: int,
                seed: int, peft_config=None, callbacks: Sequence[TrainerCallback] = (),
                extra_args: dict | None = None):
    """Train ``model`` with TRL's DPOTrainer on plain-text pairs; returns the trainer after training.

    ``pairs``: dicts with string ``prompt``, ``chosen``, ``rejected``. There is no chat template:
    TRL tokenizes ``prompt`` and ``prompt + completion`` and appends ``tokenizer.eos_token`` to each
    completion, so end prompts on a token boundary (e.g. completions starting with a space).
    ``loss_type``: TRL's loss type(s), e.g. ``"sigmoid"`` (DPO), ``"ipo"``, ``"hinge"``.
    ``ref_model``: None means a frozen copy of ``model``, or with ``peft_config`` the adapter-disabled
    model (TRL wraps ``model`` in PEFT in place, so ``trainer.model`` is the PeftModel).
    ``extra_args``: further ``trl.DPOConfig`` fields (e.g. ``warmup_steps``, ``max_grad_norm``,
    ``lr_scheduler_type``); they override the defaults set here.

    Training is fp32 (no bf16 autocast, like our own loops), on CPU when CUDA is absent, logs every
    step, saves nothing (save checkpoints from the returned trainer), and keeps every micro-batch
    full (``dataloader_drop_last``). Every :class:`WeightGeomCallback` in ``callbacks`` is detached
    when training ends, also if it raises.
    """
    from peft import PeftModel  # noqa: PLC0415
    from trl import DPOConfig, DPOTrainer  # noqa: PLC0415  (slow import, only when used)

    if steps < 1 or batch_size < 1 or grad_accum < 1:
        raise ValueError(f"steps, batch_size and grad_accum must be >= 1, got {steps}, {batch_size}, {grad_accum}")
    check_beta(beta)
    if tokenizer.eos_token is None or tokenizer.pad_token is None:
        raise ValueError("the tokenizer needs an eos_token (TRL appends it to completions) and a pad_token")
    dataset = preference_dataset(pairs)
    if ref_model is None and peft_config is None and not isinstance(model, PeftModel):
        ref_model = frozen_copy(model)
    settings = dict(
        output_dir=str(out_dir), max_steps=steps, learning_rate=lr, beta=beta, loss_type=loss_type,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum, max_length=max_length,
        seed=seed, data_seed=seed, logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        bf16=False, use_cpu=not torch.cuda.is_available(), **checkpointing_off(DPOConfig),
        dataset_num_proc=None, dataloader_drop_last=True,
        remove_unused_columns=True,  # TRL declares its tokenized columns as the ones to keep
    )
    args = DPOConfig(**{**settings, **(extra_args or {})})
    with _quiet():
        trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset,
                             processing_class=tokenizer, peft_config=peft_config, callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)  # with tqdm off the Trainer prints every log dict
    if trainer.pop_callback(ProgressCallback) is not None:  # ... and with tqdm on, its bar writes them
        trainer.add_callback(QuietProgressCallback())
    if len(trainer.train_dataset) < batch_size:
        kept, given = len(trainer.train_dataset), len(pairs)
        why = (f"TRL dropped {given - kept} whose prompt fills max_length={max_length}; raise max_length, shorten "
               "prompts or add pairs" if kept < given else "add pairs or lower batch_size")
        raise ValueError(f"{kept} of {given} preference pairs remain, fewer than one batch of batch_size={batch_size}: "
                         f"{why}")
    try:
        with _quiet():
            trainer.train()
    finally:
        for callback in callbacks:
            if isinstance(callback, WeightGeomCallback):
                callback.detach()
    return trainer


# ----- the recipe entry point: `loss: trl` objectives of an alignment stage ---------------------------
SCHEDULES = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup"}
OPTIMIZERS = {"adamw": "adamw_torch", "sgd": "sgd"}


def trainer_settings(train_cfg, progress: bool) -> dict:
    """Our ``TrainConfig`` (optimizer, schedule, clipping) as ``trl.DPOConfig`` fields."""
    t = train_cfg
    settings = dict(optim=OPTIMIZERS[t.optimizer], lr_scheduler_type=SCHEDULES[t.schedule],
                    warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
                    max_grad_norm=t.max_grad_norm or 0.0,  # 0 disables clipping in the HF Trainer
                    adam_beta1=t.betas[0], adam_beta2=t.betas[1], disable_tqdm=not progress,
                    logging_steps=t.log_every)
    if t.schedule == "cosine":
        settings["lr_scheduler_kwargs"] = {"min_lr_rate": t.min_lr_ratio}
    if t.optimizer == "sgd" and t.momentum:
        settings["optim_args"] = f"momentum={t.momentum}"
    return settings


def fit_prompts(pairs: list[dict], tokenizer, max_len: int) -> list[dict]:
    """Trim each prompt from the left so prompt + completion fits ``max_len`` tokens, by the rule
    ``tokenize_pairs`` uses for our own loops (``weightgeom.core.data.prompt_budget``).

    TRL keeps the *start* of a too-long sequence and drops pairs whose prompt alone fills
    ``max_length``; long prompts (the embedded set's 200-character contexts under a small
    vocabulary) would otherwise all be dropped or lose their completions.
    """
    out = []
    for pair in pairs:
        prompt = tokenizer(pair["prompt"], add_special_tokens=False)["input_ids"]
        completion = max(len(tokenizer(pair[f], add_special_tokens=False)["input_ids"]) for f in ("chosen", "rejected"))
        keep = prompt_budget(len(prompt), completion + 1, max_len)  # +1: TRL appends eos
        if keep < len(prompt):
            pair = {**pair, "prompt": tokenizer.decode(prompt[len(prompt) - keep:])}
        out.append(pair)
    return out


def align_with_trl(cfg: RunConfig, objective, init_dir: Path, run_dir: Path, *, tokenizer, pairs: list[dict],
                   eval_pairs: list[dict] | None = None, progress: bool = True, overwrite: bool = False) -> RunResult:
    """One ``loss: trl`` objective of a recipe: DPO through TRL from ``init_dir``, instrumented by
    :class:`WeightGeomCallback`, written to ``run_dir`` like every other alignment run (config, metrics,
    tb/, snapshot, checkpoint). LoRA (``align.lora``) is applied here; the callback builds the
    instruments from the model TRL trains, so they hook the LoRA wrappers; TRL then uses the
    adapter-disabled model as reference.
    """
    t, a = cfg.align.train, cfg.align
    torch.manual_seed(cfg.seed)
    processes = process_state()
    device = processes.device  # this process's GPU under a launcher, else the CPU
    model = build_model(cfg.model, len(tokenizer), cfg.seed, init_from=str(init_dir))
    ref_model = None
    if a.lora is not None:
        model = apply_lora(model, a.lora)
    else:
        ref_model = frozen_copy(model)
    eval_loss = DPOLoss(a.beta)  # held-out metrics with sigmoid DPO, whatever TRL's loss_type
    eval_data = tokenize_pairs(eval_pairs, tokenizer, a.max_len) if eval_pairs else None
    eval_ref = reference_logps(model.to(device), eval_data, t.batch_size, device) if eval_data else None
    if t.batch_size % processes.num_processes:
        raise ValueError(f"align.train.batch_size={t.batch_size} is the global batch; it must be divisible by the "
                         f"{processes.num_processes} processes (TRL takes a per-process batch)")
    files = RunDirectory(run_dir, cfg, overwrite=overwrite)
    files.record(started=now(), versions=versions(), phase=f"align/{objective.name}", trainer="trl",
                 world_size=processes.num_processes, device=str(device), **model_facts(model))
    phase = f"align/{objective.name}"
    guard = DivergenceGuard("stop", t.stall_patience, phase=phase)
    # the instruments: the same callback a user adds to their own trainer, writing to this run's directory
    # (its W0 file beside this run's snapshots: TRL's own output_dir is deleted below)
    instruments = (WeightGeomCallback(cfg.instruments, sink=files, phase=phase, summary=False, seed=cfg.seed,
                                      reference_dir=run_dir / SNAPSHOT_DIR, reference_shared=cfg.run_dir)
                   if cfg.instruments.enabled else None)
    try:
        with StopSignals(phase) as signals:
            guarded = GuardCallback(guard, suite=lambda: instruments.suite if instruments else None, signals=signals)
            callbacks = [guarded, *([instruments] if instruments else []), PreferenceRows(files, phase=phase)]
            trainer = run_trl_dpo(model, tokenizer, fit_prompts(pairs, tokenizer, a.max_len), run_dir / "trl",
                                  ref_model=ref_model, steps=t.steps, lr=t.lr, beta=a.beta,
                                  loss_type=objective.loss_type, batch_size=t.batch_size // processes.num_processes,
                                  grad_accum=t.grad_accum, max_length=a.max_len, seed=cfg.seed, callbacks=callbacks,
                                  extra_args=trainer_settings(t, progress))
        suite = instruments.suite if instruments else NullSuite()
        model = trainer.model
        final: dict[str, float] = {}
        if eval_data is not None:
            final = preference_eval(model, eval_data, eval_ref, eval_loss, t.batch_size, device)
            files.log({"phase": phase, **final}, t.steps)
        ckpt = save_final(files, t.steps, model=model, tokenizer=tokenizer, optimizer=trainer.optimizer,
                          scheduler=trainer.lr_scheduler, suite=suite)
        files.record(pairs_seen=t.steps * t.batch_size * t.grad_accum, n_eval_pairs=len(eval_pairs or []))
    finally:
        files.close()
    shutil.rmtree(run_dir / "trl", ignore_errors=True)  # TRL's output_dir: nothing of ours lives there
    return RunResult(run_dir, ckpt, {"step": t.steps, **final})
