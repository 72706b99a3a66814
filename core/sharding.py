"""Fully sharded data parallel (FSDP2, ``torch.distributed.fsdp.fully_shard``) for our training loops.

``train.fsdp: true`` shards the model over the run's processes, one unit per transformer block plus
the root (embedding, final norm, unembedding), on the CPU (gloo) as on GPUs (nccl): each process holds
1 / processes of every weight, and the gradients are reduce-scattered (averaged, as under DDP).
``accelerate launch`` with an FSDP config does the same sharding itself on GPUs (it refuses FSDP on
the CPU); the checkpoints below work for both.

Checkpoints hold whole tensors: the model as a plain HF directory and the optimizer's state with whole
per-parameter tensors, gathered at save time (a collective). A sharded run therefore resumes with any
number of processes, and its checkpoints load anywhere. Memory at save time: one whole copy of the
optimizer state on every process, transiently (moved to the CPU).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from weightgeom.hooks.roles import arch_spec_for, unwrap_model


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is an FSDP2 shard (a ``DTensor``)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard ``model`` in place over all processes: each transformer block (the architecture's
    ``layers`` list in hooks/roles.py) is one unit, the rest of the model the root unit. With one
    process there is nothing to shard and the model is returned as it is."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return model
    model.to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in unwrap_model(model).get_submodule(arch_spec_for(model).layers):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def whole_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with whole tensors on the CPU, on the main process (a collective; the
    other processes get an empty dict)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def whole_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with each sharded state tensor gathered whole, on the CPU (a
    collective: every process calls it, in the same order)."""
    state = optimizer.state_dict()
    whole = {i: {k: (v.full_tensor().cpu() if isinstance(v, DTensor) else v) for k, v in per_param.items()}
             for i, per_param in state["state"].items()}
    return {"state": whole, "param_groups": state["param_groups"]}


def local_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A whole optimizer state (:func:`whole_optimizer_state`, or any process count's) cut to this
    process's shards of ``optimizer``'s parameters, ready for ``optimizer.load_state_dict``."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def cut(param: torch.Tensor, value):
        if isinstance(param, DTensor) and isinstance(value, torch.Tensor) and value.shape == param.shape:
            return distribute_tensor(value.to(param.device_mesh.device_type), param.device_mesh, param.placements,
                                     src_data_rank=None)
        return value

    return {"state": {i: {k: cut(params[i], v) for k, v in per_param.items()}
                      for i, per_param in state["state"].items()},
            "param_groups": state["param_groups"]}
