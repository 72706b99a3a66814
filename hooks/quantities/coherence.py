"""Gradient coherence ``coherence/L{i}/{r} = ‖sum_t G_t‖² / sum_t ‖G_t‖²`` over the phase's optimizer
steps (systematic signal vs accumulated noise; T for identical gradients, about 1 for independent)."""

from __future__ import annotations

from hooks import geometry as geo
from hooks.measurement import Measurement


class Coherence:
    def compute(self, m: Measurement) -> dict[str, float]:
        return {f"coherence/{key}": geo.coherence(m.upd.grad_sum[key], m.upd.grad_sq[key]) for key in m.upd.grad_sum}
