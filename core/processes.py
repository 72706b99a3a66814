"""Which process this is under ``torchrun`` / ``accelerate launch``, steps that only the main
process may take (creating a run directory, writing a report), and whether a process still runs.

The trainers' ``Accelerator`` sets the process group up; a pipeline needs it earlier, to create its
run directory once, so it asks for accelerate's ``PartialState`` here (the state every
``Accelerator`` of the run then shares). Without a launcher everything is one process.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from accelerate import PartialState

T = TypeVar("T")


def process_state() -> PartialState:
    """The run's process state (created on first use; on the CPU when no GPU is present, so that
    ``torchrun`` processes train together over gloo)."""
    return PartialState(cpu=not torch.cuda.is_available())


def on_main(fn: Callable[..., T], *args, **kwargs) -> T | None:
    """``fn(*args, **kwargs)`` on the main process only; the others wait for it. If it raises, every
    process raises the same error (instead of the others waiting at a barrier until a timeout)."""
    state = process_state()
    result, error = None, None
    if state.is_main_process:
        try:
            result = fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 (re-raised below, on every process)
            error = err
    if state.num_processes > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise error
    return result


def main_print(*args, **kwargs) -> None:
    """``print`` on the main process only (N processes would print every line N times)."""
    if process_state().is_main_process:
        print(*args, **kwargs)


def refuse_deepspeed(enabled: bool) -> None:
    """One line instead of wrong numbers: ZeRO-3 partitions the weights (an empty placeholder outside its
    own forward, so no delta can be read) and ZeRO-1/2 replace the torch optimizer whose step hooks take
    the update and the gradient; DeepSpeed cannot be run on the machines this project is tested on, so
    no path through it is claimed. FSDP2 shards weights as ``DTensor`` rows, which the instruments read."""
    if enabled:
        raise RuntimeError("weightgeom: DeepSpeed is not supported by the instruments (ZeRO-3 partitions the weights, "
                           "ZeRO-1/2 replace the optimizer they hook); shard with FSDP2 instead (accelerate's FSDP "
                           "plugin with fsdp_version: 2, or train.fsdp: true in a recipe)")


def pid_alive(pid: int) -> bool:
    """Whether a process with id ``pid`` runs on this machine (another user's counts: signalling it is
    refused, not unknown). Tells a killed writer's leftovers from a concurrent writer's work in progress."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
