"""What our training loops share, written once: processes and devices (accelerate), optimizer and
learning-rate schedule, instruments, the run directory (config, metric sinks, checkpoints), resume
and the progress bar. A loop built on it reads::

    session = TrainingSession(cfg, cfg.train, run_dir, phase="pretrain", model=model, tokenizer=tokenizer,
                              resume=checkpoint)
    with session:                                       # instruments attached; files closed on exit
        for step in session.steps():                    # continues after a resumed checkpoint's step
            session.suite.set_loss_normalizer(n)        # what this process's loss was divided by
            ... forward; session.backward(loss) ...
            grad_norm, geometry = session.optimizer_step(step)  # clip, step, schedule; metrics when due
            session.end_step(step, row)                 # log the row; checkpoint when due
    session.result                                      # run dir, final checkpoint, last logged row

Reliability, the same for every loop built on it:

* the divergence guard (trainers/guard.py): before each optimizer step the loss and gradients must
  be finite and after it the instruments' sums; otherwise the run stops (:class:`DivergenceError`,
  naming the step and the first parameter with a non-finite gradient) or, with
  ``train.on_nonfinite: skip``, the step is dropped and its covariance sums rolled back. A gradient
  that stays exactly zero for ``train.stall_patience`` steps stops the run too (a dead model).
* SIGTERM / SIGINT (trainers/interrupt.py): the step in flight finishes, a checkpoint is written
  and :class:`Interrupted` is raised; ``--resume latest`` continues exactly from it.

The final checkpoint is a plain HF model directory (a LoRA adapter is merged into it) with the
trainer state and the instruments' state; the instruments' snapshot for reports is written beside it.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from accelerate import Accelerator, DistributedType
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from weightgeom.core.checkpoint import checkpoint_dir, load_instruments, load_trainer_state, set_rng_state
from weightgeom.core.config import RunConfig, TrainConfig
from weightgeom.core.processes import refuse_deepspeed
from weightgeom.core.rundir import SNAPSHOT_DIR, RunDirectory
from weightgeom.core.runinfo import model_facts, now, versions
from weightgeom.core.sharding import (
    is_sharded,
    local_optimizer_state,
    shard_model,
    whole_model_state,
    whole_optimizer_state,
)
from weightgeom.hooks import keys
from weightgeom.hooks.suite import build_suite
from weightgeom.trainers.guard import DivergenceError, DivergenceGuard
from weightgeom.trainers.interrupt import Interrupted, StopSignals
from weightgeom.trainers.optim import make_optimizer, make_scheduler

# Progress-bar fields: metric key -> short label.
POSTFIX = {"train/loss": "loss", "pref/loss": "loss", "pref/accuracy": "acc", "eval/loss": "eval",
           "train/tokens_per_s": "tok/s", keys.layer_mean("rsf_in", "q"): "rsf_in q",
           keys.layer_mean("rsf_out_pred", "o"): "rsf_pred o"}


@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Path
    metrics: dict = field(default_factory=dict)  # the last logged row, with its "step"


def save_final(files: RunDirectory, step: int, *, model, tokenizer, optimizer, scheduler, suite) -> Path:
    """The phase's last checkpoint and instrument snapshot. The suite's state is taken first (a
    collective, and it reads LoRA wrappers); then a LoRA adapter is merged, so the checkpoint is a
    plain HF model directory that ``from_pretrained`` and the next phase load directly. A sharded
    model's weights and optimizer state are gathered whole (collectives)."""
    state = suite.snapshot_state()
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    path = files.save(step, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
                      instruments=state, snapshot=True, **whole_states(model, optimizer))
    files.record(finished=now(), steps=step)
    return path


def whole_states(model, optimizer) -> dict:
    """``model_state`` / ``optimizer_state`` for a checkpoint: gathered whole from a sharded model (every
    process calls this), nothing to override otherwise."""
    if not is_sharded(model):
        return {}
    return {"model_state": whole_model_state(model), "optimizer_state": whole_optimizer_state(optimizer)}


