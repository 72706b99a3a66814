"""Spikiness of every measured covariance: ``spike_in/L{i}/{group}/{stat}`` for ``C_a`` and
``spike_out/L{i}/{role}/{stat}`` for ``C_delta``, stats top1, topk (at the suite's k), pr, erank."""

from __future__ import annotations

from hooks import geometry as geo
from hooks.measurement import Measurement


class Spikiness:
    def compute(self, m: Measurement) -> dict[str, float]:
        out: dict[str, float] = {}
        for family, eig in (("spike_in", m.eig_in), ("spike_out", m.eig_out)):
            for key, (evals, _) in eig.items():
                out.update({f"{family}/{key}/{stat}": v for stat, v in geo.spikiness(evals, m.k).items()})
        return out
