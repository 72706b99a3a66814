"""The one interface every instrument implements, and the context that guarantees hook removal."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch
from torch import nn

from hooks.schedule import Schedule


class Instrument(ABC):
    """A measurement that rides along with training.

    Lifecycle: ``attach(model, optimizer)`` registers hooks; training runs; ``should_run(step)``
    says whether ``compute(step)`` is due; ``detach()`` removes every hook. ``state_dict()`` is a
    flat ``dict[str, Tensor]`` of *sums and counts* (never means), so resuming and summing across
    processes are exact. ``reset()`` starts a new phase (new reference weights, empty sums).
    """

    name: str = "instrument"

    def __init__(self, schedule: Schedule | None = None) -> None:
        self.schedule = schedule or Schedule()
        self._handles: list = []

    @abstractmethod
    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None: ...

    def detach(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def should_run(self, step: int) -> bool:
        return self.schedule(step)

    @abstractmethod
    def compute(self, step: int) -> dict[str, float]: ...

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    @abstractmethod
    def reset(self) -> None: ...


@contextlib.contextmanager
def instrumented(model: nn.Module, instruments, optimizer=None) -> Iterator:
    """Attach ``instruments`` (one or a list) for the duration of a ``with`` block; every hook is
    removed on exit, also when training raises."""
    items = instruments if isinstance(instruments, (list, tuple)) else [instruments]
    try:
        for inst in items:
            inst.attach(model, optimizer)
        yield instruments
    finally:
        for inst in items:
            inst.detach()
