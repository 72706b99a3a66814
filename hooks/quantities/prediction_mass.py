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

from weightgeom.hooks import geometry as geo
from weightgeom.hooks import keys
from weightgeom.hooks.measurement import Measurement, Request, Values
from weightgeom.hooks.roles import WRITE_ROLES


class PredictionMass:
    def requests(self, m: Measurement) -> list[Request]:
        return []

    def _measured(self, m: Measurement) -> list[tuple[str, torch.Tensor]]:
        """``(role key, C_delta)`` of the write roles (their output is the residual stream)."""
        if not m.has_prediction:
            return []
        return [(key, m.covariance("out", key).to(m.dtype)) for key in m.cov.sums_out
                if key.rsplit("/", 1)[1] in WRITE_ROLES]

    def compute(self, m: Measurement) -> Values:
        out = Values()
        for key, C in self._measured(m):
            d = C.shape[0]
            k = min(m.k, d - 1)
            trace = torch.diagonal(C).sum()
            mass = geo._safe_ratio(geo.subspace_energies(C, m.prediction(k)[0]).sum(), trace)
            tr_a2 = geo._safe_ratio(C.square().sum(), trace.square())
            out.add([keys.at("mass_pred", key)], mass * (d / k))
            out.add([keys.at("mass_pred_z", key)], geo.rsf_zscore_from_trace(mass, tr_a2, k, d))
        return out

    def curves(self, m: Measurement) -> dict[str, torch.Tensor]:
        """``curve_mass/L{i}/{r}/{energy,trace}``: ``C_delta``'s energy along each of the top ``curve_k``
        prediction directions and its trace (``mass(k) = sum(energy[:k]) / trace``)."""
        out = {}
        for key, C in self._measured(m):
            j = min(max(m.k, m.curve_k), C.shape[0] - 1)
            out[keys.state_key(keys.CURVE_MASS, key, "energy")] = geo.subspace_energies(C, m.prediction(j)[0])
            out[keys.state_key(keys.CURVE_MASS, key, "trace")] = torch.diagonal(C).sum()
        return out
