"""The divergence guard: a step whose loss, gradients or statistics are not finite never reaches the
weights, the instruments' statistics or a checkpoint; a model whose gradient stays exactly zero is
stopped instead of being trained (and measured) for hundreds of dead steps.

Used by the shared :class:`weightgeom.trainers.session.TrainingSession` (our CE and preference loops) and, as a
``TrainerCallback``, by the TRL path. The policy comes from the phase's ``TrainConfig``:

* ``on_nonfinite: stop`` (default): raise :class:`DivergenceError` naming the step and the first
  parameter (in module order) whose gradient is NaN/inf, before the optimizer step;
* ``on_nonfinite: skip``: drop the step (no optimizer update; the trainer rolls back the step's
  covariance sums) and go on; ``stall_patience`` consecutive skipped steps stop the run;
* ``stall_patience``: consecutive steps with a gradient norm of exactly 0 that stop the run
  (0 disables it; a live model never has an all-zero gradient at a positive loss).
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from weightgeom.hooks.distributed import all_reduce_sums
from weightgeom.hooks.roles import local


class DivergenceError(RuntimeError):
    """Training produced non-finite values or stopped learning. Nothing of the offending step was
    written: the weights, statistics and checkpoints on disk are those of the last good step."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


def nonfinite_grads(model: nn.Module) -> list[str]:
    """Names of the parameters whose gradient holds NaN or inf, in ``named_parameters`` order (from
    the embedding up: the first is where the non-finite values entered the parameters first)."""
    return [name for name, param in model.named_parameters()  # a sharded gradient: this process's rows
            if param.grad is not None and not bool(torch.isfinite(local(param.grad)).all())]


def gradient_norm(model: nn.Module) -> float:
    """The global L2 norm of the gradients (inf/NaN when any is not finite), accumulated in float64.
    Sharded gradients (FSDP2) contribute their rows on each process, summed over processes."""
    grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    squares = torch.stack([local(g).double().pow(2).sum() for g in grads])
    sharded = torch.tensor([isinstance(g, DTensor) for g in grads], device=squares.device)
    total = squares[~sharded].sum() + all_reduce_sums({"rows": squares[sharded].sum()})["rows"]
    return float(total.sqrt())


class DivergenceGuard:
    """Decides, once per optimizer step, whether the step may be applied (see the module docstring).

    ``on_nonfinite``: ``"stop"`` or ``"skip"``; ``patience``: ``stall_patience`` (0 = never stop for a
    zero gradient or for consecutive skips); ``phase``: named in messages.
    """

    def __init__(self, on_nonfinite: str = "stop", patience: int = 20, phase: str = "training") -> None:
        if on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
        self.on_nonfinite, self.patience, self.phase = on_nonfinite, patience, phase
        self.zero_run = 0  # consecutive steps with an all-zero gradient
        self.skip_run = 0  # consecutive skipped steps
        self.skipped = 0  # skipped steps in this process's part of the phase

    def check(self, step: int, *, grad_norm: float, loss_finite: bool = True, model: nn.Module | None = None,
              loss: float | None = None) -> bool:
        """True: apply the step. False: skip it (``on_nonfinite: skip``). Raises :class:`DivergenceError`
        when the run must stop. ``grad_norm``: the global gradient norm before clipping."""
        if not loss_finite or not math.isfinite(grad_norm):
            bad = nonfinite_grads(model) if model is not None else []
            what = ("loss" if not loss_finite else "gradient norm") + (
                f" (non-finite gradients in {len(bad)} parameters, the first: {bad[0]})" if bad else "")
            if self.on_nonfinite == "skip":
                self.skipped += 1
                self.skip_run += 1
                if self.patience and self.skip_run >= self.patience:
                    raise DivergenceError(
                        f"{self.phase} diverged: {self.skip_run} consecutive steps up to step {step} had a non-finite "
                        f"{what}, and were skipped (train.stall_patience={self.patience}). Lower the learning rate "
                        "(train.lr) or check the data; resume from an earlier checkpoint with the fix.", step)
                print(f"[guard] {self.phase} step {step}: non-finite {what}; step skipped "
                      f"(train.on_nonfinite=skip, {self.skipped} skipped so far)", file=sys.stderr)
                return False
            raise DivergenceError(
                f"{self.phase} diverged at step {step}: non-finite {what}. The run stopped before this step "
                "reached the weights, the instrument statistics or a checkpoint. Lower the learning rate "
                "(train.lr), raise warmup or clip harder (train.max_grad_norm); train.on_nonfinite=skip drops "
                "such steps instead.", step)
        self.skip_run = 0
        if grad_norm == 0.0 and (loss is None or loss > 0):
            self.zero_run += 1
            if self.patience and self.zero_run >= self.patience:
                at = f" (loss {loss:.6g})" if loss is not None else ""
                raise DivergenceError(
                    f"{self.phase} stalled: the gradient has been exactly zero for {self.zero_run} consecutive steps "
                    f"up to step {step}{at}. The model no longer learns (a dead model, typically after a too-large "
                    f"learning rate); its geometry would measure nothing. Lower train.lr and start again "
                    f"(train.stall_patience=0 disables this check).", step)
        else:
            self.zero_run = 0
        return True
