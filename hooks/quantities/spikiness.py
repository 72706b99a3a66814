"""Spikiness of every measured covariance: ``spike_in/L{i}/{group}/{stat}`` for ``C_a`` and
``spike_out/L{i}/{role}/{stat}`` for ``C_delta``, stats top1, topk (at the suite's k), pr, erank.

The shares and the participation ratio need only the leading eigenvalues, ``tr C`` and ``‖C‖_F²``
(``pr = (tr C)² / ‖C‖_F²``); the effective rank needs every eigenvalue, so a covariance wider than
``instruments.dense_max_dim`` reports it only when its full spectrum was computed
(``instruments.full_spectrum_every``, and always at a phase's last step)."""

from __future__ import annotations

from collections import defaultdict

import torch

from weightgeom.hooks import geometry as geo
from weightgeom.hooks import keys
from weightgeom.hooks.measurement import Measurement, Request, Values


class Spikiness:
    def requests(self, m: Measurement) -> list[Request]:
        return []

    def compute(self, m: Measurement) -> Values:
        out = Values()
        for family, spectra in (("spike_in", m.eig_in), ("spike_out", m.eig_out)):
            groups: dict[tuple[int, bool], list[str]] = defaultdict(list)
            for key, s in spectra.items():
                groups[(s.values.shape[0], s.full)].append(key)
            for (_, full), names in groups.items():
                if full:  # the whole spectrum: every statistic from the eigenvalues, as geometry.spikiness
                    stats = geo.spikiness_batched(torch.stack([spectra[n].values for n in names]), m.k)
                else:
                    stats = _from_traces([spectra[n] for n in names], m.k)
                for stat, values in stats.items():
                    out.add([keys.at(family, n, stat) for n in names], values)
        return out


def _from_traces(spectra, k: int) -> dict[str, torch.Tensor]:
    """top1, topk and pr of wide covariances from their leading eigenvalues, traces and Frobenius norms."""
    top = torch.stack([s.values for s in spectra])
    trace = torch.stack([s.trace for s in spectra])
    fro2 = torch.stack([s.fro2 for s in spectra])
    measured = trace > 0
    zero = torch.zeros_like(trace)
    return {"top1": torch.where(measured, geo._safe_ratio(top[:, 0], trace), zero),
            "topk": torch.where(measured, geo._safe_ratio(top[:, :k].sum(-1), trace), zero),
            "pr": torch.where(measured, geo._safe_ratio(trace.square(), fro2), zero)}
