"""What the metric quantities read at one scheduled computation, computed once and shared.

A :class:`Measurement` is built by the suite when its schedule fires. It holds the covariances summed
over processes (one collective), their eigendecompositions (computed once, batched over layers of the
same width, whichever quantities read them), the weight views of every matrix that has been written
to, the frozen subspaces and the prediction subspace. Quantities (``hooks/quantities``) are pure
readers of it and return :class:`Values`: tensors on the instruments' device, brought to the host
once per computation (a GPU run synchronises once, not once per metric).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from weightgeom.hooks import geometry as geo
from weightgeom.hooks import keys
from weightgeom.hooks.covariance import CovarianceInstrument
from weightgeom.hooks.roles import TrackedMatrix, has_unembedding, unembedding
from weightgeom.hooks.updates import UpdateInstrument


class Values:
    """Metric values collected as tensors and synchronised with the host once."""

    def __init__(self) -> None:
        self._names: list[list[str]] = []
        self._blocks: list[Tensor] = []

    def add(self, names: list[str], values: Tensor) -> None:
        """``values`` (len(names),): one metric per name, on any device."""
        self._names.append(list(names))
        self._blocks.append(values.reshape(-1))

    def extend(self, other: Values) -> None:
        self._names += other._names
        self._blocks += other._blocks

    def to_dict(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self._blocks:
            device = self._blocks[0].device
            flat = torch.cat([b.to(device=device, dtype=torch.float64) for b in self._blocks]).tolist()
            out.update(zip((n for names in self._names for n in names), flat, strict=True))
        return out


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
    ``zscores``: whether the RSF families report z-scores. ``dtype``: the dtype of the metric math
    (``SuiteConfig.metric_dtype``: float32 by default, float64 for reference checks).
    """

    step: int
    k: int
    zscores: bool
    dtype: torch.dtype
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
        """``{group key "L{i}/{g}": (evals desc, evecs)}`` of every measured ``C_a``."""
        return self._eigh({key: self.cov.covariance_in(key, state=self.state) for key in self.cov.sums_in})

    @cached_property
    def eig_out(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{role key "L{i}/{r}": (evals desc, evecs)}`` of every measured ``C_delta``."""
        return self._eigh({key: self.cov.covariance_out(key, state=self.state) for key in self.cov.sums_out})

    def _eigh(self, matrices: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
        """One batched eigendecomposition per matrix width (all layers at once)."""
        by_width: dict[int, list[str]] = defaultdict(list)
        for key, C in matrices.items():
            by_width[C.shape[0]].append(key)
        out = {}
        for names in by_width.values():
            evals, evecs = geo.sym_eigh_batched(torch.stack([matrices[n].to(self.dtype) for n in names]))
            out.update({n: (evals[i], evecs[i]) for i, n in enumerate(names)})
        return {key: out[key] for key in matrices}

    @cached_property
    def written(self) -> list[Written]:
        """Tracked matrices with a nonzero cumulative delta: frozen ones (LoRA) and matrices with a zero
        learning rate so far have no direction, so no RSF is reported for them."""
        deltas = [self.upd.delta(tm) for tm in self.tracked]
        nonzero = torch.stack([d.square().sum() > 0 for d in deltas]).tolist()  # one host sync
        return [Written(tm, dict(zip(keys.VIEWS, (d, self.upd.view(tm, "update"), self.upd.view(tm, "grad")))))
                for tm, d, keep in zip(self.tracked, deltas, nonzero) if keep]

    def residual_write(self, w: Written) -> Written:
        """``w`` as the residual stream receives it, for the prediction-subspace RSF: where a norm sits
        between the matrix's output and the residual add (OLMo2, Gemma2/3), every view ``M`` becomes
        ``diag(g_post) M`` (the fixed part of that norm's Jacobian, at this step; docs/metrics.md);
        elsewhere ``w`` itself."""
        gain = w.tm.post_norm_gain()  # a collective when sharded: every rank measures every matrix
        if gain is None:
            return w
        views = {view: None if M is None else M * gain.to(M.device, M.dtype)[:, None] for view, M in w.views.items()}
        return Written(w.tm, views)

    @cached_property
    def has_prediction(self) -> bool:
        """Whether the model has an unembedding (a reward model has none: no prediction subspace)."""
        return has_unembedding(self.model, self.arch)

    def prediction(self, k: int) -> tuple[Tensor, Tensor]:
        """Top-k prediction subspace ``V`` (d, k) of the model's unembedding at this step, and all
        singular values of ``W_U diag(g)`` (computed once per measurement, in the metric dtype)."""
        if k not in self._prediction:
            W_U, gain, layernorm = unembedding(self.model, self.arch)
            self._prediction[k] = geo.prediction_subspace(W_U, gain, k=k, layernorm=layernorm, dtype=self.dtype)
        return self._prediction[k]
