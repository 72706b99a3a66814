"""Summing instrument state across processes.

Instruments keep *local* sums and counts (what this process saw). Metrics and snapshots use the
global view: a copy all-reduced with SUM, so a 2-process run reports the same covariances as one
process that saw both shards. Local state is never modified, so calling this repeatedly is safe.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce_sums(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return a copy of ``state`` with every tensor summed over all processes (sorted key order,
    so every rank issues the same collectives)."""
    if world_size() == 1:
        return state
    out = {}
    for key in sorted(state):
        t = state[key].clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        out[key] = t
    return out
