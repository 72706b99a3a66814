"""Gradient coherence ``coherence/L{i}/{r} = ‖sum_t G_t‖² / sum_t ‖G_t‖²`` over the phase's optimizer
steps (systematic signal vs accumulated noise; T for identical gradients, about 1 for independent).
Opt-in (``instruments.coherence``): the gradient sum is one more fp32 copy of the tracked weights,
held for the whole phase."""

from __future__ import annotations

import torch

from weightgeom.hooks import keys
from weightgeom.hooks.measurement import Measurement, Request, Values


class Coherence:
    def requests(self, m: Measurement) -> list[Request]:
        return []

    def compute(self, m: Measurement) -> Values:
        out = Values()
        names, numerators, denominators = m.upd.coherence_terms()
        if names:
            safe = torch.where(denominators > 0, denominators, torch.ones_like(denominators))
            out.add([keys.at("coherence", n) for n in names], torch.where(denominators > 0, numerators / safe, 0.0))
        return out
