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

Cost: one ``n x n`` GEMM over the kept tokens per input group (shared by the roles that read the
same tensor) and one ``m x m`` GEMM per output-side role. Scales as ``N n^2``: on wide models use
``max_tokens`` (a seeded random subset of tokens per forward; the estimate stays unbiased).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from hooks.base import Instrument
from hooks.distributed import all_reduce_sums
from hooks.roles import TrackedMatrix, WRITE_ROLES, unwrap_model
from hooks.schedule import Schedule


class CovarianceInstrument(Instrument):
    """``C_a`` per (layer, input group) and ``C_delta`` per (layer, role), as sums and counts.

    State keys (docs/architecture.md): ``cov_in/L{i}/{g}/{sum_outer,sum,count}`` and
    ``cov_out/L{i}/{r}/{sum_outer,count}``.
    """

    name = "covariance"

    def __init__(self, tracked: list[TrackedMatrix], *, input_side: bool = True,
                 output_roles: tuple[str, ...] = WRITE_ROLES, dtype: torch.dtype = torch.float32,
                 max_tokens: int | None = None, seed: int = 0, schedule: Schedule | None = None) -> None:
        super().__init__(schedule)
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"instruments.max_tokens must be >= 1 or null, got {max_tokens}")
        self.tracked = tracked
        self.input_side = input_side
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
        seen_groups = set()
        for tm in self.tracked:
            if self.input_side and tm.group_key not in seen_groups:
                seen_groups.add(tm.group_key)
                duties[tm.module]["group"] = tm.group_key
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
        if self.attached:
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
        if self._mask is not None and tuple(self._mask.shape) == tuple(token_shape):
            keep = self._mask.reshape(-1).nonzero().squeeze(1)
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
            with torch.autocast(device_type=output.device.type, enabled=False):
                a = self._rows(args[0].detach(), keep).to(self.dtype)
                pending = (a.T @ a, a.sum(0), a.shape[0])
        group, outputs = duty["group"], duty["outputs"]

        def on_grad(grad: torch.Tensor) -> None:
            if pending is not None:
                self._add_input(group, *pending)
            for key, rows in outputs:
                d = self._rows(grad.detach(), keep)
                if rows is not None:
                    d = d.index_select(1, rows.to(d.device))
                d = d.to(self.dtype) * self.loss_normalizer
                self._add_output(key, d.T @ d, d.shape[0])
            return None  # a returned tensor would replace the gradient

        output.register_hook(on_grad)
        return None  # a returned value would replace the module's output

    def _add_input(self, key: str, outer: torch.Tensor, total: torch.Tensor, count: int) -> None:
        if key not in self.sums_in:
            self.sums_in[key] = [torch.zeros_like(outer), torch.zeros_like(total), 0]
        s = self.sums_in[key]
        s[0] += outer
        s[1] += total
        s[2] += count
        self.version += 1

    def _add_output(self, key: str, outer: torch.Tensor, count: int) -> None:
        if key not in self.sums_out:
            self.sums_out[key] = [torch.zeros_like(outer), 0]
        s = self.sums_out[key]
        s[0] += outer
        s[1] += count
        self.version += 1

    # ----- results --------------------------------------------------------------------------------
    def covariance_in(self, key: str, centered: bool = False, state: dict | None = None) -> torch.Tensor:
        """``C_a`` of input group ``key`` (e.g. ``"L0/attn_in"``), float64, uncentered by default."""
        state = state if state is not None else self.state_dict()
        outer = state[f"cov_in/{key}/sum_outer"].double()
        count = float(state[f"cov_in/{key}/count"])
        if count == 0:
            return torch.zeros_like(outer)
        c = outer / count
        if centered:
            mean = state[f"cov_in/{key}/sum"].double() / count
            c = c - torch.outer(mean, mean)
        return c

    def covariance_out(self, key: str, state: dict | None = None) -> torch.Tensor:
        """``C_delta`` of role ``key`` (e.g. ``"L0/o"``), float64."""
        state = state if state is not None else self.state_dict()
        outer = state[f"cov_out/{key}/sum_outer"].double()
        count = float(state[f"cov_out/{key}/count"])
        return outer / count if count else torch.zeros_like(outer)

    def global_state(self) -> dict[str, torch.Tensor]:
        """State summed over processes (identity without torch.distributed)."""
        return all_reduce_sums(self.state_dict())

    def compute(self, step: int) -> dict[str, float]:
        from harness.geometry import spikiness, sym_eigh  # noqa: PLC0415 (pure math, torch only)

        state = self.global_state()
        out: dict[str, float] = {}
        for key in self.sums_in:
            evals, _ = sym_eigh(self.covariance_in(key, state=state))
            out.update({f"spike_in/{key}/{k}": v for k, v in spikiness(evals, 8).items()})
        for key in self.sums_out:
            evals, _ = sym_eigh(self.covariance_out(key, state=state))
            out.update({f"spike_out/{key}/{k}": v for k, v in spikiness(evals, 8).items()})
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for key, (outer, total, count) in self.sums_in.items():
            state[f"cov_in/{key}/sum_outer"] = outer.clone()
            state[f"cov_in/{key}/sum"] = total.clone()
            state[f"cov_in/{key}/count"] = torch.tensor(float(count), dtype=torch.float64)
        for key, (outer, count) in self.sums_out.items():
            state[f"cov_out/{key}/sum_outer"] = outer.clone()
            state[f"cov_out/{key}/count"] = torch.tensor(float(count), dtype=torch.float64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.reset()
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
        self.version = 0
