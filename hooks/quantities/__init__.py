"""Metric quantities: one small class per family of streamed metrics (as Cockpit keeps one per quantity).

A quantity declares what it needs of each tracked matrix (``requests(measurement)``: a basis and the
views to read along it, see :class:`weightgeom.hooks.measurement.Request`; the measurement then reads
every matrix once for all quantities), then reads a :class:`weightgeom.hooks.measurement.Measurement`
and returns a :class:`weightgeom.hooks.measurement.Values` (metric tensors on the instruments' device,
synchronised with the host once per computation). To add a metric, write a class with
``requests(measurement) -> list[Request]`` and ``compute(measurement) -> Values`` in a new file here, add it to
:data:`DEFAULT_QUANTITIES` (or pass ``quantities=`` to the suite) and list its keys in
docs/architecture.md. Keys are built with ``weightgeom.hooks.keys``.
"""

from __future__ import annotations

from typing import Protocol

from weightgeom.hooks.measurement import Measurement, Request, Values
from weightgeom.hooks.quantities.coherence import Coherence
from weightgeom.hooks.quantities.prediction_mass import PredictionMass
from weightgeom.hooks.quantities.rsf import DeltaRSF, InputRSF, PredictionRSF
from weightgeom.hooks.quantities.spikiness import Spikiness
from weightgeom.hooks.quantities.subspace_error import SubspaceError


class Quantity(Protocol):
    def requests(self, m: Measurement) -> list[Request]: ...
    def compute(self, m: Measurement) -> Values: ...


DEFAULT_QUANTITIES: tuple[Quantity, ...] = (InputRSF(), PredictionRSF(), DeltaRSF(), Spikiness(), Coherence(),
                                            SubspaceError(), PredictionMass())

__all__ = ["DEFAULT_QUANTITIES", "Coherence", "DeltaRSF", "InputRSF", "PredictionMass", "PredictionRSF", "Quantity",
           "Spikiness", "SubspaceError"]
