"""What the metric quantities read at one scheduled computation, computed once and shared.

A :class:`Measurement` is built by the suite when its schedule fires. It holds the covariances summed
over processes (one collective), their eigendecompositions (each computed once, whichever quantities
read them), the weight views of every matrix that has been written to, the frozen subspaces and the
prediction subspace. Quantities (``hooks/quantities``) are pure readers of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from hooks import geometry as geo
from hooks import keys
from hooks.covariance import CovarianceInstrument
from hooks.roles import TrackedMatrix, unembedding
from hooks.updates import UpdateInstrument


@dataclass
class Written:
    """One tracked matrix with a nonzero cumulative delta, and its three views (out x in, fp32):
    ``views[""]`` the cumulative delta since phase start, ``views["_update"]`` the last optimizer
    update, ``views["_grad"]`` the last raw gradient (None when not recorded, e.g. under LoRA)."""

    tm: TrackedMatrix
    views: dict[str, Tensor | None]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.views[""].shape)


@dataclass
class Measurement:
    """Shared inputs of the quantities at ``step``.

    ``k``: the suite's subspace dimension (each quantity caps it at a matrix's dim - 1).
    ``n_random``, ``seed``: random-subspace z-scores (0 samples disables them).
    """

    step: int
    k: int
    n_random: int
    seed: int
    cov: CovarianceInstrument
    upd: UpdateInstrument
    tracked: list[TrackedMatrix]
    input_roles: tuple[str, ...]
    frozen: dict[str, Tensor]
    model: torch.nn.Module
    arch: object = None
    state: dict[str, Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.state = self.cov.global_state()  # a collective: every rank builds a Measurement
        self._prediction: dict[int, tuple[Tensor, Tensor]] = {}

    @cached_property
    def eig_in(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{group key "L{i}/{g}": (evals desc, evecs)}`` of every measured ``C_a`` (float64)."""
        return {key: geo.sym_eigh(self.cov.covariance_in(key, state=self.state)) for key in self.cov.sums_in}

    @cached_property
    def eig_out(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{role key "L{i}/{r}": (evals desc, evecs)}`` of every measured ``C_delta`` (float64)."""
        return {key: geo.sym_eigh(self.cov.covariance_out(key, state=self.state)) for key in self.cov.sums_out}

    @cached_property
    def written(self) -> list[Written]:
        """Tracked matrices with a nonzero cumulative delta: frozen ones (LoRA) and matrices with a zero
        learning rate so far have no direction, so no RSF is reported for them."""
        out = []
        for tm in self.tracked:
            delta = self.upd.delta(tm)
            if bool(delta.any()):
                views = (delta, self.upd.update.get(tm.key), self.upd.grad.get(tm.key))
                out.append(Written(tm, dict(zip(keys.VIEWS, views))))
        return out

    def prediction(self, k: int) -> tuple[Tensor, Tensor]:
        """Top-k prediction subspace ``V`` (d, k) of the model's unembedding at this step, and all
        singular values of ``W_U diag(g)``."""
        if k not in self._prediction:
            W_U, gain, layernorm = unembedding(self.model, self.arch)
            self._prediction[k] = geo.prediction_subspace(W_U, gain, k=k, layernorm=layernorm)
        return self._prediction[k]
