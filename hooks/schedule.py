"""When an instrument's metrics are computed: every n steps, or at log-spaced steps."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """``every_n``: steps n, 2n, 3n, ...; ``log_spaced``: additionally steps 1, 2, 4, 8, ... (and
    ``points_per_octave`` points between powers of two), so early training, where geometry moves
    fastest, is sampled densely. Step 0 never fires: there is no update yet."""

    every_n: int
    log_spaced: bool = False
    points_per_octave: int = 1

    def __post_init__(self) -> None:
        if self.every_n < 1:
            raise ValueError(f"instruments.every_n must be >= 1, got {self.every_n}")
        if self.points_per_octave < 1:
            raise ValueError(f"instruments.points_per_octave must be >= 1, got {self.points_per_octave}")

    def __call__(self, step: int) -> bool:
        if step <= 0:
            return False
        if step % self.every_n == 0:
            return True
        return self.log_spaced and step in _log_steps(step, self.points_per_octave)


def _log_steps(upto: int, per_octave: int) -> set[int]:
    octaves = math.log2(max(upto, 1))
    n = int(octaves * per_octave) + 1
    return {round(2 ** (i / per_octave)) for i in range(n + 1)}
