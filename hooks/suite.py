"""The one object trainers talk to: covariance + update instruments and the metrics they stream.

Both classes here implement :class:`weightgeom.hooks.protocol.Suite` (the call order a trainer
follows is in that module)::

    suite = InstrumentSuite(model, k=8, every_n=10)
    with suite.attached(model, optimizer):        # hooks removed on exit, also on error
        for step in range(1, steps + 1):
            suite.set_loss_normalizer(n_loss_tokens)  # before backward
            loss.backward(); optimizer.step()         # optimizer hooks record G_t and U_t
            metrics = suite.after_optimizer_step(step, force=step == steps)  # dict when due, else None

``NullSuite`` has the same interface and measures nothing (``instruments.enabled: false``), so a
trainer never branches on whether instruments are on. Metric names: docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from torch import nn

from weightgeom.hooks import geometry as geo
from weightgeom.hooks import keys
from weightgeom.hooks.covariance import CovarianceInstrument
from weightgeom.hooks.distributed import rank, world_size
from weightgeom.hooks.gram import GRAM_PRECISIONS
from weightgeom.hooks.measurement import Measurement, Values
from weightgeom.hooks.protocol import Suite
from weightgeom.hooks.quantities import DEFAULT_QUANTITIES, Quantity
from weightgeom.hooks.roles import (
    DEFAULT_INPUT_ROLES,
    ROLES,
    WRITE_ROLES,
    ArchSpec,
    arch_spec_for,
    has_unembedding,
    resolve_tracked,
    unembedding,
    untracked_modules,
    unwrap_model,
)
from weightgeom.hooks.schedule import Schedule
from weightgeom.hooks.updates import UpdateInstrument

# Present in a snapshot whose cov_* sums were summed over this many processes (see load_state_dict).
REDUCED_KEY = "meta/cov_reduced_over"
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class SuiteConfig:
    """What the instruments measure and when (the recipe's ``instruments:`` section).

    ``roles``: matrices whose weight deltas are tracked; ``input_roles``: roles whose input-side
    ``C_a`` (and so ``rsf_in``) is measured, by default the read pathway q, k and its comparisons
    v, gate, up (add ``o`` / ``down`` for their input side; ``down`` reads the d_ff-wide tensor, the
    costliest covariance); ``output_roles``: roles with ``C_delta`` (the write pathway).
    ``k``: subspace dimension of the streamed RSF (capped at each matrix's dim - 1); ``k_curve``: the
    k values of the reports' RSF-vs-k curves. ``every_n`` / ``log_spaced``: the metric schedule.
    ``zscores``: exact z-scores of each RSF against random k-subspaces (closed form, cheap).
    ``max_tokens``: per-forward token subsample for the covariances (None: every token, exact).
    ``dtype``: accumulation dtype. ``metric_dtype``: dtype of the metric computation. float32 is
    2-4x faster than float64 (on GPUs float64 eigendecompositions are slower still) and its error is far
    below the statistics' own sampling error: relative RSF within 1e-5 of float64, every other metric
    within 1e-3 (tests/hooks/test_suite.py), while C_a estimated on two halves of one batch differs by
    0.5-1.7 relative (benchmarks/README.md).
    ``gram_precision``: how the covariances' products are formed: ``fp32`` (exact, the default),
    ``tf32`` or ``bf16`` (tensor cores on CUDA, fp32 sums; ``hooks/gram.py`` states their error).
    """

    enabled: bool = True
    roles: list[str] = field(default_factory=lambda: list(ROLES))
    layers: list[int] | None = None
    input_roles: list[str] = field(default_factory=lambda: list(DEFAULT_INPUT_ROLES))
    output_roles: list[str] = field(default_factory=lambda: list(WRITE_ROLES))
    k: int = 8
    k_curve: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    every_n: int = 20
    log_spaced: bool = True
    zscores: bool = True
    max_tokens: int | None = None
    dtype: Literal["float32", "float64"] = "float32"
    metric_dtype: Literal["float32", "float64"] = "float32"
    gram_precision: Literal["fp32", "tf32", "bf16"] = "fp32"

    def __post_init__(self) -> None:
        for name in ("roles", "input_roles", "output_roles"):
            bad = [r for r in getattr(self, name) if r not in ROLES]
            if bad:
                raise ValueError(f"instruments.{name} has unknown roles {bad}; valid roles: {list(ROLES)}")
        for name in ("k", "every_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"instruments.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"instruments.max_tokens must be >= 1 or null, got {self.max_tokens}")
        if any(k < 1 for k in self.k_curve):
            raise ValueError(f"instruments.k_curve values must be >= 1, got {self.k_curve}")
        if self.dtype not in DTYPES:
            raise ValueError(f"instruments.dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.metric_dtype not in DTYPES:
            raise ValueError(f"instruments.metric_dtype must be float32 or float64, got {self.metric_dtype!r}")
        if self.gram_precision not in GRAM_PRECISIONS:
            raise ValueError(f"instruments.gram_precision must be one of {list(GRAM_PRECISIONS)}, "
                             f"got {self.gram_precision!r}")
        if self.gram_precision != "fp32" and self.dtype != "float32":
            raise ValueError(f"instruments.gram_precision={self.gram_precision!r} rounds the products below "
                             "float64; set instruments.dtype float32, or keep gram_precision fp32")


class InstrumentSuite:
    """Covariances (``C_a`` per input group, ``C_delta`` per output role), weight updates, and the
    metric quantities computed from them on a schedule.

    Build with a :class:`SuiteConfig` or its fields as keywords
    (``InstrumentSuite(model, k=4, every_n=10)``); ``quantities`` replaces the default metric set
    (``weightgeom.hooks.quantities.DEFAULT_QUANTITIES``). Build it after any wrapping that replaces modules
    (PEFT): :meth:`attach` refuses a model whose tracked modules changed.
    """

    def __init__(self, model: nn.Module, config: SuiteConfig | None = None, *, seed: int = 0,
                 arch: ArchSpec | str | None = None, quantities: tuple[Quantity, ...] | None = None,
                 **options) -> None:
        if isinstance(options.get("dtype"), torch.dtype):
            options["dtype"] = str(options["dtype"]).removeprefix("torch.")
        for name in ("roles", "input_roles", "output_roles"):
            if name in options:
                options[name] = list(options[name])
        self.config = dataclasses.replace(config or SuiteConfig(), **options)
        c = self.config
        self.model, self.arch, self.seed = model, arch, seed
        self.k = c.k
        self.input_roles = tuple(c.input_roles)
        self.schedule = Schedule(every_n=c.every_n, log_spaced=c.log_spaced)
        self.quantities = tuple(quantities) if quantities is not None else DEFAULT_QUANTITIES
        self.tracked = resolve_tracked(model, c.roles, arch, c.layers)
        if not self.tracked:
            raise ValueError(f"instruments.roles {list(c.roles)} matched no matrix in this model")
        self.cov = CovarianceInstrument(self.tracked, input_roles=tuple(c.input_roles),
                                        output_roles=tuple(c.output_roles), dtype=DTYPES[c.dtype],
                                        max_tokens=c.max_tokens, seed=seed, gram_precision=c.gram_precision)
        self.upd = UpdateInstrument(self.tracked)
        self.frozen: dict[str, torch.Tensor] = {}
        self._has_unembedding = has_unembedding(model, arch)
        self._untracked = untracked_modules(model, arch)

    @property
    def skipped(self) -> list[str]:
        """What this model's instruments cannot measure, one human-readable line each (empty when
        nothing is skipped), for a caller to print once: a reward model's missing prediction subspace,
        weights no role covers (a mixture-of-experts layer's experts and router)."""
        out = []
        if not self._has_unembedding:
            head = arch_spec_for(self.model, self.arch).unembed
            out.append(f"no prediction subspace: {type(unwrap_model(self.model)).__name__} has no unembedding "
                       f"({head!r}), so rsf_out_pred*, z_out_pred* and gap_pred are not computed and snapshots "
                       "hold no pred/W_U")
        if self._untracked:
            out.append("not tracked (no role covers them): " + "; ".join(self._untracked))
        return out

    # ----- lifecycle ------------------------------------------------------------------------------
    def attach(self, model: nn.Module | None = None, optimizer=None) -> None:
        model = model if model is not None else self.model
        self._check_modules(model)
        self.cov.attach(model, optimizer)
        self.upd.attach(model, optimizer)

    def _check_modules(self, model: nn.Module) -> None:
        """The tracked modules must still be the model's: wrapping after construction (PEFT's
        ``get_peft_model``, TRL's ``peft_config``) replaces them, and hooks on the old ones would
        silently see a frozen base layer."""
        current = {tm.key: tm.module for tm in resolve_tracked(model, self.config.roles, self.arch, self.config.layers)}
        stale = [tm.key for tm in self.tracked if current.get(tm.key) is not tm.module]
        if stale:
            raise RuntimeError(f"the model's modules changed after the InstrumentSuite was built ({stale[:3]}...): "
                               "build the suite after wrapping the model (e.g. after peft.get_peft_model), "
                               "and wrap before handing the model to TRL instead of passing peft_config")

    def detach(self) -> None:
        self.cov.detach()
        self.upd.detach()

    @contextlib.contextmanager
    def attached(self, model: nn.Module | None = None, optimizer=None):
        try:
            self.attach(model, optimizer)
            yield self
        finally:
            self.detach()

    def set_loss_normalizer(self, n: float) -> None:
        """The number the loss was divided by (tokens for a token-mean CE, pairs for a pair-mean
        preference loss, times the accumulation steps it was further divided by)."""
        self.cov.loss_normalizer = float(n)

    def before_optimizer_step(self) -> None:
        """For trainers whose optimizer the suite could not hook (called before ``optimizer.step()``)."""
        if not self.upd.driven_by_optimizer:
            self.upd.before_step()

    def after_optimizer_step(self, step: int, force: bool = False) -> dict[str, float] | None:
        """Bookkeeping after ``optimizer.step()``; the metrics when the schedule fires at ``step``
        (or ``force``, e.g. at a phase's last step), else None."""
        if not self.upd.driven_by_optimizer:
            self.upd.after_step()
        if not self.frozen and self.upd.steps >= 1:
            self._freeze_subspaces()
        if force or self.schedule(step):
            return self.compute(step)
        return None

    # ----- divergence guard (trainers/guard.py) ------------------------------------------------------
    def statistics_finite(self) -> torch.Tensor | None:
        """A 0-d bool tensor on the statistics' device, without a host sync: every covariance sum is
        finite (None when nothing is accumulated). ``nonfinite_statistics`` names the offenders."""
        sums = [t for s in self.cov.sums_in.values() for t in s[:2]] + [s[0] for s in self.cov.sums_out.values()]
        return torch.stack([torch.isfinite(t).all() for t in sums]).all() if sums else None

    def nonfinite_statistics(self) -> list[str]:
        """Keys of the covariance sums holding NaN or inf (empty when all are finite). One pass over
        the accumulators, ``n^2`` per sum: about 1/N of a step's accumulation for N tokens."""
        sums = {keys.at(keys.COV_IN, k): s[:2] for k, s in self.cov.sums_in.items()}
        sums.update({keys.at(keys.COV_OUT, k): s[:1] for k, s in self.cov.sums_out.items()})
        if not sums:
            return []
        ok = torch.stack([torch.isfinite(t).all() for ts in sums.values() for t in ts]).tolist()
        flags = iter(ok)
        return [k for k, ts in sums.items() if not all([next(flags) for _ in ts])]

    def covariance_state(self) -> dict[str, torch.Tensor]:
        """A copy of this process's covariance sums, for :meth:`restore_covariance` (a skipped step)."""
        return self.cov.state_dict()

    def restore_covariance(self, state: dict[str, torch.Tensor]) -> None:
        self.cov.load_state_dict(state)

    # ----- metrics --------------------------------------------------------------------------------
    def _freeze_subspaces(self) -> None:
        """Top-k bases of the covariances after the phase's first optimizer step."""
        state = self.cov.global_state()
        for key in self.cov.sums_in:
            C = self.cov.covariance_in(key, state=state)
            self.frozen[keys.at(keys.FROZEN_IN, key)] = geo.top_eigvecs(C, min(self.k, C.shape[0] - 1))[0]

    def compute(self, step: int) -> dict[str, float]:
        """Every quantity's metrics now (a collective under torch.distributed: call it on every rank)."""
        m = Measurement(step=step, k=self.k, zscores=self.config.zscores, dtype=DTYPES[self.config.metric_dtype],
                        cov=self.cov, upd=self.upd, tracked=self.tracked, input_roles=self.input_roles,
                        frozen=self.frozen, model=self.model, arch=self.arch)
        values = Values()
        for quantity in self.quantities:
            values.extend(quantity.compute(m))
        out = values.to_dict()  # the one host synchronisation of this computation
        out.update(keys.layer_means(out))
        return out

    # ----- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {**self.cov.state_dict(), **self.upd.state_dict()}
        state.update({k: v.clone() for k, v in self.frozen.items()})
        if self._has_unembedding:
            W_U, gain, _ = unembedding(self.model, self.arch)
            state[keys.W_U] = W_U
            if gain is not None:
                state[keys.GAIN] = gain
        return state

    def snapshot_state(self) -> dict[str, torch.Tensor]:
        """State for reports and checkpoints: covariances summed over processes (a collective: every
        rank calls it), marked with :data:`REDUCED_KEY`."""
        state = self.state_dict()
        state.update(self.cov.global_state())
        state[REDUCED_KEY] = torch.tensor(world_size(), dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict` (this process's sums) or :meth:`snapshot_state` (sums over all
        processes). Every rank of a resumed run loads the same snapshot, so process-summed sums are
        kept by rank 0 only and zeroed elsewhere: the next all-reduce then counts each token once."""
        sums = (keys.COV_IN, keys.COV_OUT)
        cov = {k: v for k, v in state.items() if keys.family(k) in (*sums, keys.META)}
        if REDUCED_KEY in state and rank() != 0:
            cov = {k: torch.zeros_like(v) if keys.family(k) in sums else v for k, v in cov.items()}
        self.cov.load_state_dict(cov)
        self.upd.load_state_dict({k: v for k, v in state.items() if keys.family(k) == keys.WEIGHTS})
        self.frozen = {k: v.clone() for k, v in state.items() if keys.family(k) == keys.FROZEN_IN}

    def save(self, path: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
        """Write a snapshot (``state``, default :meth:`snapshot_state`) atomically as safetensors."""
        state = {k: v.contiguous() for k, v in (state or self.snapshot_state()).items()}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(path) + ".tmp")
        save_file(state, str(tmp))
        tmp.replace(path)


class NullSuite:
    """The suite when ``instruments.enabled`` is false: the protocol's methods, nothing measured or saved."""

    config = SuiteConfig(enabled=False)
    tracked: list = []
    skipped: list[str] = []  # instruments off: nothing to report as skipped

    def attach(self, model: nn.Module | None = None, optimizer=None) -> None: ...
    def detach(self) -> None: ...

    @contextlib.contextmanager
    def attached(self, model: nn.Module | None = None, optimizer=None):
        yield self

    def set_loss_normalizer(self, n: float) -> None: ...
    def before_optimizer_step(self) -> None: ...

    def after_optimizer_step(self, step: int, force: bool = False) -> None:
        return None

    def compute(self, step: int) -> dict[str, float]:
        return {}

    def statistics_finite(self) -> None:
        return None

    def nonfinite_statistics(self) -> list[str]:
        return []

    def covariance_state(self) -> dict[str, torch.Tensor]:
        return {}

    def restore_covariance(self, state: dict[str, torch.Tensor]) -> None: ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def snapshot_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...
    def save(self, path: str | Path, state: dict[str, torch.Tensor] | None = None) -> None: ...


def build_suite(model: nn.Module, config: SuiteConfig, seed: int = 0) -> Suite:
    """The suite a config asks for: :class:`NullSuite` when ``config.enabled`` is false."""
    return InstrumentSuite(model, config, seed=seed) if config.enabled else NullSuite()
