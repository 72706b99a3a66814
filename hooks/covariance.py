"""Input-activation and upstream-gradient covariances of linear layers, accumulated live.

For a linear map ``y = W a`` the weight gradient is ``dL/dW = sum_t delta_t a_t^T`` with
``delta_t = dL/dy_t``. This instrument accumulates the two factors' second moments (K-FAC's A and
G):

    C_a     = (1/N) sum_t a_t a_t^T            (n x n, one per *input group*: q/k/v share one)
    C_delta = (1/N) sum_t delta_t delta_t^T    (m x m, one per role on the output side)

How the hooks count (each point is a measured pitfall, see DESIGN.md section 3):

* A forward hook on the module computes the pending input sums eagerly and registers a tensor hook
  on the module's output. Only when that tensor hook fires, i.e. when backward actually flows
  through this forward, are the sums committed. A no-grad reference forward (DPO) registers
  nothing; a gradient-checkpointing recompute registers a hook whose graph is never
  back-propagated (non-reentrant), or the original forward ran without grad (reentrant): either
  way each token is counted once per backward, never per forward.
* Padding is excluded with the ``attention_mask`` that the model's top-level forward received
  (captured by a pre-hook), and the same kept-token index is used for ``a`` and ``delta``.
* ``delta`` is multiplied by ``loss_normalizer`` (set by the trainer before backward): a loss that
  is a mean over N tokens scales every per-token gradient by 1/N; undoing that makes ``C_delta``
  comparable across objectives and batch sizes.
* Statistics are accumulated in ``dtype`` (fp32 by default, fp64 optional) with autocast disabled,
  whatever the model's dtype.

Cost (what keeps full-rate statistics cheap; ``benchmarks/bench_instruments.py`` measures it):
one ``n x n`` Gram matrix over the kept tokens per input group (shared by the roles that read the
same tensor) and one ``m x m`` per output-side role. A Gram matrix is symmetric, so only its upper
block triangle is computed (:func:`_gram_blocks`, about 0.6x the flops of ``a.T @ a``) and the
accumulators hold the upper triangle; :meth:`state_dict` mirrors it. Without padding no token is
gathered (no ``index_select`` copy); fp32 inputs are not copied; ``C_delta`` is accumulated in
place (``addmm_``). Measured on 2 CPU cores (default tiny llama, batch 16 x 128), these GEMMs are
nearly all of the instruments' cost, and ``down_in`` (``d_ff x d_ff``) is most of that. Scales as
``N n^2``: on wide models use ``max_tokens`` (a seeded random subset of tokens per forward; the
estimate stays unbiased).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from hooks.base import Instrument
from hooks.distributed import all_reduce_sums
from hooks.geometry import covariance_from_sums
from hooks.roles import ROLES, WRITE_ROLES, TrackedMatrix, unwrap_model

# State of the token-subsampling generator (``max_tokens``), so that a resumed run draws the same
# token subsets as an uninterrupted one. Not a sum: never reduced across processes.
GENERATOR_KEY = "meta/cov_generator"


class CovarianceInstrument(Instrument):
    """``C_a`` per (layer, input group) and ``C_delta`` per (layer, role), as sums and counts.

    State keys (docs/architecture.md): ``cov_in/L{i}/{g}/{sum_outer,sum,count}`` and
    ``cov_out/L{i}/{r}/{sum_outer,count}``. ``input_roles``: roles whose input group gets a
    ``C_a`` (a group is computed once, at a trainable member); ``output_roles``: roles with ``C_delta``.
    """

    def __init__(self, tracked: list[TrackedMatrix], *, input_roles: tuple[str, ...] = ROLES,
                 output_roles: tuple[str, ...] = WRITE_ROLES, dtype: torch.dtype = torch.float32,
                 max_tokens: int | None = None, seed: int = 0) -> None:
        super().__init__()
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"instruments.max_tokens must be >= 1 or null, got {max_tokens}")
        self.tracked = tracked
        self.input_roles = tuple(input_roles)
        self.output_roles = tuple(output_roles)
        self.dtype = dtype
        self.max_tokens = max_tokens
        self.loss_normalizer = 1.0
        self._generator = torch.Generator().manual_seed(seed)  # never the global RNG
        self._mask: torch.Tensor | None = None
        self._keep_cache: tuple | None = None
        self._duties = self._plan_duties()
        self.reset()

    # ----- planning: which module computes which statistic -------------------------------------
    def _plan_duties(self) -> dict[nn.Module, dict]:
        """Map each hooked module to the input group it represents (first role of the group) and
        the output-side roles it serves (several for a fused QKV module)."""
        duties: dict[nn.Module, dict] = defaultdict(lambda: {"group": None, "outputs": []})
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
                duties[tm.module]["group"] = key
        for tm in self.tracked:
            if tm.role in self.output_roles:
                duties[tm.module]["outputs"].append((tm.key, tm.rows))
        return {m: d for m, d in duties.items() if d["group"] or d["outputs"]}

    @property
    def group_keys(self) -> list[str]:
        return [d["group"] for d in self._duties.values() if d["group"]]

    @property
    def output_keys(self) -> list[str]:
        return [key for d in self._duties.values() for key, _ in d["outputs"]]

    # ----- hooks ----------------------------------------------------------------------------------
    def attach(self, model: nn.Module, optimizer=None) -> None:
        if self.is_attached:
            raise RuntimeError("CovarianceInstrument is already attached; detach() it first")
        root = unwrap_model(model)
        self._handles.append(root.register_forward_pre_hook(self._capture_mask, with_kwargs=True))
        for module in self._duties:
            self._handles.append(module.register_forward_hook(self._forward_hook))

    def detach(self) -> None:
        super().detach()
        self._mask, self._keep_cache = None, None

    def _capture_mask(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._keep_cache = None
        return None

    def _kept_tokens(self, token_shape: torch.Size, device: torch.device) -> torch.Tensor | None:
        """Flat indices of the tokens to count (None = all), shared by every module in one forward."""
        if self._keep_cache is not None and self._keep_cache[0] == token_shape:
            return self._keep_cache[1]
        keep = None
        if self._mask is not None and tuple(self._mask.shape) == tuple(token_shape) and not bool(self._mask.all()):
            keep = self._mask.reshape(-1).nonzero().squeeze(1)  # gather only when something is padding
        n_tokens = int(torch.Size(token_shape).numel()) if keep is None else keep.numel()
        if self.max_tokens is not None and n_tokens > self.max_tokens:
            pick = torch.randperm(n_tokens, generator=self._generator)[: self.max_tokens].sort().values
            keep = pick if keep is None else keep.cpu()[pick]
        if keep is not None:
            keep = keep.to(device)
        self._keep_cache = (token_shape, keep)
        return keep

    def _rows(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        x = x.reshape(-1, x.shape[-1])
        return x if keep is None else x.index_select(0, keep)

    def _forward_hook(self, module: nn.Module, args: tuple, output) -> None:
        if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return None  # no-grad reference pass, or frozen model: nothing will be back-propagated
        duty = self._duties[module]
        keep = self._kept_tokens(output.shape[:-1], output.device)
        pending = None
        if duty["group"]:
            # Computed now, not at backward: holding the (n x n) blocks instead of the activation
            # keeps gradient checkpointing's memory saving.
            with torch.autocast(device_type=output.device.type, enabled=False):
                a = self._rows(args[0].detach(), keep).to(self.dtype)  # no copy when already fp32
                pending = (_gram_blocks(a), a.sum(0), a.shape[0])
        group, outputs = duty["group"], duty["outputs"]

        def on_grad(grad: torch.Tensor) -> None:
            if pending is not None:
                self._add_input(group, *pending)
            for key, rows in outputs:
                d = self._rows(grad.detach(), keep)
                if rows is not None:
                    d = d.index_select(1, rows.to(d.device))
                # Scaled before squaring (not c^2 on the GEMM): unscaled per-token deltas are ~1/N
                # small and their squares could reach fp32 subnormals (slow and inexact).
                d = d.to(self.dtype) * self.loss_normalizer
                self._add_output(key, d, d.shape[0])
            return None  # a returned tensor would replace the gradient

        output.register_hook(on_grad)
        return None  # a returned value would replace the module's output

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
        _gram_into(s[0], d)
        s[1] += count

    # ----- results --------------------------------------------------------------------------------
    def covariance_in(self, key: str, centered: bool = False, state: dict | None = None) -> torch.Tensor:
        """``C_a`` of input group ``key`` (e.g. ``"L0/attn_in"``), float64, uncentered by default."""
        state = state if state is not None else self.state_dict()
        return covariance_from_sums(state[f"cov_in/{key}/sum_outer"], state[f"cov_in/{key}/sum"],
                                    state[f"cov_in/{key}/count"], centered=centered)

    def covariance_out(self, key: str, state: dict | None = None) -> torch.Tensor:
        """``C_delta`` of role ``key`` (e.g. ``"L0/o"``), float64."""
        state = state if state is not None else self.state_dict()
        return covariance_from_sums(state[f"cov_out/{key}/sum_outer"], None, state[f"cov_out/{key}/count"])

    def global_state(self) -> dict[str, torch.Tensor]:
        """State with the sums and counts summed over processes (identity without torch.distributed)."""
        state = self.state_dict()
        sums = {k: v for k, v in state.items() if k.startswith(("cov_in/", "cov_out/"))}
        return {**state, **all_reduce_sums(sums)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for key, (outer, total, count) in self.sums_in.items():
            state[f"cov_in/{key}/sum_outer"] = _symmetric(outer)
            state[f"cov_in/{key}/sum"] = total.clone()
            state[f"cov_in/{key}/count"] = torch.tensor(float(count), dtype=torch.float64)
        for key, (outer, count) in self.sums_out.items():
            state[f"cov_out/{key}/sum_outer"] = _symmetric(outer)
            state[f"cov_out/{key}/count"] = torch.tensor(float(count), dtype=torch.float64)
        state[GENERATOR_KEY] = self._generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.reset()
        if GENERATOR_KEY in state:
            self._generator.set_state(state[GENERATOR_KEY].to(torch.uint8).cpu().clone())
        for name, value in state.items():
            parts = name.split("/")
            if parts[0] == "cov_in" and parts[-1] == "sum_outer":
                key = "/".join(parts[1:-1])
                self.sums_in[key] = [value.to(self.dtype).clone(),
                                     state[f"cov_in/{key}/sum"].to(self.dtype).clone(),
                                     int(state[f"cov_in/{key}/count"].item())]
            elif parts[0] == "cov_out" and parts[-1] == "sum_outer":
                key = "/".join(parts[1:-1])
                self.sums_out[key] = [value.to(self.dtype).clone(), int(state[f"cov_out/{key}/count"].item())]

    def reset(self) -> None:
        self.sums_in: dict[str, list] = {}
        self.sums_out: dict[str, list] = {}


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


# ----- symmetric Gram matrices: only the upper block triangle is computed and accumulated -------------
def _gram_bounds(n: int) -> list[tuple[int, int]]:
    """Column blocks for a Gram matrix of width ``n``: up to 4 blocks of >= 64 columns. Computing
    the blocks on and above the diagonal costs ``(b + 1) / (2 b)`` of the full product; more, thinner
    blocks save flops but lose GEMM efficiency (measured on CPU, n = 128 ... 1024)."""
    b = max(1, min(4, n // 64))
    edges = [round(i * n / b) for i in range(b + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _gram_blocks(a: torch.Tensor) -> list[tuple[tuple[int, int], torch.Tensor]]:
    """Upper block rows of ``a^T a`` for ``a`` (N, n): ``[((r0, r1), a[:, r0:r1]^T a[:, r0:])]``.
    The lower triangle of each diagonal block is computed too but never read."""
    return [((r0, r1), a[:, r0:r1].T @ a[:, r0:]) for r0, r1 in _gram_bounds(a.shape[1])]


def _gram_into(acc: torch.Tensor, d: torch.Tensor) -> None:
    """``acc += d^T d`` on the upper block triangle, in place (no temporary)."""
    for r0, r1 in _gram_bounds(d.shape[1]):
        acc[r0:r1, r0:].addmm_(d[:, r0:r1].T, d[:, r0:])


def _symmetric(upper: torch.Tensor) -> torch.Tensor:
    """The full symmetric matrix whose upper triangle (diagonal included) is ``upper``'s; anything
    below the diagonal is ignored. A new tensor."""
    return torch.triu(upper) + torch.triu(upper, 1).T
