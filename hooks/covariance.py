"""Input-activation and upstream-gradient covariances of linear layers, accumulated live.

For a linear map ``y = W a`` the weight gradient is ``dL/dW = sum_t delta_t a_t^T`` with
``delta_t = dL/dy_t``. This instrument accumulates the two factors' second moments (K-FAC's A and
G):

    C_a     = (1/N) sum_t a_t a_t^T            (n x n, one per *input group*: q/k/v share one)
    C_delta = (1/N) sum_t delta_t delta_t^T    (m x m, one per role on the output side)

How the hooks count (each point is a measured pitfall, pinned by tests/hooks/test_covariance.py; the
rules are in docs/metrics.md, "Statistics accumulated while training"):

* A forward hook on the module computes the pending input sums eagerly and registers a tensor hook
  on the module's output. Only when that tensor hook fires, i.e. when backward actually flows
  through this forward, are the sums committed. A no-grad reference forward (DPO) registers
  nothing; a gradient-checkpointing recompute registers a hook whose graph is never
  back-propagated (non-reentrant), or the original forward ran without grad (reentrant): either
  way each token is counted once per backward, never per forward.
* Padding is excluded with the ``attention_mask`` that the model's top-level forward received
  (captured by a pre-hook into a per-forward record), and the same kept-token index is used for
  ``a`` and ``delta`` (also in a module that sees the tokens flattened to ``(B*T, d)``, as a MoE
  layer's shared expert does). The index is computed once per top-level forward (one host sync when the
  mask lives on a GPU, none when it is on the CPU or absent) and shared by every module.
* Reentrant gradient checkpointing (``use_reentrant=True``) runs the block's first forward without
  grad and takes the statistics in the recompute during backward, possibly after other forwards
  with other padding. The first pass marks its record; at the end of that forward the record is
  attached (a pre-hook) to each reentrant checkpoint node of its autograd graph, so the recompute
  reads the mask and token subset of *its own* forward, not of the latest one.
* ``delta`` is multiplied by ``loss_normalizer`` (set by the trainer before backward): a loss that
  is a mean over N tokens scales every per-token gradient by 1/N; undoing that makes ``C_delta``
  comparable across objectives and batch sizes.
* Statistics are accumulated in ``dtype`` (fp32 by default, fp64 optional) with autocast disabled,
  whatever the model's dtype. ``gram_precision`` (``hooks/gram.py``) optionally forms the products
  on tensor cores (TF32 or bf16 inputs, fp32 sums); the default ``"fp32"`` is exact.
* No host syncs in the hooks besides the one per forward above: counts are host integers known from
  shapes, token subsets are drawn on the CPU generator and copied from pinned memory.

Cost (what keeps full-rate statistics cheap; ``benchmarks/bench_instruments.py`` measures it):
one ``n x n`` Gram matrix over the kept tokens per input group (shared by the roles that read the
same tensor) and one ``m x m`` per output-side role. A Gram matrix is symmetric, so only its upper
block triangle is computed (:class:`weightgeom.hooks.gram.Gram`, about 0.6x the flops of ``a.T @ a``) and the
accumulators hold the upper triangle; :meth:`state_dict` mirrors it. Without padding no token is
gathered (no ``index_select`` copy); fp32 inputs are not copied; ``C_delta`` is accumulated in
place (``addmm_``). Measured on 2 CPU cores (default tiny llama, batch 16 x 128), these GEMMs are
nearly all of the instruments' cost, and ``down_in`` (``d_ff x d_ff``) is most of that. Scales as
``N n^2``: on wide models use ``max_tokens`` (a seeded random subset of tokens per forward; the
estimate stays unbiased), or ``gram_precision`` tf32 / bf16 on a GPU.

No side CUDA stream: at the shapes where the Gram products matter (hidden >= 1024, 16k tokens) the
model's own GEMMs already fill the GPU, so a second stream would mostly queue behind them; it would
also have to keep each activation alive until its product ran (``record_stream``), giving back
checkpointing's memory saving, and order every accumulator update across streams. Fewer flops
(block triangle, shared input groups, tensor cores, subsampling) cut the cost instead.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointFunction

from weightgeom.hooks import keys
from weightgeom.hooks.base import Instrument
from weightgeom.hooks.distributed import all_reduce_sums
from weightgeom.hooks.geometry import covariance_from_sums
from weightgeom.hooks.gram import Gram, block_upper, symmetric
from weightgeom.hooks.roles import ROLES, WRITE_ROLES, TrackedMatrix, unwrap_model

# State of the token-subsampling generator (``max_tokens``), so that a resumed run draws the same
# token subsets as an uninterrupted one. Not a sum: never reduced across processes.
GENERATOR_KEY = "meta/cov_generator"

# The autograd node that a reentrant checkpoint (torch.utils.checkpoint, use_reentrant=True) leaves in
# the graph; its backward re-runs the block's forward.
_REENTRANT_NODE = CheckpointFunction._backward_cls


@dataclass(frozen=True)
class Kept:
    """The tokens counted in one forward: flat indices into the ``(B*T)`` rows on the activations'
    device (``None``: every token, no gather) and how many (a host int, so counts never sync)."""

    index: Tensor | None
    count: int


@dataclass
class ForwardRecord:
    """One top-level forward: the padding mask it received and the token subsets drawn for it (per
    token shape, shared by every hooked module). ``reentrant``: a hooked module ran without grad
    inside this grad-enabled forward, i.e. under a reentrant checkpoint whose recompute comes later."""

    mask: Tensor | None
    grad_enabled: bool
    kept: dict[tuple[int, ...], Kept] = field(default_factory=dict)
    reentrant: bool = False


@dataclass
class _Duty:
    group: str | None = None  # the input group this module computes C_a for
    outputs: list = field(default_factory=list)  # (role key, fused output rows or None)


class CovarianceInstrument(Instrument):
    """``C_a`` per (layer, input group) and ``C_delta`` per (layer, role), as sums and counts.

    State keys (docs/architecture.md): ``cov_in/L{i}/{g}/{sum_outer,sum,count}`` and
    ``cov_out/L{i}/{r}/{sum_outer,count}``. ``input_roles``: roles whose input group gets a
    ``C_a`` (a group is computed once, at a trainable member); ``output_roles``: roles with ``C_delta``.
    ``gram_precision``: ``"fp32"`` (exact), ``"tf32"`` or ``"bf16"`` (:mod:`weightgeom.hooks.gram`).
    """

    def __init__(self, tracked: list[TrackedMatrix], *, input_roles: tuple[str, ...] = ROLES,
                 output_roles: tuple[str, ...] = WRITE_ROLES, dtype: torch.dtype = torch.float32,
                 max_tokens: int | None = None, seed: int = 0, gram_precision: str = "fp32") -> None:
        super().__init__()
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"instruments.max_tokens must be >= 1 or null, got {max_tokens}")
        if gram_precision != "fp32" and dtype != torch.float32:
            raise ValueError(f"instruments.gram_precision={gram_precision!r} needs instruments.dtype float32 "
                             f"(got {dtype}); use gram_precision fp32 with float64 statistics")
        self.tracked = tracked
        self.input_roles = tuple(input_roles)
        self.output_roles = tuple(output_roles)
        self.dtype = dtype
        self.max_tokens = max_tokens
        self.gram = Gram(gram_precision)
        self.loss_normalizer = 1.0
        self._generator = torch.Generator().manual_seed(seed)  # never the global RNG
        self._duties = self._plan_duties()
        self._warned_no_checkpoint = False
        self._rows_on: dict[tuple[str, torch.device], Tensor] = {}
        self._clear_forwards()
        self.reset()

    # ----- planning: which module computes which statistic -------------------------------------
    def _plan_duties(self) -> dict[nn.Module, _Duty]:
        """Map each hooked module to the input group it represents (first role of the group) and
        the output-side roles it serves (several for a fused QKV module)."""
        duties: dict[nn.Module, _Duty] = defaultdict(_Duty)
        if self.input_roles:
            # The representative must be a module whose output backward reaches: prefer one with
            # trainable parameters (under LoRA on some roles, or in layer 0 where the embedding
            # output needs no grad, a frozen module's output may never be back-propagated).
            reps: dict[str, TrackedMatrix] = {}
            for tm in (t for t in self.tracked if t.role in self.input_roles):
                current = reps.get(tm.group_key)
                if current is None or (not _trainable(current.module) and _trainable(tm.module)):
                    reps[tm.group_key] = tm
            for key, tm in reps.items():
                duties[tm.module].group = key
        for tm in self.tracked:
            if tm.role in self.output_roles:
                duties[tm.module].outputs.append((tm.key, tm.rows))
        return {m: d for m, d in duties.items() if d.group or d.outputs}

    @property
    def group_keys(self) -> list[str]:
        return [d.group for d in self._duties.values() if d.group]

    @property
    def output_keys(self) -> list[str]:
        return [key for d in self._duties.values() for key, _ in d.outputs]

    # ----- hooks ----------------------------------------------------------------------------------
    def attach(self, model: nn.Module, optimizer=None) -> None:
        if self.is_attached:
            raise RuntimeError("CovarianceInstrument is already attached; detach() it first")
        root = unwrap_model(model)
        self._handles.append(root.register_forward_pre_hook(self._begin_forward, with_kwargs=True))
        self._handles.append(root.register_forward_hook(self._end_forward, always_call=True))
        for module, duty in self._duties.items():
            self._handles.append(module.register_forward_hook(partial(self._forward_hook, duty)))

    def detach(self) -> None:
        super().detach()
        self._clear_forwards()

    def _clear_forwards(self) -> None:
        self._open: list[ForwardRecord] = []  # top-level forwards in progress (innermost last)
        # Outside a top-level forward (a checkpoint's recompute during backward, or a submodule called
        # on its own): the record a reentrant checkpoint node announced, else the latest forward's.
        self._replay: ForwardRecord | None = None
        self._latest = ForwardRecord(None, True)

    def _begin_forward(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]
        mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._replay = None  # announced by a checkpoint node of an earlier backward: over
        self._open.append(ForwardRecord(mask, torch.is_grad_enabled()))
        return None

    def _end_forward(self, module, args, output) -> None:
        if not self._open:
            return None
        record = self._latest = self._open.pop()
        if record.reentrant and output is not None:
            self._announce_to_checkpoints(record, output)
        return None

    def _announce_to_checkpoints(self, record: ForwardRecord, output) -> None:
        """Register ``record`` on every reentrant checkpoint node that the forward's outputs depend
        on: a node pre-hook runs right before that node's recompute, in the same thread."""
        stack = [t.grad_fn for t in _tensors(output) if t.grad_fn is not None]
        seen: set = set()
        found = 0
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if isinstance(node, _REENTRANT_NODE):
                node.register_prehook(partial(self._enter_replay, record))
                found += 1
            stack.extend(nxt for nxt, _ in node.next_functions)
        if not found and not self._warned_no_checkpoint and any(t.requires_grad for t in _tensors(output)):
            self._warned_no_checkpoint = True  # once: a model may run frozen parts under no_grad on purpose
            warnings.warn(
                "CovarianceInstrument: tracked modules ran without grad inside a grad-enabled forward, but no "
                "reentrant torch.utils.checkpoint node was found in the output's graph. If another checkpointing "
                "implementation recomputes them during backward, their statistics use the padding mask of the "
                "latest forward, which is wrong when another forward ran in between; use torch's checkpointing "
                "(non-reentrant, the default, or use_reentrant=True).", stacklevel=2)

    def _enter_replay(self, record: ForwardRecord, grad_outputs) -> None:
        self._replay = record
        return None  # a returned value would replace the node's incoming gradients

    def _record(self) -> ForwardRecord:
        if self._open:
            return self._open[-1]
        return self._replay if self._replay is not None else self._latest

    def _kept(self, record: ForwardRecord, token_shape: torch.Size, device: torch.device) -> Kept:
        """Tokens to count for ``token_shape`` in ``record``'s forward, computed once per forward and
        shape. The only host sync: ``nonzero`` of a mask that lives on a GPU."""
        shape = tuple(token_shape)
        if record.mask is not None and shape == (record.mask.numel(),):
            # Tokens flattened to (B*T, d) before the module (Qwen2-MoE's shared expert): the same tokens in
            # the same order, so the same padding mask and subset as the (B, T) modules.
            shape = tuple(record.mask.shape)
        kept = record.kept.get(shape)
        if kept is not None:
            return kept
        n_tokens = torch.Size(shape).numel()
        index = None
        if record.mask is not None and tuple(record.mask.shape) == shape:
            nonpad = record.mask.reshape(-1).nonzero().squeeze(1)
            if nonpad.numel() < n_tokens:  # gather only when something is padding
                index = nonpad
        count = n_tokens if index is None else index.numel()
        if self.max_tokens is not None and count > self.max_tokens:
            pick = torch.randperm(count, generator=self._generator)[: self.max_tokens].sort().values
            pick = _to_device(pick, device if index is None else index.device)
            index = pick if index is None else index[pick]
            count = self.max_tokens
        if index is not None and index.device != device:
            index = _to_device(index, device)
        kept = record.kept[shape] = Kept(index, count)
        return kept

    def _forward_hook(self, duty: _Duty, module: nn.Module, args: tuple, output) -> None:
        if not isinstance(output, torch.Tensor):
            return None
        if not torch.is_grad_enabled():
            record = self._open[-1] if self._open else None
            if record is not None and record.grad_enabled:
                # A reentrant checkpoint's first pass: the statistics come from its recompute. Draw the
                # token subset now, in forward order, so it is the one an unchecked run would draw.
                record.reentrant = True
                self._kept(record, output.shape[:-1], output.device)
            return None  # otherwise a no-grad reference pass: nothing will be back-propagated
        if not output.requires_grad:
            return None  # frozen model up to here
        kept = self._kept(self._record(), output.shape[:-1], output.device)
        pending = None
        if duty.group:
            # Computed now, not at backward: holding the (n x n) blocks instead of the activation
            # keeps gradient checkpointing's memory saving.
            with _no_autocast(output.device):
                a = _rows(args[0].detach(), kept.index).to(self.dtype)  # no copy when already fp32
                pending = (self.gram.blocks(a), a.sum(0), kept.count)
        group, outputs = duty.group, duty.outputs

        def on_grad(grad: torch.Tensor) -> None:
            if pending is not None:
                self._add_input(group, *pending)
            if outputs:
                with _no_autocast(grad.device):
                    g = _rows(grad.detach(), kept.index)
                    for key, rows in outputs:
                        d = g if rows is None else g.index_select(1, self._rows_device(key, rows, g.device))
                        # Scaled before squaring (not c^2 on the GEMM): unscaled per-token deltas are ~1/N
                        # small and their squares could reach fp32 subnormals (slow and inexact).
                        c = self.loss_normalizer
                        d = d * c if d.dtype == self.dtype else d.to(self.dtype).mul_(c)
                        self._add_output(key, d, kept.count)
            return None  # a returned tensor would replace the gradient

        output.register_hook(on_grad)
        return None  # a returned value would replace the module's output

    def _rows_device(self, key: str, rows: Tensor, device: torch.device) -> Tensor:
        """A fused module's output rows on ``device``, copied once (not per backward)."""
        cached = self._rows_on.get((key, device))
        if cached is None:
            cached = self._rows_on[(key, device)] = rows.to(device)
        return cached

    def _add_input(self, key: str, blocks: list, total: torch.Tensor, count: int) -> None:
        if key not in self.sums_in:
            n = total.shape[0]
            self.sums_in[key] = [total.new_zeros(n, n), torch.zeros_like(total), 0]
        s = self.sums_in[key]
        for (r0, r1), block in blocks:
            s[0][r0:r1, r0:].add_(block)
        s[1] += total
        s[2] += count

    def _add_output(self, key: str, d: torch.Tensor, count: int) -> None:
        if key not in self.sums_out:
            self.sums_out[key] = [d.new_zeros(d.shape[1], d.shape[1]), 0]
        s = self.sums_out[key]
        self.gram.accumulate(s[0], d)
        s[1] += count

    # ----- results --------------------------------------------------------------------------------
    def covariance_in(self, key: str, centered: bool = False, state: dict | None = None) -> torch.Tensor:
        """``C_a`` of input group ``key`` (e.g. ``"L0/attn_in"``), float64, uncentered by default."""
        state = state if state is not None else self.state_dict()
        return covariance_from_sums(state[keys.state_key(keys.COV_IN, key, "sum_outer")],
                                    state[keys.state_key(keys.COV_IN, key, "sum")],
                                    state[keys.state_key(keys.COV_IN, key, "count")], centered=centered)

    def covariance_out(self, key: str, state: dict | None = None) -> torch.Tensor:
        """``C_delta`` of role ``key`` (e.g. ``"L0/o"``), float64."""
        state = state if state is not None else self.state_dict()
        return covariance_from_sums(state[keys.state_key(keys.COV_OUT, key, "sum_outer")], None,
                                    state[keys.state_key(keys.COV_OUT, key, "count")])

    def global_sums(self, side: str, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum of outer products in its upper block triangle (gram.block_upper layout), count)`` of
        ``C_a`` (side ``"in"``) or ``C_delta`` (``"out"``) of one key, summed over processes (a collective
        per call: every process asks for the same keys in the same order; a copy then, the live
        accumulator itself under one process: never write to it)."""
        outer, count = (self.sums_in[key][0], self.sums_in[key][2]) if side == "in" else self.sums_out[key]
        sums = all_reduce_sums({"outer": outer, "count": _count(count, outer.device)})
        return sums["outer"], sums["count"]

    def global_covariance(self, side: str, key: str) -> torch.Tensor:
        """``C_a`` (side ``"in"``) or ``C_delta`` (``"out"``) of one key, float64, uncentered, summed over
        processes (a collective). One matrix at a time: a metric computation never holds every covariance twice."""
        outer, count = self.global_sums(side, key)
        return covariance_from_sums(symmetric(outer), None, count)

    def global_state(self) -> dict[str, torch.Tensor]:
        """State with the sums and counts summed over processes (identity without torch.distributed)."""
        state = self.state_dict()
        sums = {k: v for k, v in state.items() if keys.family(k) in (keys.COV_IN, keys.COV_OUT)}
        return {**state, **all_reduce_sums(sums)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Counts are float64 scalars on their sums' device (so a GPU all-reduce can sum them too)."""
        state = {}
        for key, (outer, total, count) in self.sums_in.items():
            state[keys.state_key(keys.COV_IN, key, "sum_outer")] = symmetric(outer)
            state[keys.state_key(keys.COV_IN, key, "sum")] = total.clone()
            state[keys.state_key(keys.COV_IN, key, "count")] = _count(count, outer.device)
        for key, (outer, count) in self.sums_out.items():
            state[keys.state_key(keys.COV_OUT, key, "sum_outer")] = symmetric(outer)
            state[keys.state_key(keys.COV_OUT, key, "count")] = _count(count, outer.device)
        state[GENERATOR_KEY] = self._generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.reset()
        if GENERATOR_KEY in state:
            self._generator.set_state(state[GENERATOR_KEY].to(torch.uint8).cpu().clone())
        for name, value in state.items():
            parsed = keys.parse_state_key(name)
            if parsed is None or parsed[3] != "sum_outer":
                continue
            family, layer, group, _ = parsed
            key = keys.matrix_key(layer, group)
            if family == keys.COV_IN:
                self.sums_in[key] = [block_upper(value.to(self.dtype).clone()),
                                     state[keys.state_key(keys.COV_IN, key, "sum")].to(self.dtype).clone(),
                                     int(state[keys.state_key(keys.COV_IN, key, "count")].item())]
            elif family == keys.COV_OUT:
                self.sums_out[key] = [block_upper(value.to(self.dtype).clone()),
                                      int(state[keys.state_key(keys.COV_OUT, key, "count")].item())]

    def reset(self) -> None:
        self.sums_in: dict[str, list] = {}
        self.sums_out: dict[str, list] = {}


def _count(count: int, device: torch.device) -> torch.Tensor:
    """A token count as a float64 scalar beside its sums (so a GPU all-reduce can sum it too)."""
    return torch.tensor(float(count), dtype=torch.float64, device=device)


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _rows(x: Tensor, index: Tensor | None) -> Tensor:
    """``x`` (..., n) as (tokens, n), restricted to ``index`` (a gather) when one is given."""
    x = x.reshape(-1, x.shape[-1])
    return x if index is None else x.index_select(0, index)


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """A CPU tensor on ``device`` without a host sync: CUDA copies go from pinned memory, async."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _no_autocast(device: torch.device):
    """Autocast off for the statistics' own matmuls (they must stay in the accumulation dtype);
    nothing to enter when autocast is off already, the common case outside a forward."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _tensors(output, depth: int = 0) -> list[Tensor]:
    """The tensors in a module's output (a tensor, tuple/list, dict or transformers ModelOutput)."""
    if isinstance(output, Tensor):
        return [output]
    if depth > 3:
        return []
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _tensors(item, depth + 1)]
    return []
