"""The one interface every instrument implements, with guaranteed hook removal."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch
from torch import nn


class Instrument(ABC):
    """An accumulator that rides along with training.

    Lifecycle: ``attach(model, optimizer)`` registers hooks; training runs; ``detach()`` removes every
    hook (``with instrument.attached(model):`` does both, also when training raises). ``state_dict()``
    is a flat ``dict[str, Tensor]`` of *sums and counts* (never means), so resuming and summing across
    processes are exact. ``reset()`` starts a new phase (new reference weights, empty sums).
    Instruments only accumulate; the metrics computed from their state live in ``hooks/quantities``.
    """

    def __init__(self) -> None:
        self._handles: list = []

    @abstractmethod
    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None: ...

    def detach(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    @property
    def is_attached(self) -> bool:
        return bool(self._handles)

    @contextlib.contextmanager
    def attached(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Iterator:
        """Hooks registered for the ``with`` block and removed on exit, also when training raises."""
        try:
            self.attach(model, optimizer)
            yield self
        finally:
            self.detach()

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    @abstractmethod
    def reset(self) -> None: ...
