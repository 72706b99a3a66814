"""What the optimizer actually wrote: reference weights, cumulative delta, last update, raw gradient.

``W0`` is an fp32 copy of every tracked matrix taken at phase start (attach or ``reset``). Around
each optimizer step (``Optimizer.register_step_pre_hook`` / ``post_hook``, or called explicitly by
a callback) it records

    G_t        the raw gradient the optimizer is about to consume (after clipping, if any)
    U_t        the update W_{t+1} - W_t (differs from -lr G_t under Adam's per-element scaling)
    sum_t G_t, sum_t ||G_t||^2   for coherence ||sum G_t||^2 / sum ||G_t||^2

Memory: four fp32 copies of the tracked matrices (W0, pre-step weights, last update, grad sum)
plus the last gradient. LoRA-wrapped layers report the effective ``W_base + scale B A``; their
raw gradient is not materialised by autograd, so ``grad`` entries are absent for them.
"""

from __future__ import annotations

import torch
from torch import nn

from hooks.base import Instrument
from hooks.roles import TrackedMatrix


class UpdateInstrument(Instrument):
    """State keys: ``weights/L{i}/{r}/{W0,delta,update,grad,grad_sum,grad_sq,steps}``."""

    def __init__(self, tracked: list[TrackedMatrix]) -> None:
        super().__init__()
        self.tracked = tracked
        self.w0: dict[str, torch.Tensor] = {}
        self.reset_history()
        self._uses_optimizer_hooks = False

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        if not self.w0:
            self.reset()
        if optimizer is not None:
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
            self._handles.append(inner.register_step_pre_hook(lambda *_: self.before_step()))
            self._handles.append(inner.register_step_post_hook(lambda *_: self.after_step()))
            self._uses_optimizer_hooks = True

    def detach(self) -> None:
        super().detach()
        self._uses_optimizer_hooks = False

    @property
    def driven_by_optimizer(self) -> bool:
        return self._uses_optimizer_hooks

    @torch.no_grad()
    def before_step(self) -> None:
        self._before = {}
        for tm in self.tracked:
            g = tm.grad()
            if g is not None:
                self.grad[tm.key] = g
                if tm.key in self.grad_sum:
                    self.grad_sum[tm.key].add_(g)  # in place: no new (m, n) per step
                else:
                    self.grad_sum[tm.key] = g.clone()
                flat = g.reshape(-1).double()
                self.grad_sq[tm.key] = self.grad_sq.get(tm.key, 0.0) + float(torch.dot(flat, flat))
            self._before[tm.key] = tm.weight()
        self.steps += 1
        return None

    @torch.no_grad()
    def after_step(self) -> None:
        for tm in self.tracked:
            before = self._before.pop(tm.key, None)
            if before is None:
                continue
            weight = tm.module.weight if tm.plain_fp32 else None
            if weight is not None:  # plain fp32 Linear: W_{t+1} - W_t written into the pre-step copy
                self.update[tm.key] = torch.sub(weight.detach(), before, out=before)
            else:
                self.update[tm.key] = tm.weight() - before
        return None

    def delta(self, tm: TrackedMatrix) -> torch.Tensor:
        """Cumulative ``W - W0`` (fp32, out x in)."""
        return tm.weight() - self.w0[tm.key]

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for tm in self.tracked:
            k = f"weights/{tm.key}"
            state[f"{k}/W0"] = self.w0[tm.key].clone()
            state[f"{k}/delta"] = self.delta(tm)
            if tm.key in self.update:
                state[f"{k}/update"] = self.update[tm.key].clone()
            if tm.key in self.grad:
                state[f"{k}/grad"] = self.grad[tm.key].clone()
                state[f"{k}/grad_sum"] = self.grad_sum[tm.key].clone()
                state[f"{k}/grad_sq"] = torch.tensor(self.grad_sq[tm.key], dtype=torch.float64)
        state["weights/steps"] = torch.tensor(self.steps, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.reset_history()
        for tm in self.tracked:
            k = f"weights/{tm.key}"
            if f"{k}/W0" not in state:
                raise KeyError(f"instrument state has no {k}/W0: was it saved from a model with the same "
                               "layers and roles (instruments.roles / instruments.layers)?")
            self.w0[tm.key] = state[f"{k}/W0"].float().clone()
            if f"{k}/update" in state:
                self.update[tm.key] = state[f"{k}/update"].float().clone()
            if f"{k}/grad" in state:
                self.grad[tm.key] = state[f"{k}/grad"].float().clone()
                self.grad_sum[tm.key] = state[f"{k}/grad_sum"].float().clone()
                self.grad_sq[tm.key] = float(state[f"{k}/grad_sq"])
        self.steps = int(state.get("weights/steps", torch.tensor(0)))

    def reset_history(self) -> None:
        self.update: dict[str, torch.Tensor] = {}
        self.grad: dict[str, torch.Tensor] = {}
        self.grad_sum: dict[str, torch.Tensor] = {}
        self.grad_sq: dict[str, float] = {}
        self._before: dict[str, torch.Tensor] = {}
        self.steps = 0

    def reset(self) -> None:
        """New phase: the current weights become ``W0`` and the step history is cleared."""
        self.w0 = {tm.key: tm.weight() for tm in self.tracked}
        self.reset_history()
