"""One ``TrainerCallback`` for every HF trainer: the instruments ride along with ``Trainer``,
``SFTTrainer``, ``DPOTrainer``, ``RewardTrainer``, ``KTOTrainer`` and ``GRPOTrainer`` (and their
subclasses), added in one line::

    trainer.add_callback(WeightGeomCallback(k=8, every_n=20))      # or Trainer(..., callbacks=[...])
    trainer.train()

What it does at each Trainer event:

    on_train_begin         builds the InstrumentSuite from the trainer's own model (after TRL's
                           ``peft_config`` wrapped it), attaches it to the torch optimizer, restores the
                           statistics of a resumed run, and wraps ``trainer.compute_loss`` so every
                           micro-batch sets the loss normaliser (below) before its backward
    on_pre_optimizer_step  tells the suite which step comes and whether its metrics are due (the update and
                           gradient are captured for a due step only; the metrics are computed inside
                           ``optimizer.step()``, where the gradient still exists)
    on_step_end            the metrics when the schedule fires: the full per-layer row to
                           ``{output_dir}/weightgeom/metrics.jsonl`` and its TensorBoard events, and the
                           per-role means through the Trainer's own ``log`` (so every ``report_to``
                           integration, W&B or TensorBoard, receives them as ``weightgeom/...``)
    on_save                the statistics into ``checkpoint-N/weightgeom.safetensors`` (sums and counts; the
                           phase's ``W0`` is written once, to ``{output_dir}/weightgeom/W0-{sha256}.safetensors``,
                           and named there by its digest)
    on_train_end           the final snapshot ``{output_dir}/weightgeom/instruments.safetensors``; hooks removed

The loss normaliser. ``C_delta`` holds per-item gradients (``delta`` of one token's loss, or of one
pair's or sequence's loss), so the factor each trainer divided its loss by is undone per micro-batch
(:func:`loss_scale`, keyed by the trainer's class; the rule used is printed once):

    Trainer, SFTTrainer    token-sum CE / num_items_in_batch (label tokens of the whole accumulated step,
                           gathered over ranks; the loss is then multiplied by the process count under
                           average_tokens_across_devices): normaliser = num_items_in_batch / processes.
                           Without num_items_in_batch: label tokens of the micro-batch x accumulation steps
    DPOTrainer, RewardTrainer   mean over the pairs of a micro-batch / accumulation steps:
                           normaliser = pairs x accumulation steps (exact for per-pair losses; a DPO
                           ``sft`` loss term is a token mean and is not undone)
    KTOTrainer             mean over the examples / accumulation steps: examples x accumulation steps
    GRPOTrainer            by ``loss_type``: dapo / cispo / vespo: num_items_in_batch / processes x
                           accumulation steps / steps_per_generation (tokens); bnpo: completion tokens of
                           the micro-batch x accumulation steps; dr_grpo: sequences x max_completion_length x
                           accumulation steps; grpo / sapo / luspo: sequences x accumulation steps (C_delta
                           then holds gradients of per-sequence losses, tokens weighted 1/length)

A trainer whose loss scaling is not in that table gets the ``Trainer`` rule with a warning; pass
``normalizer=`` (a function of ``(trainer, inputs, num_items_in_batch)`` returning a
:class:`LossScale`) to state your own.

Resume: ``trainer.train(resume_from_checkpoint=...)`` restores the statistics from the checkpoint's
``weightgeom.safetensors`` (exact: sums, counts, the subsampling generator, and ``W0`` from the file its
digest names), and the JSONL stream drops rows after the resumed step. Streaming (``IterableDataset``)
training needs nothing extra. DeepSpeed is refused in one line (FSDP2 is the supported sharding).
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from weightgeom.core.processes import refuse_deepspeed
from weightgeom.core.sinks import JsonlSink, MultiSink, TensorBoardSink, truncate_after
from weightgeom.hooks import keys
from weightgeom.hooks.protocol import Suite
from weightgeom.hooks.suite import InstrumentSuite, SuiteConfig

logger = logging.getLogger(__name__)

DIR = "weightgeom"  # under args.output_dir: metrics.jsonl, tb/, instruments.safetensors
CHECKPOINT_FILE = "weightgeom.safetensors"  # inside each checkpoint-N/
SUMMARY_FAMILIES = ("rsf_in", "rsf_out_pred", "rsf_out_delta")  # their layer means go to the Trainer's log


@dataclass(frozen=True)
class LossScale:
    """What one micro-batch's loss was divided by (``normalizer``), and the rule, in words."""

    normalizer: float
    rule: str


