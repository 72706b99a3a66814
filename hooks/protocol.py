"""The one interface a trainer sees of the instruments: :class:`Suite`.

``hooks.suite.InstrumentSuite`` measures; ``hooks.suite.NullSuite`` (``instruments.enabled: false``)
does nothing behind the same methods, so a loop never branches on whether instruments are on. Both
are checked against this protocol (tests/hooks/test_protocol.py): a method added here and missing
from either suite fails the tests. The call order a trainer follows::

    with suite.attached(model, optimizer):               # hooks removed on exit, also on error
        for step in range(1, steps + 1):
            suite.set_loss_normalizer(n)                 # before backward: what the loss was divided by
            loss.backward()
            suite.before_optimizer_step(step, force=step == steps)  # whether this step's metrics are due
            optimizer.step()
            metrics = suite.after_optimizer_step(step, force=step == steps)  # a dict when due, else None
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Suite(Protocol):
    """Attach, step bookkeeping, metrics, the divergence guard's checks, and state.

    ``skipped``: what the instruments cannot measure on this model, one human-readable line each (a
    reward model has no unembedding, so no prediction subspace); empty when nothing is skipped."""

    skipped: list[str]

    # ----- lifecycle
    def attach(self, model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None) -> None: ...
    def detach(self) -> None: ...
    def attached(self, model: nn.Module | None = None,
                 optimizer: torch.optim.Optimizer | None = None) -> contextlib.AbstractContextManager: ...

    # ----- one optimizer step
    def set_loss_normalizer(self, n: float) -> None: ...
    def before_optimizer_step(self, step: int | None = None, force: bool = False) -> None: ...
    def after_optimizer_step(self, step: int, force: bool = False) -> dict[str, float] | None: ...
    def compute(self, step: int, full: bool = False, live_grads: bool = False) -> dict[str, float]: ...

    # ----- the divergence guard
    def statistics_finite(self) -> torch.Tensor | None: ...
    def nonfinite_statistics(self) -> list[str]: ...
    def covariance_state(self) -> dict[str, torch.Tensor]: ...
    def restore_covariance(self, state: dict[str, torch.Tensor]) -> None: ...

    # ----- state
    def state_dict(self) -> dict[str, torch.Tensor]: ...
    def snapshot_state(self) -> dict[str, torch.Tensor]: ...
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...
    def save(self, path: str | Path, state: dict[str, torch.Tensor] | None = None) -> None: ...
