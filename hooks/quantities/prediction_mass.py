"""The mechanism behind the write-side claim: how much of ``C_delta`` lies in the prediction subspace.

``mass_pred/L{i}/{r}`` = ``tr(V_k^T C_delta V_k) / tr(C_delta)`` over its isotropic value ``k / m``, for
every role with a ``C_delta`` (the write roles by default), with ``V_k`` the top-k prediction subspace of
the unembedding at measurement time; ``mass_pred_z/L{i}/{r}`` its exact z-score against Haar-random
k-subspaces (the RSF null with ``A = C_delta / tr C_delta``). Cross-entropy's per-token
``delta = W_U^T (p - y)`` (through the final norm) lies in the unembedding's row space, so for CE the
mass should be large; an objective whose ``delta`` points elsewhere scores near 1. Behind a post-norm
(OLMo2, Gemma2/3) ``delta`` is taken at the matrix output, before that norm, and ``V`` is read in
those coordinates without the norm's gain: the number then says where ``delta`` lies, not what the
stream receives (docs/metrics.md). The state keeps each role's energies along the top ``max(k_curve)``
directions (``curve_mass/L{i}/{r}/{energy,trace}``) at every full computation, for k-curves.
"""

from __future__ import annotations

import torch
from torch import Tensor

from weightgeom.hooks import geometry as geo
from weightgeom.hooks import keys
from weightgeom.hooks.gram import symmetric_fro2, symmetric_matmul
from weightgeom.hooks.measurement import Measurement, Request, Values
from weightgeom.hooks.roles import WRITE_ROLES


class PredictionMass:
    def requests(self, m: Measurement) -> list[Request]:
        return []

    def _measured(self, m: Measurement) -> list[tuple[str, Tensor, Tensor]]:
        """``(role key, sum of delta delta^T (block-upper layout), count)`` of the write roles (their output
        is the residual stream), summed over processes (one collective each)."""
        if not m.has_prediction:
            return []
        return [(key, *m.cov.global_sums("out", key)) for key in m.cov.sums_out
                if key.rsplit("/", 1)[1] in WRITE_ROLES]

    @staticmethod
    def _energies(outer: Tensor, V: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """``(v_i^T S v_i per column, tr S, ‖S‖_F²)`` of the summed (unnormalised) ``S``: the ratios the
        mass and its z-score need do not depend on the count. No copy of ``S`` is formed."""
        energies = (symmetric_matmul(outer, V.to(outer)) * V.to(outer)).sum(0)
        return energies.to(dtype), torch.diagonal(outer).sum().to(dtype), symmetric_fro2(outer).to(dtype)

    def compute(self, m: Measurement) -> Values:
        out = Values()
        for key, outer, _ in self._measured(m):
            d = outer.shape[0]
            k = min(m.k, d - 1)
            energies, trace, fro2 = self._energies(outer, m.prediction(k)[0], m.dtype)
            mass = geo._safe_ratio(energies.sum(), trace)
            tr_a2 = geo._safe_ratio(fro2, trace.square())
            out.add([keys.at("mass_pred", key)], mass * (d / k))
            out.add([keys.at("mass_pred_z", key)], geo.rsf_zscore_from_trace(mass, tr_a2, k, d))
        return out

    def curves(self, m: Measurement) -> dict[str, Tensor]:
        """``curve_mass/L{i}/{r}/{energy,trace}``: ``C_delta``'s energy along each of the top ``curve_k``
        prediction directions and its trace (``mass(k) = sum(energy[:k]) / trace``)."""
        out = {}
        for key, outer, count in self._measured(m):
            j = min(max(m.k, m.curve_k), outer.shape[0] - 1)
            energies, trace, _ = self._energies(outer, m.prediction(j)[0], m.dtype)
            scale = geo._safe_ratio(torch.ones_like(trace), count.to(trace))
            out[keys.state_key(keys.CURVE_MASS, key, "energy")] = energies * scale
            out[keys.state_key(keys.CURVE_MASS, key, "trace")] = trace * scale
        return out