def _steps(trainer) -> int:
    """Micro-batches accumulated into the current optimizer step (the last one of an epoch may hold fewer)."""
    steps = getattr(trainer, "current_gradient_accumulation_steps", None)
    return int(steps or trainer.args.gradient_accumulation_steps)


def _processes(trainer) -> int:
    tp = trainer.get_tp_size() if hasattr(trainer, "get_tp_size") else 1
    return max(1, trainer.accelerator.num_processes // max(1, tp))


def _tokens(trainer, inputs, num_items_in_batch) -> LossScale:
    """HF Trainer and SFTTrainer: a token-sum loss over the label tokens."""
    by_items = num_items_in_batch is not None and (trainer.model_accepts_loss_kwargs
                                                   or trainer.compute_loss_func is not None)
    if by_items:
        n = float(num_items_in_batch)
        if trainer.args.average_tokens_across_devices:
            n /= _processes(trainer)  # the loss was multiplied back by the process count
        return LossScale(n, "num_items_in_batch (label tokens of the accumulated step, all processes) / processes")
    labels = inputs.get("labels") if isinstance(inputs, dict) else None
    if labels is None:
        n = _rows(inputs) * _steps(trainer)
        return LossScale(float(n), "examples of the micro-batch x accumulation steps (no labels: a mean loss assumed)")
    shifted = labels[..., 1:] if getattr(trainer, "_loss_shifts_labels", True) else labels
    n = int(shifted.ne(-100).sum()) * _steps(trainer)
    return LossScale(float(n), "label tokens of the micro-batch x accumulation steps (the model's mean loss)")


def _rows(inputs) -> int:
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    raise ValueError("weightgeom: cannot count the examples of a micro-batch with no tensor inputs")


def _pairs(trainer, inputs, num_items_in_batch) -> LossScale:
    """DPO and reward models: the batch is [chosen; rejected], the loss a mean over pairs."""
    pairs = _rows(inputs) // 2
    return LossScale(float(pairs * _steps(trainer)), "pairs of the micro-batch x accumulation steps")


def _examples(trainer, inputs, num_items_in_batch) -> LossScale:
    """KTO: a mean over the (unpaired) examples of the micro-batch."""
    n = len(inputs["label"]) if "label" in inputs else _rows(inputs)
    return LossScale(float(n * _steps(trainer)), "examples of the micro-batch x accumulation steps")


def _grpo(trainer, inputs, num_items_in_batch) -> LossScale:
    """GRPO by ``loss_type`` (trl/trainer/grpo_trainer.py, _compute_loss)."""
    loss_type = trainer.loss_type
    mask = inputs["completion_mask"]
    sequences, steps = int(mask.shape[0]), _steps(trainer)
    if loss_type in ("dapo", "cispo", "vespo"):
        n = float(inputs["num_items_in_batch"].clamp(min=1.0)) / trainer.accelerator.num_processes
        n *= steps / trainer.args.steps_per_generation
        return LossScale(n, f"GRPO {loss_type}: completion tokens of the generation batch / processes x "
                            "accumulation steps / steps_per_generation")
    if loss_type == "bnpo":
        return LossScale(float(int(mask.sum()) * steps), "GRPO bnpo: completion tokens of the micro-batch x "
                                                         "accumulation steps")
    if loss_type == "dr_grpo":
        return LossScale(float(sequences * trainer.max_completion_length * steps),
                         "GRPO dr_grpo: sequences x max_completion_length x accumulation steps")
    if loss_type in ("grpo", "sapo", "luspo"):
        return LossScale(float(sequences * steps), f"GRPO {loss_type}: sequences x accumulation steps (per-sequence "
                                                   "losses; tokens keep their 1/length weight)")
    raise ValueError(f"weightgeom: GRPO loss_type {loss_type!r} has no known loss scaling; pass "
                     "WeightGeomCallback(normalizer=...)")


# Trainer class name -> its rule; the first name found in the trainer's class hierarchy wins.
RULES: dict[str, Callable[..., LossScale]] = {
    "GRPOTrainer": _grpo, "DPOTrainer": _pairs, "RewardTrainer": _pairs, "KTOTrainer": _examples,
    "SFTTrainer": _tokens, "Trainer": _tokens,
}


def loss_scale(trainer, inputs, num_items_in_batch) -> tuple[LossScale, str]:
    """``(scale, the trainer class whose rule was used)`` for one micro-batch."""
    for cls in type(trainer).__mro__:
        if cls.__name__ in RULES:
            return RULES[cls.__name__](trainer, inputs, num_items_in_batch), cls.__name__
    raise TypeError(f"weightgeom: {type(trainer).__name__} is not a transformers Trainer")


class WeightGeomCallback(TrainerCallback):
    """The instruments for any HF ``Trainer`` (see the module docstring for what each event does).

    Args:
        config: the instruments' settings (:class:`weightgeom.hooks.suite.SuiteConfig`); or give its fields
            as keywords (``k=8, every_n=20, roles=["q", "o"]``).
        trainer: the trainer, when the callback is built after it; otherwise it is found when training
            starts (the Trainer that holds this callback and calls ``on_train_begin``).
        sink: where the full metric rows go (anything with ``log(row, step)`` and ``close()``); default
            JSONL + TensorBoard under ``{args.output_dir}/weightgeom/``.
        phase: added to every row as ``phase`` when given.
        summary: send the per-role layer means through ``trainer.log`` (every ``report_to`` gets them).
        normalizer: your own loss-scaling rule (see :func:`loss_scale`).
        seed: of the instruments' token subsampling (``max_tokens``); default ``args.seed``.
        reference_dir: where the phase's W0 file is written and looked for on resume; default
            ``{args.output_dir}/weightgeom``.
        reference_shared: a folder (e.g. the root of several runs from one checkpoint) where an identical
            W0 file is linked instead of written again; default none.

    After training, ``callback.suite`` is the suite (its state, ``compute``) and ``callback.rule`` the
    loss-scaling rule it used.
    """

    def __init__(self, config: SuiteConfig | None = None, *, trainer: Trainer | None = None, sink=None,
                 phase: str | None = None, summary: bool = True,
                 normalizer: Callable[..., LossScale] | None = None, seed: int | None = None,
                 reference_dir: str | Path | None = None, reference_shared: str | Path | None = None,
                 **options) -> None:
        self.config = SuiteConfig(**options) if config is None else config
        if config is not None and options:
            raise TypeError("pass either config= or its fields as keywords, not both")
        self.trainer, self.sink, self.phase, self.summary = trainer, sink, phase, summary
        self.normalizer, self.seed = normalizer, seed
        self.reference_dir, self.reference_shared = reference_dir, reference_shared
        self.suite: Suite | None = None
        self.rule: str | None = None
        self._own_sink = sink is None
        self._compute_loss = None  # the trainer's compute_loss before wrapping
        self._logging = False  # inside our own trainer.log call

    # ----- events --------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        trainer = self.trainer = self.trainer or self._find_trainer()
        refuse_deepspeed(bool(getattr(trainer, "is_deepspeed_enabled", False) or args.deepspeed))
        model = trainer.model
        self.suite = InstrumentSuite(model, self.config, seed=args.seed if self.seed is None else self.seed,
                                     reference_dir=self.reference_dir or Path(args.output_dir) / DIR,
                                     reference_shared=self.reference_shared)
        optimizer = trainer.optimizer if optimizer is None else optimizer
        self.suite.attach(model, getattr(optimizer, "optimizer", optimizer))  # accelerate wraps the torch one
        self._wrap_compute_loss(trainer)
        resumed = state.global_step if state.global_step > 0 else None
        if resumed is not None:
            self._restore(args, state.global_step)
        if self._own_sink and state.is_world_process_zero:
            self.sink = self._default_sink(args, resumed)
        for line in getattr(self.suite, "skipped", []):
            self._say(line)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.suite is not None:
            step = state.global_step + 1  # the Trainer counts the step after it
            self.suite.before_optimizer_step(step, force=step >= state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        if self.suite is None:
            return
        metrics = self.suite.after_optimizer_step(state.global_step, force=state.global_step >= state.max_steps)
        if not metrics:
            return
        if self.sink is not None:
            self.sink.log({"phase": self.phase, **metrics} if self.phase else metrics, state.global_step)
        if self.summary:
            self._log_summary(metrics)

    def on_save(self, args, state, control, **kwargs):
        if self.suite is None:
            return
        snapshot = self.suite.snapshot_state()  # a collective: every process calls it
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            self.suite.save(folder / CHECKPOINT_FILE, snapshot)

    def on_train_end(self, args, state, control, **kwargs):
        if self.suite is None:
            return
        try:
            snapshot = self.suite.snapshot_state()
            if self._own_sink and state.is_world_process_zero:
                self.suite.save(Path(args.output_dir) / DIR / "instruments.safetensors", snapshot)
        finally:
            self.detach()

    def detach(self) -> None:
        """Remove the hooks and put the trainer's ``compute_loss`` back; safe to call twice."""
        if self.suite is not None:
            self.suite.detach()
        if self._compute_loss is not None and self.trainer is not None:
            self.trainer.compute_loss = self._compute_loss
            self._compute_loss = None
        if self._own_sink and self.sink is not None:
            self.sink.close()
            self.sink = None

    # ----- the loss normaliser -------------------------------------------------------------------------
    def _wrap_compute_loss(self, trainer) -> None:
        """Every micro-batch of the trainer passes ``compute_loss`` right before its backward: there the
        normaliser of that micro-batch is set (also for the last, shorter step of an epoch)."""
        original = self._compute_loss = trainer.compute_loss
        rule = self.normalizer

        def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
            if torch.is_grad_enabled():
                if rule is not None:
                    scale, owner = rule(trainer, inputs, num_items_in_batch), "yours"
                else:
                    scale, owner = loss_scale(trainer, inputs, num_items_in_batch)
                self.suite.set_loss_normalizer(scale.normalizer)
                if self.rule is None:
                    self.rule = f"{scale.rule} ({owner} rule)"
                    self._say(f"C_delta undoes the loss scaling of {type(trainer).__name__}: {self.rule}; "
                              f"first micro-batch: {scale.normalizer:g}")
                    if owner == "Trainer" and type(trainer).compute_loss is not Trainer.compute_loss:
                        warnings.warn(f"weightgeom: {type(trainer).__name__} computes its own loss, whose scaling "
                                      "is not known here; assumed the HF Trainer's token rule. Pass "
                                      "WeightGeomCallback(normalizer=...) if it differs.", stacklevel=2)
            return original(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

        trainer.compute_loss = compute_loss

    # ----- logging -------------------------------------------------------------------------------------
    def _log_summary(self, metrics: dict[str, float]) -> None:
        """Per-role layer means through ``Trainer.log`` itself (not a subclass's ``log``: TRL's would fold in,
        and clear, the metrics it is still averaging for its own next log row)."""
        row = {f"{DIR}/{key}": value for key, value in metrics.items()
               if (parsed := keys.parse(key)) is not None and parsed.mean and parsed.family in SUMMARY_FAMILIES}
        if row:
            self._logging = True
            try:
                Trainer.log(self.trainer, row)
            finally:
                self._logging = False

    def _default_sink(self, args, resumed: int | None) -> MultiSink:
        folder = Path(args.output_dir) / DIR
        if resumed is not None:
            truncate_after(folder / "metrics.jsonl", resumed)
        return MultiSink([JsonlSink(folder / "metrics.jsonl"),
                          TensorBoardSink(folder / "tb", purge_step=None if resumed is None else resumed + 1)])

    def _say(self, line: str) -> None:
        if self.trainer is None or self.trainer.state.is_world_process_zero:
            logger.warning("weightgeom: %s", line)

    # ----- resume ------------------------------------------------------------------------------------------
    def _restore(self, args, step: int) -> None:
        candidates = [Path(args.output_dir) / f"checkpoint-{step}"]
        if isinstance(args.resume_from_checkpoint, str):
            candidates.insert(0, Path(args.resume_from_checkpoint))
        found = next((c / CHECKPOINT_FILE for c in candidates if (c / CHECKPOINT_FILE).is_file()), None)
        if found is None:
            self._say(f"resumed at step {step}, but no {CHECKPOINT_FILE} in {', '.join(map(str, candidates))}: the "
                      "statistics start again from this step")
            return
        from safetensors.torch import load_file  # noqa: PLC0415 (only on resume)

        self.suite.load_state_dict(load_file(str(found)))
        self._say(f"statistics restored from {found}")

    def _find_trainer(self) -> Trainer:
        """The Trainer whose callback handler is calling us (``trainer.add_callback(...)`` and
        ``callbacks=[...]`` give the callback no reference to it)."""
        frame = inspect.currentframe()
        try:
            while frame is not None:
                candidate = frame.f_locals.get("self")
                if isinstance(candidate, Trainer) and self in candidate.callback_handler.callbacks:
                    return candidate
                frame = frame.f_back
        finally:
            del frame
        raise RuntimeError("WeightGeomCallback: no Trainer holding this callback is calling it; pass "
                           "WeightGeomCallback(..., trainer=trainer)")


def checkpoint_statistics(checkpoint: str | os.PathLike) -> Path:
    """Where :class:`WeightGeomCallback` keeps the statistics of an HF checkpoint directory."""
    return Path(checkpoint) / CHECKPOINT_FILE
