"""The one object trainers talk to: covariance + update instruments and the geometry they stream.

Trainer protocol (the CE loop and the TRL callback both follow it)::

    suite = InstrumentSuite(model, k=8, every_n=10)
    with suite.attached(model, optimizer):        # hooks removed on exit, also on error
        for step in range(1, steps + 1):
            suite.set_loss_normalizer(n_loss_tokens)  # before backward
            loss.backward(); optimizer.step()         # optimizer hooks record G_t and U_t
            metrics = suite.after_optimizer_step(step)  # dict when the schedule fires, else None

Metric names are listed in docs/architecture.md. Relative RSF = RSF / (k / dim): 1.0 is isotropic.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from harness import geometry as geo
from hooks.covariance import CovarianceInstrument
from hooks.distributed import rank, world_size
from hooks.roles import DEFAULT_INPUT_ROLES, ROLES, WRITE_ROLES, ArchSpec, resolve_tracked, unembedding
from hooks.schedule import Schedule
from hooks.updates import UpdateInstrument

# Present in a snapshot whose cov_* sums were summed over this many processes (see load_state_dict).
REDUCED_KEY = "meta/cov_reduced_over"
# State of the covariance instrument's token-subsampling generator (max_tokens), so that a resumed
# run draws the same token subsets as an uninterrupted one.
GENERATOR_KEY = "meta/cov_generator"


class InstrumentSuite:
    """Covariances (``C_a`` per input group, ``C_delta`` per output role), weight updates, and the
    relative-RSF / spikiness / coherence metrics computed from them.

    Args:
        k: subspace dimension for the streamed RSF (capped at each matrix's dim - 1).
        input_roles: roles whose input-side ``C_a`` (and so ``rsf_in``) is measured: the read
            pathway and its comparisons by default; add ``o`` / ``down`` for their input side
            (``down`` reads the d_ff-wide tensor: the costliest covariance).
        output_roles: roles whose ``C_delta`` is accumulated (the write pathway by default).
        n_random: Haar-random subspaces for the z-scores (0 disables them).
        max_tokens: per-forward token subsample for the covariances (None = every token).
    """

    def __init__(self, model: nn.Module, *, roles: tuple[str, ...] = ROLES, layers: list[int] | None = None,
                 k: int = 8, every_n: int = 10, log_spaced: bool = False,
                 input_roles: tuple[str, ...] = DEFAULT_INPUT_ROLES, output_roles: tuple[str, ...] = WRITE_ROLES, dtype: torch.dtype = torch.float32,
                 max_tokens: int | None = None, n_random: int = 20, seed: int = 0,
                 arch: ArchSpec | str | None = None) -> None:
        if k < 1:
            raise ValueError(f"instruments.k must be >= 1, got {k}")
        self.model, self.arch, self.k, self.n_random, self.seed = model, arch, k, n_random, seed
        self.schedule = Schedule(every_n=every_n, log_spaced=log_spaced)
        self._roles, self._layers = tuple(roles), layers
        self.tracked = resolve_tracked(model, roles, arch, layers)
        if not self.tracked:
            raise ValueError(f"instruments.roles {list(roles)} matched no matrix in this model")
        self.input_roles = tuple(input_roles)
        self.cov = CovarianceInstrument(self.tracked, input_roles=input_roles, output_roles=output_roles, dtype=dtype,
                                        max_tokens=max_tokens, seed=seed, schedule=self.schedule, spike_k=k)
        self.upd = UpdateInstrument(self.tracked, schedule=self.schedule)
        self.instruments = [self.cov, self.upd]
        self.frozen: dict[str, torch.Tensor] = {}

    # ----- lifecycle ------------------------------------------------------------------------------
    def attach(self, model: nn.Module | None = None, optimizer=None) -> None:
        model = model if model is not None else self.model
        self._check_modules(model)
        for inst in self.instruments:
            inst.attach(model, optimizer)

    def _check_modules(self, model: nn.Module) -> None:
        """The tracked modules must still be the model's: wrapping after construction (PEFT's
        ``get_peft_model``, TRL's ``peft_config``) replaces them, and hooks on the old ones would
        silently see a frozen base layer."""
        current = {tm.key: tm.module for tm in resolve_tracked(model, self._roles, self.arch, self._layers)}
        stale = [tm.key for tm in self.tracked if current.get(tm.key) is not tm.module]
        if stale:
            raise RuntimeError(f"the model's modules changed after the InstrumentSuite was built ({stale[:3]}...): "
                               "build the suite after wrapping the model (e.g. after peft.get_peft_model), "
                               "and wrap before handing the model to TRL instead of passing peft_config")

    def detach(self) -> None:
        for inst in self.instruments:
            inst.detach()

    @contextlib.contextmanager
    def attached(self, model: nn.Module | None = None, optimizer=None):
        try:
            self.attach(model, optimizer)
            yield self
        finally:
            self.detach()

    def start_phase(self) -> None:
        """Current weights become ``W0``; all sums, histories and frozen subspaces are cleared."""
        for inst in self.instruments:
            inst.reset()
        self.frozen = {}

    def set_loss_normalizer(self, n: float) -> None:
        """The number the loss was divided by (tokens for a token-mean CE, pairs for a pair-mean
        preference loss, times the accumulation steps it was further divided by)."""
        self.cov.loss_normalizer = float(n)

    def before_optimizer_step(self) -> None:
        if not self.upd.driven_by_optimizer:
            self.upd.before_step()

    def after_optimizer_step(self, step: int, force: bool = False) -> dict[str, float] | None:
        if not self.upd.driven_by_optimizer:
            self.upd.after_step()
        if not self.frozen and self.upd.steps >= 1:
            self._freeze_subspaces()
        if force or self.schedule(step):
            return self.compute(step)
        return None

    # ----- metrics --------------------------------------------------------------------------------
    def _freeze_subspaces(self) -> None:
        """Top-k bases of the covariances after the phase's first optimizer step."""
        state = self.cov.global_state()
        for key in self.cov.sums_in:
            C = self.cov.covariance_in(key, state=state)
            self.frozen[f"frozen_in/{key}"] = geo.top_eigvecs(C, min(self.k, C.shape[0] - 1))[0]

    def prediction_subspace(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        W_U, gain, layernorm = unembedding(self.model, self.arch)
        return geo.prediction_subspace(W_U, gain, k=k, layernorm=layernorm)

    def compute(self, step: int) -> dict[str, float]:
        state = self.cov.global_state()
        eig_in = {key: geo.sym_eigh(self.cov.covariance_in(key, state=state)) for key in self.cov.sums_in}
        eig_out = {key: geo.sym_eigh(self.cov.covariance_out(key, state=state)) for key in self.cov.sums_out}
        pred = None
        out: dict[str, float] = {}
        for tm in self.tracked:
            views = {"": self.upd.delta(tm), "_update": self.upd.update.get(tm.key),
                     "_grad": self.upd.grad.get(tm.key)}
            m, n = views[""].shape
            if not bool(views[""].any()):
                continue  # nothing written yet (frozen under LoRA, or lr 0 in warmup): no RSF to report
            if tm.role in self.input_roles and tm.group_key in eig_in:
                evals, evecs = eig_in[tm.group_key]
                k = min(self.k, n - 1)
                self._side(out, "in", tm.key, views, evecs[:, :k], k, n)
                out[f"gap_in/{tm.key}"] = geo.eigengap(evals, k)
                frozen = self.frozen.get(f"frozen_in/{tm.group_key}")
                if frozen is not None:
                    out[f"rsf_in_frozen/{tm.key}"] = geo.relative_rsf(geo.rsf_in(views[""], frozen), frozen.shape[1], n)
            if tm.role in WRITE_ROLES:
                k = min(self.k, m - 1)
                if pred is None:
                    pred, svals = self.prediction_subspace(k)
                    out["gap_pred"] = geo.eigengap(svals.pow(2), k)
                self._side(out, "out_pred", tm.key, views, pred, k, m)
            if tm.key in eig_out:
                evals, evecs = eig_out[tm.key]
                k = min(self.k, m - 1)
                self._side(out, "out_delta", tm.key, views, evecs[:, :k], k, m)
                out[f"gap_out_delta/{tm.key}"] = geo.eigengap(evals, k)
        out.update(_layer_means(out))
        # Spikiness from the spectra above (not CovarianceInstrument.compute): top-k share uses this
        # suite's k, and the covariances are neither all-reduced nor decomposed a second time.
        for prefix, eig in (("spike_in", eig_in), ("spike_out", eig_out)):
            for key, (evals, _) in eig.items():
                out.update({f"{prefix}/{key}/{name}": v for name, v in geo.spikiness(evals, self.k).items()})
        out.update(self.upd.compute(step))
        return out

    def _side(self, out: dict, side: str, key: str, views: dict, basis: torch.Tensor, k: int, dim: int) -> None:
        """Relative RSF of each view (cumulative delta, last update, last gradient) against ``basis``
        on the input (``basis`` n x k) or output (m x k) side, plus the cumulative delta's z-score."""
        fn = geo.rsf_in if side == "in" else geo.rsf_out
        for suffix, M in views.items():
            if M is None:
                continue
            value = fn(M, basis)
            out[f"rsf_{side}{suffix}/{key}"] = geo.relative_rsf(value, k, dim)
            if suffix == "" and self.n_random:
                out[f"z_{side}/{key}"] = geo.zscore_vs_random(
                    M, value, k, "in" if side == "in" else "out", n_samples=self.n_random, seed=self.seed)

    # ----- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for inst in self.instruments:
            state.update(inst.state_dict())
        state.update({k: v.clone() for k, v in self.frozen.items()})
        W_U, gain, _ = unembedding(self.model, self.arch)
        state["pred/W_U"] = W_U
        if gain is not None:
            state["pred/gain"] = gain
        state[GENERATOR_KEY] = self.cov._generator.get_state()
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
        cov = {k: v for k, v in state.items() if k.startswith("cov_")}
        if REDUCED_KEY in state and rank() != 0:
            cov = {k: torch.zeros_like(v) if k.startswith(("cov_in/", "cov_out/")) else v for k, v in cov.items()}
        self.cov.load_state_dict(cov)
        if GENERATOR_KEY in state:
            self.cov._generator.set_state(state[GENERATOR_KEY].to(torch.uint8).cpu().clone())
        self.upd.load_state_dict({k: v for k, v in state.items() if k.startswith("weights/")})
        self.frozen = {k: v.clone() for k, v in state.items() if k.startswith("frozen_in/")}

    def save(self, path: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
        """Write a snapshot (``state``, default :meth:`snapshot_state`) atomically as safetensors."""
        from safetensors.torch import save_file  # noqa: PLC0415

        state = {k: v.contiguous() for k, v in (state or self.snapshot_state()).items()}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(path) + ".tmp")
        save_file(state, str(tmp))
        tmp.replace(path)


def _layer_means(metrics: dict[str, float]) -> dict[str, float]:
    """``prefix/all/role`` = mean over layers of ``prefix/L{i}/role`` for the RSF and z metrics."""
    groups: dict[str, list[float]] = defaultdict(list)
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[1].startswith("L") and (parts[0].startswith("rsf_") or parts[0].startswith("z_")):
            groups[f"{parts[0]}/all/{parts[2]}"].append(value)
    return {key: sum(v) / len(v) for key, v in groups.items()}