class TrainingSession:
    """Setup, resume, stepping bookkeeping and saving of one training phase (see the module docstring).

    ``train``: the phase's :class:`TrainConfig` (``cfg.train`` or ``cfg.align.train``); ``phase``:
    the label written with every metric row (``pretrain``, ``align/dpo``). ``resume``: a checkpoint of
    this run: optimizer, schedule, RNG and instrument sums continue from it (the caller loads the
    weights, which differ by phase: a full model or a LoRA adapter).
    """

    def __init__(self, cfg: RunConfig, train: TrainConfig, run_dir: Path, *, phase: str, model, tokenizer,
                 resume: Path | None = None, overwrite: bool = False, progress: bool = True) -> None:
        self.cfg, self.train, self.phase, self.tokenizer = cfg, train, phase, tokenizer
        self.accelerator = Accelerator(mixed_precision=train.mixed_precision, cpu=not torch.cuda.is_available(),
                                       project_dir=str(run_dir))
        if train.fsdp and self.accelerator.distributed_type != DistributedType.FSDP:  # else accelerate shards it
            shard_model(model, self.accelerator.device)
        refuse_deepspeed(self.accelerator.distributed_type == DistributedType.DEEPSPEED)
        self.optimizer = make_optimizer(model.parameters(), train)
        self.scheduler = make_scheduler(self.optimizer, train)
        # W0 is written once per phase beside the report snapshots (a checkpoint names it by digest); phases
        # of one run that start from the same weights share one file (hard links under the run's root)
        self.suite = build_suite(model, cfg.instruments, cfg.seed, reference_dir=Path(run_dir) / SNAPSHOT_DIR,
                                 reference_shared=cfg.run_dir)
        self.restored: dict = {}  # a resumed run's carried state (see carry)
        self.start_step = self._resume(Path(resume)) if resume is not None else 0
        # One process owns the directory (under torchrun the others would race it).
        self.files = RunDirectory(run_dir, cfg, resume_step=self.start_step if resume is not None else None,
                                  overwrite=overwrite, accelerator=self.accelerator,
                                  keep_checkpoints=train.keep_checkpoints)
        if is_sharded(model):  # already sharded: accelerate must not wrap it again (in DDP)
            self.model, self.optimizer = model, self.accelerator.prepare(self.optimizer)
        else:
            self.model, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.device = self.accelerator.device
        sharding = "fsdp" if is_sharded(model) else ("ddp" if self.world > 1 else "none")
        self.files.record(started=now(), versions=versions(), phase=phase, world_size=self.world, sharding=sharding,
                          device=str(self.device), **model_facts(model))
        if not progress:  # nor transformers' loading / "Writing model shards" bars
            transformers.utils.logging.disable_progress_bar()
        self.bar = tqdm(total=train.steps, initial=self.start_step, desc=f"{phase} {cfg.name}", dynamic_ncols=True,
                        disable=not progress or not self.accelerator.is_main_process)
        self.result = RunResult(Path(run_dir), checkpoint_dir(run_dir, train.steps))
        self._suite_ctx = None
        self.guard = DivergenceGuard(train.on_nonfinite, train.stall_patience, phase=phase)
        self.signals = StopSignals(phase)
        self._loss_bad: torch.Tensor | None = None  # on the device: a micro-batch loss of this step was not finite
        self._stash = None  # covariance sums before the step in flight (on_nonfinite: skip only)
        self._saved_step = self.start_step if resume is not None else None
        # a loop's own state that must survive a resume (e.g. the CE loss window): name -> () -> plain dict
        self._carried: dict = {}

    def _resume(self, checkpoint: Path) -> int:
        state = load_trainer_state(checkpoint)
        self.restored = state.get("carried", {})
        # Checkpoints hold whole optimizer tensors: a sharded model takes its own shards of them.
        sharded = any(isinstance(p, DTensor) for g in self.optimizer.param_groups for p in g["params"])
        self.optimizer.load_state_dict(local_optimizer_state(self.optimizer, state["optimizer"]) if sharded
                                       else state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.suite.load_state_dict(load_instruments(checkpoint) or {})
        return state["step"]

    # ----- the loop ----------------------------------------------------------------------------------
    def __enter__(self) -> TrainingSession:
        self._suite_ctx = self.suite.attached(self.model, self.optimizer)
        self._suite_ctx.__enter__()
        self.signals.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.signals.__exit__(*exc)
            self._suite_ctx.__exit__(*exc)
        finally:
            self.bar.close()
            self.files.close()

    def steps(self):
        """Optimizer steps ``start + 1 .. train.steps``. After each step, a stop signal (SIGTERM,
        SIGINT) writes a checkpoint and raises :class:`Interrupted` (all processes agree first)."""
        for step in range(self.start_step + 1, self.train.steps + 1):
            self._loss_bad = None
            if self.train.on_nonfinite == "skip":
                self._stash = self.suite.covariance_state()
            yield step
            self.bar.update(1)
            if step < self.train.steps and self._stop_requested():
                self._interrupt(step)

    def _stop_requested(self) -> bool:
        flag = self.signals.received is not None
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    def _interrupt(self, step: int) -> None:
        if self._saved_step != step:
            self.save(step)
        self.accelerator.wait_for_everyone()
        raise Interrupted(self.signals.received or signal.SIGTERM, step, checkpoint_dir(self.files.path, step),
                          self.phase, note="; continue with --resume latest")

    def carry(self, name: str, state) -> dict:
        """Keep ``state()`` (tensors and plain values, the same on every process) in every mid-run
        checkpoint under ``name``; returns what a resumed run restored for it ({} otherwise)."""
        self._carried[name] = state
        return self.restored.get(name, {})

    def autocast(self):
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()).all()  # kept on the device: read once per step, in optimizer_step
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad
        self.accelerator.backward(loss)

    def optimizer_step(self, step: int) -> tuple[float, dict[str, float] | None]:
        """Clip, step, advance the schedule, zero the gradients; then the instruments' bookkeeping.
        Returns the gradient norm before clipping and the geometry metrics when they are due (always
        at the phase's last step), else None.

        The divergence guard runs first: a non-finite loss or gradient raises
        :class:`DivergenceError` before the optimizer sees it, or (``on_nonfinite: skip``) skips the
        update and restores the covariance sums from before the step (the schedule still advances,
        so the learning rate stays a function of the step)."""
        grad_norm, loss_finite, statistics_finite = self._step_health(
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.train.max_grad_norm or float("inf")))
        apply = self.guard.check(step, grad_norm=grad_norm, loss_finite=loss_finite, model=self.model)
        if apply:
            self.suite.before_optimizer_step(step, force=step == self.train.steps)  # captures only a due step's views
            self.optimizer.step()
        elif self._stash is not None:
            self.suite.restore_covariance(self._stash)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._stash = None
        if apply and not statistics_finite:  # a skipped step's sums were restored to the last good ones
            bad = ", ".join(self.suite.nonfinite_statistics()[:3]) or "on another process"
            raise DivergenceError(f"{self.phase} diverged at step {step}: the instruments' statistics are not "
                                  f"finite ({bad}); the run stopped before they reached a metric or "
                                  "a checkpoint. Lower train.lr, or use instruments.dtype=float64.", step)
        return grad_norm, self.suite.after_optimizer_step(step, force=step == self.train.steps)

    def _step_health(self, grad_norm) -> tuple[float, bool, bool]:
        """(gradient norm, every loss of the step finite, every covariance sum finite), agreed by all
        processes, in one read-back from the device per step: the divergence guard's decision needs
        it on the host, nothing else in the step does."""
        no = torch.zeros((), dtype=torch.bool, device=self.device)
        stats_finite = self.suite.statistics_finite()
        flags = torch.stack([(self._loss_bad if self._loss_bad is not None else no).to(self.device),
                             ~stats_finite.to(self.device) if stats_finite is not None else no]).double()
        if self.world > 1:  # every process must take the same decision
            flags = self.accelerator.reduce(flags, reduction="sum")
        if isinstance(grad_norm, DTensor):  # the norm of sharded gradients (FSDP2): reduce it, on the device
            grad_norm = grad_norm.full_tensor()
        norm = torch.as_tensor(grad_norm, device=self.device).detach().double().reshape(1)
        value, loss_bad, stats_bad = torch.cat([norm, flags]).tolist()
        return value, loss_bad == 0, stats_bad == 0

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def log_due(self, step: int) -> bool:
        return step % self.train.log_every == 0 or step == self.train.steps

    def eval_due(self, step: int) -> bool:
        return bool(self.train.eval_every and step % self.train.eval_every == 0) or step == self.train.steps

    def reduce_sum(self, values: dict[str, float]) -> dict[str, float]:
        """``values`` summed over processes (every process calls it at the same steps)."""
        if self.world == 1 or not values:
            return values
        names = sorted(values)
        t = torch.tensor([values[n] for n in names], dtype=torch.float64, device=self.device)
        t = self.accelerator.reduce(t, reduction="sum")
        return dict(zip(names, t.tolist()))

    def save(self, step: int) -> None:
        """A checkpoint at ``step`` (every process calls it: gathering state is collective); at the phase's
        last step the final one, with the instrument snapshot and any LoRA adapter merged."""
        model = self.accelerator.unwrap_model(self.model)
        if step == self.train.steps:
            save_final(self.files, step, model=model, tokenizer=self.tokenizer, optimizer=self.optimizer,
                       scheduler=self.scheduler, suite=self.suite)
        else:
            self.files.save(step, model=model, tokenizer=self.tokenizer, optimizer=self.optimizer,
                            scheduler=self.scheduler, instruments=self.suite.snapshot_state(), snapshot=False,
                            extra={"carried": {name: get() for name, get in self._carried.items()}},
                            **whole_states(model, self.optimizer))
        self._saved_step = step

    def end_step(self, step: int, row: dict) -> None:
        """Log ``row`` (if not empty) and write a checkpoint when due."""
        if row:
            self.files.log({"phase": self.phase, **row}, step)
            self.result.metrics = {"step": step, **row}
            self.bar.set_postfix({short: f"{row[k]:.3g}" for k, short in POSTFIX.items() if k in row}, refresh=False)
        if step == self.train.steps or (self.train.save_every and step % self.train.save_every == 0):
            self.save(step)
        self.accelerator.wait_for_everyone()
