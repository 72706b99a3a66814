"""Which linear maps of a causal LM play which role (q, k, v, o, gate, up, down).

One table, one row per architecture family. A row says where the transformer blocks live, which
module inside a block computes each role, which *input group* it reads (roles that read the same
tensor share one input covariance), and how to cut a fused matrix into its roles.

Weights are always handed out as PyTorch ``nn.Linear`` orientation ``(out, in)``: GPT-2's ``Conv1D``
stores ``(in, out)`` and is transposed; fused QKV projections are split by output rows.

To add an architecture, add a row to ``ARCHITECTURES`` (keyed by ``config.model_type``; recipes,
the tiny-model builder and the instruments all read this table) or pass your own ``ArchSpec`` to
:func:`resolve_tracked` (``arch=``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from weightgeom.hooks import keys

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
# Input groups: the tensor each role reads. Q/K/V read the attention norm's output; gate/up read
# the MLP norm's output; o reads the mixed heads; down reads the MLP's hidden activation.
GROUP_OF_ROLE = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "o_in",
                 "gate": "mlp_in", "up": "mlp_in", "down": "down_in"}
# Roles whose output is written into the residual stream (the write pathway).
WRITE_ROLES = ("o", "down")
# Roles whose input side the paper reads: the read pathway (q, k) and its comparisons (v, gate, up).
# o and down are write-pathway matrices (their output side matters); their inputs are left out
# by default, which also skips the widest covariance (down reads d_ff).
DEFAULT_INPUT_ROLES = ("q", "k", "v", "gate", "up")


@dataclass(frozen=True)
class Fused:
    """How a role's output rows sit inside a fused projection of ``parts`` roles.

    ``layout="blocks"``: ``[q | k | v]``, each a contiguous block (GPT-2 ``c_attn``).
    ``layout="heads"``: per head ``[q_h | k_h | v_h]`` (GPT-NeoX ``query_key_value``).
    """

    index: int
    parts: int = 3
    layout: str = "blocks"

    def rows(self, out_features: int, num_heads: int) -> torch.Tensor:
        if self.layout == "blocks":
            size = out_features // self.parts
            return torch.arange(self.index * size, (self.index + 1) * size)
        if self.layout == "heads":
            head_dim = out_features // (self.parts * num_heads)
            per_head = torch.arange(head_dim) + self.index * head_dim
            starts = torch.arange(num_heads) * self.parts * head_dim
            return (starts[:, None] + per_head[None, :]).reshape(-1)
        raise ValueError(f"unknown fused layout {self.layout!r} (expected 'blocks' or 'heads')")


@dataclass(frozen=True)
class RoleSpec:
    module: str  # path inside one transformer block
    fused: Fused | None = None
    transposed: bool = False  # Conv1D stores (in, out)


# How a family's HF config names the sizes that `model:` recipes set (weightgeom.core.models builds tiny models
# from these); a family without `num_kv_heads` has no grouped-query attention.
LLAMA_CONFIG_NAMES = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
                      "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
                      "intermediate_size": "intermediate_size", "max_seq_len": "max_position_embeddings"}


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # path of the ModuleList of blocks
    final_norm: str
    unembed: str
    roles: dict[str, RoleSpec]
    layernorm: bool = False  # LayerNorm (mean-free outputs) vs RMSNorm
    config_names: dict[str, str] = field(default_factory=lambda: dict(LLAMA_CONFIG_NAMES))


_LLAMA = ArchSpec(
    layers="model.layers", final_norm="model.norm", unembed="lm_head",
    roles={"q": RoleSpec("self_attn.q_proj"), "k": RoleSpec("self_attn.k_proj"),
           "v": RoleSpec("self_attn.v_proj"), "o": RoleSpec("self_attn.o_proj"),
           "gate": RoleSpec("mlp.gate_proj"), "up": RoleSpec("mlp.up_proj"),
           "down": RoleSpec("mlp.down_proj")},
)
_GPT2 = ArchSpec(
    layers="transformer.h", final_norm="transformer.ln_f", unembed="lm_head", layernorm=True,
    roles={"q": RoleSpec("attn.c_attn", Fused(0), transposed=True),
           "k": RoleSpec("attn.c_attn", Fused(1), transposed=True),
           "v": RoleSpec("attn.c_attn", Fused(2), transposed=True),
           "o": RoleSpec("attn.c_proj", transposed=True),
           "up": RoleSpec("mlp.c_fc", transposed=True),
           "down": RoleSpec("mlp.c_proj", transposed=True)},
    config_names={"hidden_size": "n_embd", "num_layers": "n_layer", "num_heads": "n_head",
                  "intermediate_size": "n_inner", "max_seq_len": "n_positions"},
)
_NEOX = ArchSpec(
    layers="gpt_neox.layers", final_norm="gpt_neox.final_layer_norm", unembed="lm_head", layernorm=True,
    roles={"q": RoleSpec("attention.query_key_value", Fused(0, layout="heads")),
           "k": RoleSpec("attention.query_key_value", Fused(1, layout="heads")),
           "v": RoleSpec("attention.query_key_value", Fused(2, layout="heads")),
           "o": RoleSpec("attention.dense"),
           "up": RoleSpec("mlp.dense_h_to_4h"),
           "down": RoleSpec("mlp.dense_4h_to_h")},
    config_names={k: v for k, v in LLAMA_CONFIG_NAMES.items() if k != "num_kv_heads"},
)
# The one list of supported architectures, keyed by ``config.model_type``: the instruments' role
# tables, the model builder (weightgeom.core.models) and the recipe check (model.arch) all read it.
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA, "qwen2": _LLAMA, "mistral": _LLAMA, "qwen3": _LLAMA,
    "gpt2": _GPT2, "gpt_neox": _NEOX,
}


@dataclass
class TrackedMatrix:
    """One role's matrix in one layer, with the module whose input/output the hooks see.

    ``module`` may be a PEFT LoRA wrapper; then :meth:`weight` is the effective
    ``W_base + scale * B @ A`` and the hooks see the wrapper's input and full output.
    """

    layer: int
    role: str
    module: nn.Module
    rows: torch.Tensor | None = None  # output rows of a fused module, None = all
    transposed: bool = False
    group: str = field(init=False)

    def __post_init__(self) -> None:
        self.group = GROUP_OF_ROLE[self.role]

    @property
    def key(self) -> str:
        return keys.matrix_key(self.layer, self.role)

    @property
    def group_key(self) -> str:
        return keys.matrix_key(self.layer, self.group)

    @property
    def plain_fp32(self) -> bool:
        """A whole, untransposed fp32 weight with no adapter: ``weight()`` is just a copy of it."""
        w = getattr(self.module, "weight", None)
        return (self.rows is None and not self.transposed and _base_layer(self.module) is self.module
                and isinstance(w, torch.Tensor) and w.dtype == torch.float32)

    @property
    def sharded(self) -> bool:
        """The weight is an FSDP2 shard (a ``DTensor``): this process holds some of its rows."""
        return isinstance(_base_layer(self.module).weight, DTensor)

    def _orient(self, w: torch.Tensor) -> torch.Tensor:
        w = w.t() if self.transposed else w
        return w if self.rows is None else w.index_select(0, self.rows.to(w.device))

    @torch.no_grad()
    def weight(self) -> torch.Tensor:
        """Effective weight, fp32, shape (out, in); a sharded weight is gathered (a collective: every
        process calls it)."""
        base = _base_layer(self.module)
        w = full(base.weight.detach()).to(torch.float32, copy=True)  # never alias the live parameter
        if base is not self.module:  # PEFT LoRA: add every active adapter's delta
            for name in _active_adapters(self.module):
                w = w + full(self.module.get_delta_weight(name).detach()).float()
        return self._orient(w)

    def grad(self) -> torch.Tensor | None:
        """Raw gradient of the weight, fp32, shape (out, in); None when the weight is frozen
        (LoRA: the effective weight's gradient is never materialised by autograd). Gathered when sharded."""
        g = _base_layer(self.module).weight.grad
        return None if g is None else self._orient(full(g.detach()).to(torch.float32, copy=True))

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """The whole (out, in) matrix from this process's rows ``local`` of a sharded plain weight (a
        collective); ``local`` itself when the weight is not sharded."""
        w = _base_layer(self.module).weight
        if not isinstance(w, DTensor):
            return local
        return DTensor.from_local(local, w.device_mesh, w.placements, shape=w.shape, stride=w.stride()).full_tensor()

    def scatter(self, whole: torch.Tensor) -> torch.Tensor:
        """This process's rows of ``whole`` (out, in), as the live sharded weight holds them (no
        communication); ``whole`` itself when the weight is not sharded."""
        w = _base_layer(self.module).weight
        if not isinstance(w, DTensor):
            return whole
        whole = whole.detach().to(w.device_mesh.device_type)
        return distribute_tensor(whole, w.device_mesh, w.placements, src_data_rank=None).to_local()


def full(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a whole tensor: a sharded ``DTensor`` is gathered (a collective), others pass through."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t`` (its shard of a ``DTensor``; ``t`` itself otherwise)."""
    return t.to_local() if isinstance(t, DTensor) else t


def _base_layer(module: nn.Module) -> nn.Module:
    return getattr(module, "base_layer", module)


def _active_adapters(module: nn.Module) -> list[str]:
    names = getattr(module, "active_adapters", None) or []
    if isinstance(names, str):
        names = [names]
    return [n for n in names if n in getattr(module, "lora_A", {})]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model under PEFT / DDP / accelerate wrappers."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def arch_spec_for(model: nn.Module, arch: ArchSpec | str | None = None) -> ArchSpec:
    if isinstance(arch, ArchSpec):
        return arch
    model_type = arch or getattr(getattr(unwrap_model(model), "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"no role table for architecture {model_type!r}; known: {sorted(ARCHITECTURES)}. "
            "Add a row to weightgeom.hooks.roles.ARCHITECTURES (an ArchSpec naming the block list, final norm, "
            "unembedding and each role's module path inside a block), or pass arch=ArchSpec(...)."
        )
    return ARCHITECTURES[model_type]


def resolve_tracked(model: nn.Module, roles: tuple[str, ...] | list[str] = ROLES,
                    arch: ArchSpec | str | None = None,
                    layers: list[int] | None = None) -> list[TrackedMatrix]:
    """Find every (layer, role) matrix of ``model``; roles the architecture lacks (GPT-2 has no
    gate) are skipped. ``layers=None`` tracks all layers."""
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)} in instruments.roles; valid roles: {list(ROLES)}")
    spec = arch_spec_for(model, arch)
    base = unwrap_model(model)
    blocks = base.get_submodule(spec.layers)
    num_heads = base.config.num_attention_heads
    chosen = range(len(blocks)) if layers is None else layers
    tracked = []
    for i in chosen:
        if not 0 <= i < len(blocks):
            raise ValueError(f"instruments.layers has {i}, but the model has {len(blocks)} layers")
        for role in roles:
            if role not in spec.roles:
                continue
            rs = spec.roles[role]
            module = blocks[i].get_submodule(rs.module)
            rows = None
            if rs.fused is not None:
                w = _base_layer(module).weight
                out_features = w.shape[1] if rs.transposed else w.shape[0]
                rows = rs.fused.rows(out_features, num_heads)
            tracked.append(TrackedMatrix(i, role, module, rows, rs.transposed))
    return tracked


class NoUnembedding(ValueError):
    """The model has no unembedding module (e.g. a reward model's ``score`` head instead of ``lm_head``)."""


def has_unembedding(model: nn.Module, arch: ArchSpec | str | None = None) -> bool:
    """Whether the model has the unembedding its role table names: a sequence-classification model
    (a reward model) built on a causal LM's body has the blocks and the final norm but no ``lm_head``."""
    return _unembedding_module(unwrap_model(model), arch_spec_for(model, arch)) is not None


def _unembedding_module(base: nn.Module, spec: ArchSpec) -> nn.Module | None:
    if not spec.unembed:
        return None
    try:
        return base.get_submodule(spec.unembed)
    except AttributeError:
        return None


def unembedding(model: nn.Module, arch: ArchSpec | str | None = None) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """``(W_U (vocab, d), final-norm gain (d,) or None, layernorm)`` as whole fp32 copies (gathered
    when the model is sharded: a collective). Raises :class:`NoUnembedding` when the model has none
    (check with :func:`has_unembedding`)."""
    spec = arch_spec_for(model, arch)
    base = unwrap_model(model)
    head = _unembedding_module(base, spec)
    if head is None:
        raise NoUnembedding(f"{type(base).__name__} has no unembedding module {spec.unembed!r} (a reward or "
                            "classification model?): there is no prediction subspace to measure against")
    head = _base_layer(head)
    norm = base.get_submodule(spec.final_norm)
    gain = getattr(norm, "weight", None)
    return (full(head.weight.detach()).float().clone(),
            None if gain is None else full(gain.detach()).float().clone(), spec.layernorm)
