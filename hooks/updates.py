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

Sharded weights (FSDP2 ``DTensor``): a plain weight's copies are kept as this process's rows only
(memory 1 / processes of the above) and gathered when a metric or a snapshot reads them (a
collective, at the metric schedule); fused, transposed or LoRA matrices are gathered every step.

Cost per optimizer step: a handful of memory-bound passes over the tracked weights, no host sync.
Plain fp32 ``nn.Linear`` weights (the common case) are handled together by multi-tensor
(``torch._foreach_*``) kernels into persistent buffers: gradient copy, gradient sum, squared norms
(computed in float64, accumulated in a float64 tensor on the weights' device, never read back per
step), pre-step weight copy, and ``W_{t+1} - W_t``. Fused, transposed, LoRA or non-fp32 matrices
take the same math one matrix at a time.
"""

from __future__ import annotations

import torch
from torch import nn

from weightgeom.hooks import keys
from weightgeom.hooks.base import Instrument
from weightgeom.hooks.distributed import all_reduce_sums
from weightgeom.hooks.distributed import rank as _rank
from weightgeom.hooks.roles import TrackedMatrix, local


class UpdateInstrument(Instrument):
    """State keys: ``weights/L{i}/{r}/{W0,delta,update,grad,grad_sum,grad_sq,steps}``.

    ``grad[key]``, ``update[key]``, ``grad_sum[key]`` are fp32 (out, in) tensors (this process's rows of
    a sharded plain weight: read whole matrices through :meth:`view`); ``grad_sq[key]`` is a 0-dim
    float64 tensor on the weights' device (this process's part when sharded: :meth:`coherence_terms`).
    """

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
        plain: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (key, live weight, live grad)
        for tm in self.tracked:
            if tm.plain_fp32:
                weight = local(tm.module.weight)
                if tm.module.weight.grad is not None:
                    plain.append((tm.key, weight, local(tm.module.weight.grad)))
                else:
                    self._before[tm.key] = _copy_into(self._before.get(tm.key), weight.detach())
                continue
            g = tm.grad()
            if g is not None:
                self._record_grads([tm.key], [g], fresh=True)
            self._before[tm.key] = tm.weight()
        if plain:
            keys = [k for k, _, _ in plain]
            grads = [g.detach() for _, _, g in plain]
            weights = [w.detach() for _, w, _ in plain]
            self._record_grads(keys, grads, fresh=False)
            self._copy_all(self._before, keys, weights)
        self._stepping = True
        self.steps += 1
        return None

    def _record_grads(self, keys: list[str], grads: list[torch.Tensor], fresh: bool) -> None:
        """Last gradient, gradient sum and squared-norm sum of ``keys``, with multi-tensor kernels.
        ``fresh``: ``grads`` are private copies that may be kept as they are."""
        if fresh:
            for key, g in zip(keys, grads):
                self.grad[key] = g
        else:  # the optimizer may zero .grad in place later: keep a copy (a persistent buffer)
            self._copy_all(self.grad, keys, grads)
        new = [k for k in keys if k not in self.grad_sum]
        for key in new:
            self.grad_sum[key] = torch.zeros_like(self.grad[key])
            self.grad_sq[key] = torch.zeros((), dtype=torch.float64, device=self.grad[key].device)
        last = [self.grad[k] for k in keys]
        torch._foreach_add_([self.grad_sum[k] for k in keys], last)
        norms = torch._foreach_norm(last, 2, dtype=torch.float64)
        torch._foreach_addcmul_([self.grad_sq[k] for k in keys], norms, norms)

    @staticmethod
    def _copy_all(store: dict[str, torch.Tensor], keys: list[str], sources: list[torch.Tensor]) -> None:
        """``store[key] = sources[i].clone()`` through persistent buffers: one multi-tensor copy."""
        for key, src in zip(keys, sources):
            buf = store.get(key)
            if buf is None or buf.shape != src.shape or buf.device != src.device or buf.dtype != src.dtype:
                store[key] = torch.empty_like(src, memory_format=torch.contiguous_format)
        torch._foreach_copy_([store[k] for k in keys], sources)

    @torch.no_grad()
    def after_step(self) -> None:
        if not self._stepping:
            return None  # no pre-step weights recorded: no update to take
        self._stepping = False
        plain_keys, plain_weights, plain_before = [], [], []
        for tm in self.tracked:
            before = self._before[tm.key]
            if tm.plain_fp32:
                plain_keys.append(tm.key)
                plain_weights.append(local(tm.module.weight).detach())
                plain_before.append(before)
            else:
                self.update[tm.key] = tm.weight() - before
        if plain_keys:  # W_{t+1} - W_t; the pre-step copies stay as next step's buffers
            self.update.update(zip(plain_keys, torch._foreach_sub(plain_weights, plain_before)))
        return None

    def _rows_only(self, tm: TrackedMatrix) -> bool:
        """Kept as this process's rows (a sharded plain weight)."""
        return tm.plain_fp32 and tm.sharded

    def _current(self, tm: TrackedMatrix) -> torch.Tensor:
        """The weight now, fp32, as this instrument keeps it (this process's rows, or the whole matrix)."""
        return local(tm.module.weight).detach().float().clone() if self._rows_only(tm) else tm.weight()

    def view(self, tm: TrackedMatrix, name: str) -> torch.Tensor | None:
        """Whole (out, in) fp32 ``W0``, ``delta`` (= W - W0), ``update``, ``grad`` or ``grad_sum`` of
        ``tm`` (None when not recorded); gathered when sharded, so every process calls it."""
        if name == "delta":
            kept = self._current(tm) - self.w0[tm.key]
        else:
            store = {"W0": self.w0, "update": self.update, "grad": self.grad, "grad_sum": self.grad_sum}[name]
            kept = store.get(tm.key)
        if kept is None:
            return None
        return tm.gather(kept) if self._rows_only(tm) else kept

    def delta(self, tm: TrackedMatrix) -> torch.Tensor:
        """Cumulative ``W - W0`` (fp32, out x in)."""
        return self.view(tm, "delta")

    def coherence_terms(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """``(keys, ‖sum_t G_t‖², sum_t ‖G_t‖²)`` of every matrix with gradients, float64 on the weights'
        device; the parts of sharded weights are summed over processes (one collective)."""
        keys = list(self.grad_sum)
        if not keys:
            return [], torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
        sums = torch.stack([self.grad_sum[k].double().square().sum() for k in keys])
        squares = torch.stack([self.grad_sq[k].to(sums.device) for k in keys])
        by_key = {tm.key: tm for tm in self.tracked}
        flags = [self._rows_only(by_key[k]) for k in keys]
        if any(flags):
            sharded = torch.tensor(flags, device=sums.device)
            parts = all_reduce_sums({"sums": torch.where(sharded, sums, 0.0),
                                     "squares": torch.where(sharded, squares, 0.0)})
            sums = torch.where(sharded, parts["sums"], sums)
            squares = torch.where(sharded, parts["squares"], squares)
        return keys, sums, squares

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Whole matrices (gathered when sharded: every process calls it)."""
        state = {}
        names, _, squares = self.coherence_terms()
        grad_sq = dict(zip(names, squares))
        for tm in self.tracked:
            for name in ("W0", "delta", "update", "grad", "grad_sum"):
                value = self.view(tm, name)
                if value is not None:
                    state[keys.state_key(keys.WEIGHTS, tm.key, name)] = value.clone()
            if tm.key in grad_sq:
                state[keys.state_key(keys.WEIGHTS, tm.key, "grad_sq")] = grad_sq[tm.key].clone()
        state[keys.WEIGHT_STEPS] = torch.tensor(self.steps, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.reset_history()
        for tm in self.tracked:
            def get(name: str, tm=tm) -> torch.Tensor | None:
                return state.get(keys.state_key(keys.WEIGHTS, tm.key, name))

            if get("W0") is None:
                raise KeyError(f"instrument state has no {keys.state_key(keys.WEIGHTS, tm.key, 'W0')}: was it saved "
                               "from a model with the same layers and roles (instruments.roles / instruments.layers)?")
            kept = tm.scatter if self._rows_only(tm) else (lambda t: t)
            self.w0[tm.key] = kept(get("W0").float()).clone()
            if get("update") is not None:
                self.update[tm.key] = kept(get("update").float()).clone()
            if get("grad") is not None:
                self.grad[tm.key] = kept(get("grad").float()).clone()
                self.grad_sum[tm.key] = kept(get("grad_sum").float()).clone()
                # A sharded weight's part of the norm: the sum over processes is restored on rank 0 only.
                norm = get("grad_sq").to(torch.float64).clone()
                self.grad_sq[tm.key] = norm if not self._rows_only(tm) or _rank() == 0 else torch.zeros_like(norm)
        self.steps = int(state.get(keys.WEIGHT_STEPS, torch.tensor(0)))

    def reset_history(self) -> None:
        self.update: dict[str, torch.Tensor] = {}
        self.grad: dict[str, torch.Tensor] = {}
        self.grad_sum: dict[str, torch.Tensor] = {}
        self.grad_sq: dict[str, torch.Tensor] = {}
        self._before: dict[str, torch.Tensor] = {}  # pre-step weights, kept as buffers between steps
        self._stepping = False  # before_step ran, after_step not yet
        self.steps = 0

    def reset(self) -> None:
        """New phase: the current weights become ``W0`` and the step history is cleared."""
        self.w0 = {tm.key: self._current(tm) for tm in self.tracked}
        self.reset_history()


def _copy_into(buffer: torch.Tensor | None, src: torch.Tensor) -> torch.Tensor:
    """``src.clone()`` written into ``buffer`` when it has the right shape (no new allocation)."""
    if buffer is None or buffer.shape != src.shape or buffer.device != src.device or buffer.dtype != src.dtype:
        return src.clone(memory_format=torch.contiguous_format)
    return buffer.copy_(src)
