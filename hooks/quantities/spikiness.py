"""Spikiness of every measured covariance: ``spike_in/L{i}/{group}/{stat}`` for ``C_a`` and
``spike_out/L{i}/{role}/{stat}`` for ``C_delta``, stats top1, topk (at the suite's k), pr, erank."""

from __future__ import annotations

from collections import defaultdict

import torch

from weightgeom.hooks import geometry as geo
from weightgeom.hooks import keys
from weightgeom.hooks.measurement import Measurement, Values


class Spikiness:
    def compute(self, m: Measurement) -> Values:
        out = Values()
        for family, eig in (("spike_in", m.eig_in), ("spike_out", m.eig_out)):
            by_width: dict[int, list[str]] = defaultdict(list)
            for key, (evals, _) in eig.items():
                by_width[evals.shape[0]].append(key)
            for names in by_width.values():
                stats = geo.spikiness_batched(torch.stack([eig[n][0] for n in names]), m.k)
                for stat, values in stats.items():
                    out.add([keys.at(family, n, stat) for n in names], values)
        return out
