"""The one object trainers talk to: covariance + update instruments and the metrics they stream.

Both classes here implement :class:`weightgeom.hooks.protocol.Suite` (the call order a trainer
follows is in that module)::

    suite = InstrumentSuite(model, k=8, every_n=10)
    with suite.attached(model, optimizer):        # hooks removed on exit, also on error
        for step in range(1, steps + 1):
            suite.set_loss_normalizer(n_loss_tokens)  # before backward
            loss.backward()
            suite.before_optimizer_step(step, force=step == steps)  # whether this step's metrics are due
            optimizer.step()                          # the optimizer hooks: U_t, G_t, and the metrics when due
            metrics = suite.after_optimizer_step(step, force=step == steps)  # dict when due, else None

What the suite holds between steps: the covariance sums, ``W0`` (``reference``: on the device, in
host memory or only on disk) and small things; the pre-step copy that gives the update, and the
gradient, exist only around a step whose metrics are due, which is computed inside the optimizer's
post-step hook (``.grad`` is still there). Its ``state_dict`` (what a checkpoint holds) names ``W0`` by
its file's digest instead of holding it (:mod:`weightgeom.hooks.reference`).

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

from weightgeom.hooks import eigensolver as eig
from weightgeom.hooks import keys
from weightgeom.hooks.covariance import CovarianceInstrument
from weightgeom.hooks.distributed import rank, world_size
from weightgeom.hooks.gram import GRAM_PRECISIONS
from weightgeom.hooks.measurement import Measurement, Values
from weightgeom.hooks.protocol import Suite
from weightgeom.hooks.quantities import DEFAULT_QUANTITIES, Quantity
from weightgeom.hooks.reference import REFERENCE_PLACES
from weightgeom.hooks.roles import (
    DEFAULT_INPUT_ROLES,
    ROLES,
    WRITE_ROLES,
    ArchSpec,
    arch_spec_for,
    has_unembedding,
    resolve_tracked,
    untracked_modules,
    unwrap_model,
)
from weightgeom.hooks.schedule import Schedule
from weightgeom.hooks.updates import CAPTURES, UpdateInstrument

# Present in a snapshot whose cov_* sums were summed over this many processes (see load_state_dict).
REDUCED_KEY = "meta/cov_reduced_over"
# How many metric computations ran in the phase: a resumed run keeps the full-spectrum schedule.
COMPUTATIONS_KEY = "meta/metric_computations"
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class SuiteConfig:
    """What the instruments measure and when (the recipe's ``instruments:`` section); each field's
    ``metadata["help"]`` says what it does (``harness keys instruments.`` prints them).

    Precision: float32 metrics (``metric_dtype``) are 2-4x faster than float64 and their error is far
    below the statistics' own sampling error: relative RSF within 1e-5 of float64, every other metric
    within 1e-3 (tests/hooks/test_suite.py), while C_a estimated on two halves of one batch differs by
    0.5-1.7 relative (benchmarks/README.md). Cost at large widths: ``reference``, ``capture``,
    ``coherence``, ``dense_max_dim`` and ``full_spectrum_every`` (docs/metrics.md, "Cost").
    """

    enabled: bool = field(default=True, metadata=_help("attach the instruments at all"))
    roles: list[str] = field(default_factory=lambda: list(ROLES), metadata=_help(
        "matrices whose weight deltas are tracked (q, k, v, o, gate, up, down)"))
    layers: list[int] | None = field(default=None, metadata=_help("layers to track (null: all)"))
    input_roles: list[str] = field(default_factory=lambda: list(DEFAULT_INPUT_ROLES), metadata=_help(
        "roles whose input-side C_a (and so rsf_in) is measured: the read pathway q, k and its comparisons v, gate, "
        "up (add o / down for their input side; down reads the d_ff-wide tensor, the costliest covariance)"))
    output_roles: list[str] = field(default_factory=lambda: list(WRITE_ROLES), metadata=_help(
        "roles with an output-side C_delta (the write pathway)"))
    k: int = field(default=8, metadata=_help(
        "subspace dimension of the streamed RSF (capped at each matrix's dim - 1)"))
    k_curve: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32], metadata=_help(
        "the k values of the reports' RSF-vs-k curves (recorded at each full-spectrum computation)"))
    every_n: int = field(default=20, metadata=_help("compute the metrics every n optimizer steps (and at the last)"))
    log_spaced: bool = field(default=True, metadata=_help("also at steps 1, 2, 4, 8, ... (early training is fast)"))
    zscores: bool = field(default=True, metadata=_help(
        "z-scores of each RSF against random k-subspaces (closed form; tr(A^2) exact up to dense_max_dim, "
        "Hutch++ above it)"))
    max_tokens: int | None = field(default=None, metadata=_help(
        "per-forward token subsample for the covariances (null: every token, exact)"))
    dtype: Literal["float32", "float64"] = field(default="float32", metadata=_help("accumulation dtype of the sums"))
    metric_dtype: Literal["float32", "float64"] = field(default="float32", metadata=_help(
        "dtype of the metric computation (float32 is far more precise than the statistics' sampling error)"))
    gram_precision: Literal["fp32", "tf32", "bf16"] = field(default="fp32", metadata=_help(
        "how the covariances' products are formed: fp32 (exact), tf32 or bf16 (tensor cores on CUDA, fp32 sums; "
        "hooks/gram.py states their error)"))
    reference: Literal["device", "cpu", "disk"] = field(default="device", metadata=_help(
        "where W0 (the phase-start weights) lives: device (fastest; one fp32 copy of the tracked weights beside "
        "them), cpu (host memory, streamed to the device when a metric is due: the accelerator holds only the "
        "covariances) or disk (only the phase's W0 file: no copy in memory at all)"))
    capture: Literal["due", "every_step"] = field(default="due", metadata=_help(
        "when the last update and gradient are kept: due (only around steps whose metrics are due; nothing "
        "between steps) or every_step (two more copies held between steps, so compute() works at any time)"))
    coherence: bool = field(default=False, metadata=_help(
        "gradient coherence |sum G|^2 / sum |G|^2 over the phase (one more fp32 copy of the tracked weights)"))
    dense_max_dim: int = field(default=1024, metadata=_help(
        "widths up to this take the exact dense methods (full eigendecomposition, exact tr(A^2)); wider ones the "
        "warm-started top-k eigensolver and Hutch++ (docs/metrics.md states their error)"))
    full_spectrum_every: int = field(default=10, metadata=_help(
        "a covariance wider than dense_max_dim gets its full spectrum (spike_*/erank, the k-curves) at the first "
        "metric computation, every n-th after it and at a phase's last step"))

    def __post_init__(self) -> None:
        for name in ("roles", "input_roles", "output_roles"):
            bad = [r for r in getattr(self, name) if r not in ROLES]
            if bad:
                raise ValueError(f"instruments.{name} has unknown roles {bad}; valid roles: {list(ROLES)}")
        for name in ("k", "every_n", "full_spectrum_every"):
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
        if self.reference not in REFERENCE_PLACES:
            raise ValueError(f"instruments.reference must be one of {list(REFERENCE_PLACES)}, got {self.reference!r}")
        if self.capture not in CAPTURES:
            raise ValueError(f"instruments.capture must be one of {list(CAPTURES)}, got {self.capture!r}")
        if self.dense_max_dim < 0:
            raise ValueError(f"instruments.dense_max_dim must be >= 0, got {self.dense_max_dim}")


class InstrumentSuite:
    """Covariances (``C_a`` per input group, ``C_delta`` per output role), weight updates, and the
    metric quantities computed from them on a schedule.

    Build with a :class:`SuiteConfig` or its fields as keywords
    (``InstrumentSuite(model, k=4, every_n=10)``); ``quantities`` replaces the default metric set
    (``weightgeom.hooks.quantities.DEFAULT_QUANTITIES``). Build it after any wrapping that replaces modules
    (PEFT): :meth:`attach` refuses a model whose tracked modules changed. ``reference_dir``: where this
    phase's ``W0`` file goes (the run's instrument folder; default a temporary folder) and where a resumed
    state's ``W0`` file is looked for; ``reference_shared``: a folder (a run's root) where an identical W0
    file of another phase is linked instead of kept twice (:mod:`weightgeom.hooks.reference`).
    """

    def __init__(self, model: nn.Module, config: SuiteConfig | None = None, *, seed: int = 0,
                 arch: ArchSpec | str | None = None, quantities: tuple[Quantity, ...] | None = None,
                 reference_dir: str | Path | None = None, reference_shared: str | Path | None = None,
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
        _refuse_partitioned(self.tracked)
        self.upd = UpdateInstrument(self.tracked, reference=c.reference, reference_dir=reference_dir,
                                    reference_shared=reference_shared, coherence=c.coherence, capture=c.capture)
        self.frozen: dict[str, torch.Tensor] = {}
        self.curves: dict[str, torch.Tensor] = {}  # state key -> the k-curve energies of the last full computation
        self._has_unembedding = has_unembedding(model, arch)
        self._untracked = untracked_modules(model, arch)
        # the top-k eigensolver's warm starts and the cached prediction subspace (not state: they only save time)
        self._warm: dict[str, object] = {}
        self._hooks: list = []  # the optimizer's step hooks
        self._expected: tuple[int, bool] | None = None  # (step, force) of the optimizer step about to run
        self._last_step: int | None = None
        self._due = self._final = False  # the step in flight has its metrics due / forced (a phase's last)
        self._step_in_flight = 0
        self._pending: tuple[int, dict[str, float]] | None = None  # metrics computed inside the step
        self._computations = 0
        self.solved: list[str] = []

    @property
    def skipped(self) -> list[str]:
        """What this model's instruments cannot measure, one human-readable line each (empty when
        nothing is skipped), for a caller to print once: a reward model's missing prediction subspace,
        weights no role covers (a mixture-of-experts layer's experts and router)."""
        out = []
        if not self._has_unembedding:
            head = arch_spec_for(self.model, self.arch).unembed
            out.append(f"no prediction subspace: {type(unwrap_model(self.model)).__name__} has no unembedding "
                       f"({head!r}), so rsf_out_pred*, z_out_pred*, gap_pred and subspace_err_pred are not computed")
        if self._untracked:
            out.append("not tracked (no role covers them): " + "; ".join(self._untracked))
        return out

    # ----- lifecycle ------------------------------------------------------------------------------
    def attach(self, model: nn.Module | None = None, optimizer=None) -> None:
        """Hook the model (statistics) and, when given, the optimizer (the update, the gradient and the
        metrics of a due step are taken inside ``optimizer.step()``)."""
        model = model if model is not None else self.model
        self._check_modules(model)
        self.cov.attach(model, optimizer)
        self.upd.attach(model)  # its optimizer hooks are the suite's own, below
        if optimizer is not None:
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
            self._hooks = [inner.register_step_pre_hook(lambda *_: self._pre_step()),
                           inner.register_step_post_hook(lambda *_: self._post_step())]

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
        while self._hooks:
            self._hooks.pop().remove()

    @property
    def driven_by_optimizer(self) -> bool:
        return bool(self._hooks)

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

    # ----- one optimizer step ------------------------------------------------------------------------
    def before_optimizer_step(self, step: int | None = None, force: bool = False) -> None:
        """Right before ``optimizer.step()``: which step it is and whether its metrics are forced (a
        phase's last step), so the update and gradient are captured for a due step only. Without this
        call the next step is taken to be the last one seen + 1 (a forced step's metrics then lack the
        update and gradient views). Where the suite could not hook the optimizer, this also records
        the pre-step state (and copies the gradients of a due step)."""
        if step is not None:
            self._expected = (int(step), bool(force))
        if not self.driven_by_optimizer:
            self._begin_step(copy_grads=True)

    def _pre_step(self) -> None:  # the optimizer's step pre-hook
        self._begin_step(copy_grads=self.config.capture == "every_step")

    def _begin_step(self, copy_grads: bool) -> None:
        step, force = self._expected or ((self._last_step or self.upd.steps) + 1, False)
        self._expected = None
        self._due = force or self.schedule(step)
        self._step_in_flight, self._final = step, force
        self._pending = self._prepared = None
        if self.upd.steps == 0:  # the phase's first step: its covariances are final now (backward is done)
            self._freeze_once(after_step=False)
        if self._due:
            # The covariances do not change in the optimizer step: their spectra are taken now, before the
            # pre-step copy exists, so the due step's peak never holds both.
            self._prepared = self._measurement(step, full=force, live_grads=True)
            self._prepared.spectra()
        self.upd.before_step(capture=self._due or self.config.capture == "every_step", copy_grads=copy_grads)

    def _post_step(self) -> None:  # the optimizer's step post-hook: .grad still holds G_t
        self.upd.after_step()
        self._freeze_once()
        if self._due:
            step = self._step_in_flight
            self._pending = (step, self._compute(self._prepared))
            self._prepared = None
            self.upd.release()

    def after_optimizer_step(self, step: int, force: bool = False) -> dict[str, float] | None:
        """Bookkeeping after ``optimizer.step()``; the metrics when the schedule fires at ``step``
        (or ``force``, e.g. at a phase's last step), else None. A due step's metrics were computed inside
        the optimizer step (where its gradient still existed); a step the optimizer skipped (or did not
        hook) computes them now, from what was captured."""
        if not self.driven_by_optimizer:
            self.upd.after_step()
        self._freeze_once()
        self._last_step = step
        pending, self._pending = self._pending, None
        prepared, self._prepared = self._prepared, None
        if pending is not None and pending[0] == step:
            return pending[1]
        if force or self.schedule(step):
            usable = prepared is not None and self._step_in_flight == step
            out = self._compute(prepared) if usable else self.compute(step, full=force)
            self.upd.release()
            return out
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
    def _freeze_once(self, after_step: bool = True) -> None:
        """Top-k bases of ``C_a`` after the phase's first backward (the frozen subspaces): taken right before
        its optimizer step where the suite hooks it, else after it (the covariances are the same)."""
        if self.frozen or (after_step and self.upd.steps < 1):
            return
        for key in self.cov.sums_in:
            C = self.cov.global_covariance("in", key)  # one at a time (a collective)
            n, k = C.shape[0], min(self.k, C.shape[0] - 1)
            if n <= self.config.dense_max_dim:  # exact, in float64
                basis = eig.full_eigenpairs(C.double(), k).top(k)
            else:
                C64 = eig.symmetrize(C.double())
                basis = eig.top_eigenpairs(lambda X, C64=C64: C64 @ X, n, k, device=C.device, seed=self.seed).top(k)
            self.frozen[keys.at(keys.FROZEN_IN, key)] = basis.contiguous()

    def _measurement(self, step: int, full: bool, live_grads: bool) -> Measurement:
        """The shared inputs of one computation; wide covariances' full spectra and the k-curves at every
        ``full_spectrum_every``-th computation and with ``full`` (a phase's last step)."""
        c = self.config
        full = full or (self._computations + 1) % c.full_spectrum_every == 0
        self._computations += 1
        return Measurement(step=step, k=self.k, zscores=c.zscores, dtype=DTYPES[c.metric_dtype], cov=self.cov,
                           upd=self.upd, tracked=self.tracked, input_roles=self.input_roles, frozen=self.frozen,
                           model=self.model, arch=self.arch, dense_max_dim=c.dense_max_dim, full_spectrum=full,
                           curve_k=max(c.k_curve, default=0) if full else 0, live_grads=live_grads,
                           warm=self._warm, seed=self.seed, release_views=c.capture == "due")

    def compute(self, step: int, full: bool = False, live_grads: bool = False) -> dict[str, float]:
        """Every quantity's metrics now (a collective under torch.distributed: call it on every rank).
        ``full``: a phase's last step (wide covariances' full spectra and the k-curves; also every
        ``full_spectrum_every``-th computation). ``live_grads``: inside the optimizer's post-step hook,
        where ``.grad`` is the gradient view."""
        return self._compute(self._measurement(step, full, live_grads))

    def _compute(self, m: Measurement) -> dict[str, float]:
        full = m.full_spectrum
        m.reduce([r for quantity in self.quantities for r in quantity.requests(m)])
        values = Values()
        for quantity in self.quantities:
            values.extend(quantity.compute(m))
        if full:
            self.curves = self._curves(m)
            for quantity in self.quantities:
                if hasattr(quantity, "curves"):
                    self.curves.update({k: v.detach().clone() for k, v in quantity.curves(m).items()})
        self.solved = m.solves  # which spectra this process computed (the split of the work over processes)
        out = values.to_dict()  # the one host synchronisation of the values
        out.update(keys.layer_means(out))
        return out

    def _curves(self, m: Measurement) -> dict[str, torch.Tensor]:
        """``curve_in/L{i}/{r}/{energy,sq_norm}``: the cumulative delta's energy along each of the top
        ``max(k_curve)`` eigenvectors of its ``C_a`` (the reports' RSF-vs-k curves: ``RSF(k) =
        sum(energy[:k]) / sq_norm``), for the written input-side matrices."""
        out = {}
        for tm in self.tracked:
            r = m.result(tm, "")
            if r is None or "in" not in r.energies or tm.key not in m.written:
                continue
            out[keys.state_key(keys.CURVE_IN, tm.key, "energy")] = r.energies["in"].detach().clone()
            out[keys.state_key(keys.CURVE_IN, tm.key, "sq_norm")] = r.sq_norm.detach().reshape(()).clone()
        return out

        # ----- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Covariance sums and counts, the step count, the frozen bases (n x k), the last k-curves and the
        digest of this phase's ``W0`` file (written now if it is not yet: a collective under several
        processes); with ``coherence``, the gradient sums. No other weight-sized tensor."""
        state = {**self.cov.state_dict(), **self.upd.state_dict()}
        state.update({k: v.clone() for k, v in self.frozen.items()})
        state.update({k: v.clone() for k, v in self.curves.items()})
        state[COMPUTATIONS_KEY] = torch.tensor(self._computations, dtype=torch.int64)
        return state

    def held_bytes(self) -> dict[str, int]:
        """What the instruments hold in memory now, in bytes, by kind: ``covariances`` (the sums),
        ``reference`` (``W0``: 0 with ``reference: disk``; only LoRA factors for a LoRA model), ``views``
        (the update and gradient copies: 0 between steps with ``capture: due``), ``coherence`` and
        ``other`` (frozen bases, k-curves, warm starts)."""
        def size(tensors) -> int:
            return sum(t.numel() * t.element_size() for t in tensors)

        covariances = size([t for s in self.cov.sums_in.values() for t in s[:2]] +
                           [s[0] for s in self.cov.sums_out.values()])
        warm = [t for v in self._warm.values() for t in (v if isinstance(v, tuple) else (v,))
                if isinstance(t, torch.Tensor)]
        other = size(list(self.frozen.values()) + list(self.curves.values()) + warm)
        return {"covariances": covariances, **self.upd.held_bytes(), "other": other}

    @property
    def reference_dir(self) -> Path:
        """Where this phase's ``W0`` file is written (and a resumed one looked for)."""
        return self.upd.w0.directory

    @reference_dir.setter
    def reference_dir(self, path: str | Path) -> None:
        self.upd.w0.directory = Path(path)

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
        self.upd.load_state_dict({k: v for k, v in state.items() if keys.family(k) in (keys.WEIGHTS, keys.META)})
        self.frozen = {k: v.clone() for k, v in state.items() if keys.family(k) == keys.FROZEN_IN}
        self.curves = {k: v.clone() for k, v in state.items()
                       if keys.family(k) in (keys.CURVE_IN, keys.CURVE_MASS)}
        self._last_step, self._computations = None, int(state.get(COMPUTATIONS_KEY, torch.tensor(0)))

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
    def before_optimizer_step(self, step: int | None = None, force: bool = False) -> None: ...

    def after_optimizer_step(self, step: int, force: bool = False) -> None:
        return None

    def compute(self, step: int, full: bool = False, live_grads: bool = False) -> dict[str, float]:
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


def build_suite(model: nn.Module, config: SuiteConfig, seed: int = 0, reference_dir: str | Path | None = None,
                reference_shared: str | Path | None = None) -> Suite:
    """The suite a config asks for: :class:`NullSuite` when ``config.enabled`` is false."""
    if not config.enabled:
        return NullSuite()
    return InstrumentSuite(model, config, seed=seed, reference_dir=reference_dir, reference_shared=reference_shared)


def _refuse_partitioned(tracked) -> None:
    """DeepSpeed ZeRO-3 partitions every parameter: outside its own forward a weight is an empty
    placeholder, so no weight delta can be read and the instruments would measure nothing. Detected by
    the attributes ZeRO-3 puts on its parameters (this package never imports DeepSpeed)."""
    for tm in tracked:
        w = getattr(getattr(tm.module, "base_layer", tm.module), "weight", None)
        if w is not None and hasattr(w, "ds_id"):
            raise RuntimeError(f"{tm.key}: DeepSpeed ZeRO-3 partitions this weight (an empty placeholder outside "
                               "forward), so the instruments cannot read it; shard with FSDP2 instead "
                               "(accelerate's FSDP plugin, fsdp_version: 2), which the instruments support")
