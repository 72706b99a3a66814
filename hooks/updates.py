"""What the optimizer actually wrote: the cumulative delta, the last update, the raw gradient.

Three views of every tracked matrix, read as :mod:`weightgeom.hooks.views` (never a dense copy where
none is needed):

    delta    W - W0, the cumulative delta since the phase start (``W0``: :mod:`weightgeom.hooks.reference`)
    update   U_t = W_{t+1} - W_t, the last optimizer step (differs from -lr G_t under Adam's scaling)
    grad     G_t, the raw gradient the optimizer consumed (after clipping, if any)

Memory. Between steps this instrument holds ``W0`` (where ``instruments.reference`` says) and nothing
else weight-sized. The update and gradient views exist only around a step whose metrics are due
(``capture="due"``, the default): :meth:`before_step` copies the pre-step weights of that step only
(beside the weights, or in host memory when ``W0`` is kept off the device), :meth:`after_step` turns
the copy into the update (in place for fp32 weights; otherwise it is read as row blocks of
``W_{t+1} - W_t``), and the suite computes the metrics inside the optimizer's post-step hook, where
``.grad`` still holds ``G_t`` (no copy); each update copy is dropped as soon as it is read.
``capture="every_step"`` keeps the last update and a copy of the last gradient after every step instead
(two more copies, held between steps), so that ``InstrumentSuite.compute`` called at any time sees them.
LoRA matrices with a frozen base keep only their adapters' factors (``delta = sum s (B A - B0 A0)``,
rank <= 2r): no dense matrix at all, and no gradient view (autograd never forms the effective weight's
gradient).

Coherence (``coherence=True``, opt-in): ``sum_t G_t`` (one more fp32 copy, held for the whole phase)
and ``sum_t ‖G_t‖²``, for ``‖sum G_t‖² / sum ‖G_t‖²``.

Sharded weights (FSDP2 ``DTensor``): copies of a plain weight are this process's rows; a metric
gathers the rows of one matrix at a time (a collective at the metric schedule).

Cost per optimizer step when nothing is due: the step counter, and with coherence two multi-tensor
(``torch._foreach_*``) passes over the gradients. No host sync.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from weightgeom.hooks import keys
from weightgeom.hooks.base import Instrument
from weightgeom.hooks.distributed import all_reduce_sums
from weightgeom.hooks.distributed import rank as _rank
from weightgeom.hooks.reference import DIGEST_KEY, ReferenceWeights
from weightgeom.hooks.roles import TrackedMatrix, local
from weightgeom.hooks.views import Dense, LowRank, MatrixView, RowBlocks, Zero

CAPTURES = ("due", "every_step")


@dataclass
class PreStep:
    """Weights before a step kept off their device or in their own dtype: the update is
    ``W_{t+1} - W_t`` read a row block at a time (fp32), so it is never formed whole."""

    before: Tensor

    def update_view(self, tm: TrackedMatrix, dtype: torch.dtype) -> MatrixView:
        weight = local(tm.module.weight).detach()
        if _rows_only(tm):
            return Dense(tm.gather(weight.float() - self.before.to(weight.device).float()), dtype)

        def rows(r0: int, r1: int) -> Tensor:
            return weight[r0:r1].float() - self.before[r0:r1].to(weight.device, non_blocking=True).float()

        return RowBlocks(rows, tuple(weight.shape), dtype, weight.device)


class UpdateInstrument(Instrument):
    """State keys: ``weights/steps``, ``meta/w0_sha256`` (the W0 file's digest, see
    :mod:`weightgeom.hooks.reference`) and, with coherence, ``weights/L{i}/{r}/{grad_sum,grad_sq}``."""

    def __init__(self, tracked: list[TrackedMatrix], *, reference: str = "device",
                 reference_dir: str | Path | None = None, reference_shared: str | Path | None = None,
                 coherence: bool = False, capture: str = "due") -> None:
        super().__init__()
        if capture not in CAPTURES:
            raise ValueError(f"instruments.capture must be one of {list(CAPTURES)}, got {capture!r}")
        self.tracked, self.coherence, self.capture = tracked, coherence, capture
        self.w0 = ReferenceWeights(tracked, reference, reference_dir, reference_shared)
        self._warned: set[str] = set()
        self.reset_history()

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """A phase starts at its first attach: the weights now become ``W0``. With ``optimizer`` (this
        instrument on its own) its step hooks capture the update and gradient of every step;
        ``InstrumentSuite`` attaches it without one and drives :meth:`before_step` / :meth:`after_step`
        itself, around due steps only."""
        if not self.w0.captured:
            self.reset()
        if optimizer is not None:
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
            self._handles.append(inner.register_step_pre_hook(lambda *_: self.before_step(True, True)))
            self._handles.append(inner.register_step_post_hook(lambda *_: self.after_step()))

    # ----- one optimizer step ------------------------------------------------------------------------
    @torch.no_grad()
    def before_step(self, capture: bool, copy_grads: bool) -> None:
        """Right before ``optimizer.step()``: count the step, add the gradients to the coherence sums,
        and when ``capture`` copy the pre-step weights (and, with ``copy_grads``, the gradients: the
        metrics will run after ``.grad`` is gone)."""
        self.steps += 1
        self._stepping = True
        self.release()
        if self.coherence:
            self._add_to_sums()
        if not capture:
            return
        for tm in self.tracked:
            factors = tm.lora_factors()
            if factors is not None:
                self._before[tm.key] = [(s, B.clone(), A.clone()) for s, B, A in factors]
            elif tm.plain:
                self._before[tm.key] = self._pre_step_copy(local(tm.module.weight).detach())
            else:
                self._before[tm.key] = tm.weight()
            if copy_grads:
                g = self._grad_now(tm)
                if g is not None:
                    self.grad[tm.key] = g.clone()

    @torch.no_grad()
    def after_step(self) -> None:
        """Right after ``optimizer.step()``: each captured pre-step copy becomes the update ``W_{t+1} - W_t``
        (in place for plain weights: ``-(W_t - W_{t+1})`` is exactly ``W_{t+1} - W_t``)."""
        if not self._stepping:
            return
        self._stepping = False
        for tm in self.tracked:
            before = self._before.pop(tm.key, None)
            if before is None:
                continue
            if isinstance(before, list):
                self.update[tm.key] = (before, tm.lora_factors())
            elif isinstance(before, PreStep):
                self.update[tm.key] = before  # read as rows of W_{t+1} - W_t when the metrics ask
            elif tm.plain:
                self.update[tm.key] = before.sub_(local(tm.module.weight).detach()).neg_()
            else:
                self.update[tm.key] = tm.weight().sub_(before)

    def _pre_step_copy(self, weight: Tensor) -> Tensor | PreStep:
        """The weights before a due step: an fp32 copy beside them (the update is then formed in place),
        or, with ``W0`` off the device (``reference: cpu / disk``) or weights that are not fp32, a copy
        in host memory / in their own dtype whose difference with the stepped weights is read a row block
        at a time (the accelerator then holds no copy at all)."""
        if self.w0.place != "device":
            host = weight.to("cpu", copy=True)
            return PreStep(host.pin_memory() if weight.is_cuda else host)
        if weight.dtype != torch.float32:
            return PreStep(weight.clone())
        return weight.clone()

    def release(self) -> None:
        """Drop the update and gradient copies (after the metrics that read them), unless every step keeps
        them."""
        if self.capture != "every_step" or self._stepping:
            self.update, self.grad = {}, {}

    def drop_update(self, tm: TrackedMatrix) -> None:
        """Drop ``tm``'s update copy (its metrics are taken), unless every step keeps it."""
        if self.capture != "every_step":
            self.update.pop(tm.key, None)

    def _grad_now(self, tm: TrackedMatrix) -> Tensor | None:
        """The live gradient, oriented (out, in); this process's rows of a sharded plain weight."""
        if tm.plain:
            g = tm.module.weight.grad
            return None if g is None else local(g).detach()
        return tm.grad()

    def _add_to_sums(self) -> None:
        names, grads = [], []
        for tm in self.tracked:
            g = self._grad_now(tm)
            if g is not None:
                names.append(tm.key)
                grads.append(g.float())
        for key, g in zip(names, grads):
            if key not in self.grad_sum:
                self.grad_sum[key] = torch.zeros_like(g)
                self.grad_sq[key] = torch.zeros((), dtype=torch.float64, device=g.device)
        if names:
            torch._foreach_add_([self.grad_sum[k] for k in names], grads)
            norms = torch._foreach_norm(grads, 2, dtype=torch.float64)
            torch._foreach_addcmul_([self.grad_sq[k] for k in names], norms, norms)

    def held_bytes(self) -> dict[str, int]:
        """Bytes held now: ``reference`` (W0 in memory), ``views`` (pre-step copies, updates, gradient
        copies: zero between steps unless ``capture="every_step"``), ``coherence`` (gradient sums)."""
        def size(obj) -> int:
            if isinstance(obj, Tensor):
                return obj.numel() * obj.element_size()
            if isinstance(obj, (list, tuple)):
                return sum(size(o) for o in obj)
            if isinstance(obj, PreStep):
                return size(obj.before)
            return 0

        views = sum(size(v) for store in (self._before, self.update, self.grad) for v in store.values())
        return {"reference": self.w0.bytes_in_memory(), "views": views,
                "coherence": sum(size(v) for store in (self.grad_sum, self.grad_sq) for v in store.values())}

    # ----- views ----------------------------------------------------------------------------------
    def view(self, tm: TrackedMatrix, name: str, dtype: torch.dtype, live_grads: bool = False) -> MatrixView | None:
        """``delta``, ``update`` or ``grad`` of ``tm`` in ``dtype`` (None when not recorded). ``live_grads``:
        read ``.grad`` (inside the optimizer's post-step hook) when no copy was kept. Gathers a sharded
        matrix (a collective: every process calls it for every matrix, in the same order)."""
        if name == "delta":
            return self._delta(tm, dtype)
        if name == "update":
            kept = self.update.get(tm.key)
            if kept is None:
                return None
            if isinstance(kept, tuple):  # LoRA: (factors before, factors after)
                return _factored_difference(kept[1], kept[0], dtype)
            if isinstance(kept, PreStep):
                return kept.update_view(tm, dtype)
            return Dense(tm.gather(kept) if _rows_only(tm) else kept, dtype)
        if name == "grad":
            g = self.grad.get(tm.key)
            if g is None and live_grads:
                g = self._grad_now(tm)
            if g is None:
                return None
            return Dense(tm.gather(g) if _rows_only(tm) else g, dtype)
        raise ValueError(f"unknown view {name!r} (delta, update, grad)")

    def _delta(self, tm: TrackedMatrix, dtype: torch.dtype) -> MatrixView:
        frozen = self.w0.is_frozen(tm)
        if frozen is not None:
            if not frozen and tm.key not in self._warned:
                self._warned.add(tm.key)
                warnings.warn(f"{tm.key} was frozen at the phase start, so no W0 was kept for it, but its weight has "
                              "changed since: its metrics are skipped until the next phase", stacklevel=2)
            return Zero(_shape_of(tm), dtype, _device_of(tm))
        w0 = self.w0.factors(tm)
        if w0 is not None:
            return _factored_difference(tm.lora_factors(), w0, dtype)
        if _rows_only(tm):
            return Dense(tm.gather(local(tm.module.weight).detach().float() - self.w0.local(tm)), dtype)
        if tm.plain:
            weight = tm.module.weight.detach()
        else:
            weight = tm.weight()  # fused rows, transposed or LoRA without factors: one fp32 copy, for this metric
        device = weight.device

        def rows(r0: int, r1: int) -> Tensor:
            return weight[r0:r1].to(torch.float32) - self.w0.rows(tm, r0, r1, device)

        return RowBlocks(rows, tuple(weight.shape), dtype, device)

    def delta(self, tm: TrackedMatrix) -> Tensor:
        """Cumulative ``W - W0`` as a dense fp32 (out, in) tensor (for tests and small models)."""
        view = self._delta(tm, torch.float32)
        if isinstance(view, Zero):
            return torch.zeros(view.shape, device=view.device)
        if isinstance(view, LowRank):
            return view.L @ view.R
        if isinstance(view, Dense):
            return view.M
        return torch.cat([b for _, _, b in view.blocks()])

    def coherence_terms(self) -> tuple[list[str], Tensor, Tensor]:
        """``(keys, ‖sum_t G_t‖², sum_t ‖G_t‖²)`` of every matrix with gradients, float64 on the weights'
        device; the parts of sharded weights are summed over processes (one collective)."""
        names = list(self.grad_sum)
        if not names:
            return [], torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
        sums = torch.stack([self.grad_sum[k].double().square().sum() for k in names])
        squares = torch.stack([self.grad_sq[k].to(sums.device) for k in names])
        by_key = {tm.key: tm for tm in self.tracked}
        flags = [_rows_only(by_key[k]) for k in names]
        if any(flags):
            sharded = torch.tensor(flags, device=sums.device)
            parts = all_reduce_sums({"sums": torch.where(sharded, sums, 0.0),
                                     "squares": torch.where(sharded, squares, 0.0)})
            sums = torch.where(sharded, parts["sums"], sums)
            squares = torch.where(sharded, parts["squares"], squares)
        return names, sums, squares

    # ----- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """Small tensors only: the step count, the W0 file's digest (written now if this phase has none:
        a collective under several processes) and, with coherence, its sums (whole matrices, gathered
        when sharded)."""
        state = {keys.WEIGHT_STEPS: torch.tensor(self.steps, dtype=torch.int64),
                 DIGEST_KEY: torch.frombuffer(bytearray(self.w0.persist()), dtype=torch.uint8).clone()}
        if self.coherence:
            names, _, squares = self.coherence_terms()
            by_key = {tm.key: tm for tm in self.tracked}
            for key, square in zip(names, squares):
                tm = by_key[key]
                kept = self.grad_sum[key]
                state[keys.state_key(keys.WEIGHTS, key, "grad_sum")] = (tm.gather(kept) if _rows_only(tm)
                                                                        else kept).clone()
                state[keys.state_key(keys.WEIGHTS, key, "grad_sq")] = square.clone()
        return state

    def load_state_dict(self, state: dict[str, Tensor], search: tuple[Path, ...] = ()) -> None:
        """Restore :meth:`state_dict`: ``W0`` from the file its digest names (looked for in ``search`` and
        the reference directory), or from a legacy state's ``weights/.../W0`` tensors."""
        self.reset_history()
        if DIGEST_KEY in state:
            self.w0.load(bytes(state[DIGEST_KEY].to(torch.uint8).cpu().tolist()), search)
        else:
            legacy = {k for k in state if keys.family(k) == keys.WEIGHTS}
            if not any(k.endswith("/W0") for k in legacy):
                raise KeyError(f"instrument state has no {DIGEST_KEY} (the reference weights' digest) and no "
                               "weights/L{i}/{r}/W0 tensors: it was not saved by InstrumentSuite.state_dict")
            self.w0.load_tensors(state.__getitem__, legacy)
        for tm in self.tracked:
            total = state.get(keys.state_key(keys.WEIGHTS, tm.key, "grad_sum"))
            if self.coherence and total is not None:
                self.grad_sum[tm.key] = (tm.scatter(total.float()) if _rows_only(tm) else total.float()).clone()
                norm = state[keys.state_key(keys.WEIGHTS, tm.key, "grad_sq")].to(torch.float64).clone()
                # A sharded weight's part of the norm: the sum over processes is restored on rank 0 only.
                self.grad_sq[tm.key] = norm if not _rows_only(tm) or _rank() == 0 else torch.zeros_like(norm)
        self.steps = int(state.get(keys.WEIGHT_STEPS, torch.tensor(0)))

    def reset_history(self) -> None:
        self.update: dict[str, object] = {}
        self.grad: dict[str, Tensor] = {}
        self.grad_sum: dict[str, Tensor] = {}
        self.grad_sq: dict[str, Tensor] = {}
        self._before: dict[str, object] = {}
        self._stepping = False  # before_step ran, after_step not yet
        self.steps = 0

    def reset(self) -> None:
        """New phase: the current weights become ``W0`` and the step history is cleared."""
        self.w0.capture()
        self.reset_history()


def _rows_only(tm: TrackedMatrix) -> bool:
    """Kept as this process's rows: a sharded plain weight."""
    return tm.plain and tm.sharded


def _shape_of(tm: TrackedMatrix) -> tuple[int, int]:
    w = getattr(tm.module, "base_layer", tm.module).weight
    out, inp = (w.shape[1], w.shape[0]) if tm.transposed else (w.shape[0], w.shape[1])
    return (len(tm.rows) if tm.rows is not None else out, inp)


def _device_of(tm: TrackedMatrix) -> torch.device:
    return local(getattr(tm.module, "base_layer", tm.module).weight).device


def _factored_difference(now, before, dtype: torch.dtype) -> LowRank:
    """``sum s B A (now) - sum s B A (before)`` as one low-rank ``L R``."""
    L = torch.cat([s * B for s, B, _ in now] + [-s * B for s, B, _ in before], 1)
    R = torch.cat([A for _, _, A in now] + [A for _, _, A in before], 0)
    return LowRank(L.float(), R.float(), dtype)
