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


def broadcast_bytes(data: bytes, size: int) -> bytes:
    """``data`` (``size`` bytes) from process 0 on every process (identity without torch.distributed)."""
    if world_size() == 1:
        return data
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    t = torch.zeros(size, dtype=torch.uint8, device=device)
    if rank() == 0:
        t.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(t, src=0)
    return bytes(t.cpu().tolist())
