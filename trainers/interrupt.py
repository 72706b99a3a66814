"""SIGTERM / SIGINT during training: finish the step in flight, save a checkpoint, exit cleanly.

:class:`StopSignals` is a context manager that, in the main thread, replaces the handlers of
SIGTERM and SIGINT with one that only records the signal; the training loop polls
:attr:`StopSignals.received` between steps, writes a checkpoint and raises :class:`Interrupted`.
A second signal of the same kind while the first is being handled restores the default behaviour
and re-delivers it (so a second Ctrl-C stops at once, without a checkpoint). Outside the main
thread (where Python cannot install handlers) it does nothing.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    """A run stopped on a signal. ``checkpoint``: what was saved (None: nothing new, e.g. a TRL
    objective, which restarts on resume); ``exit_code``: the conventional ``128 + signal``."""

    def __init__(self, signum: int, step: int | None, checkpoint: Path | None, phase: str, note: str = "") -> None:
        self.signum, self.step, self.checkpoint, self.phase = signum, step, checkpoint, phase
        name = signal.Signals(signum).name
        at = f" after step {step}" if step is not None else ""
        saved = f"; checkpoint saved: {checkpoint}" if checkpoint is not None else ""
        super().__init__(f"{phase}: stopped by {name}{at}{saved}{note}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """Records SIGTERM/SIGINT instead of dying (see the module docstring)."""

    def __init__(self, phase: str = "training") -> None:
        self.phase = phase
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.received == signum:  # the second one: give up on the checkpoint
            signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        print(f"\n[harness] {signal.Signals(signum).name} received: {self.phase} stops after the current step and "
              "saves a checkpoint (send it again to stop at once, without one)", file=sys.stderr, flush=True)
