"""Which linear maps of a causal LM play which role (q, k, v, o, gate, up, down).

One table, one row per architecture family. A row says where the transformer blocks live, which
module inside a block computes each role, which *input group* it reads (roles that read the same
tensor share one input covariance), and how to cut a fused matrix into its roles.

Weights are always handed out as PyTorch ``nn.Linear`` orientation ``(out, in)``: GPT-2's ``Conv1D``
stores ``(in, out)`` and is transposed; fused QKV projections are split by output rows.

A row also says what the prediction subspace needs: the final norm's gain convention (Gemma's
RMSNorm scales by ``1 + weight``: ``gain_offset``), whether it is a LayerNorm, and which write roles
pass a norm before the residual add (OLMo2, Gemma2/3: ``post_norms``; docs/metrics.md says what
``rsf_out_pred`` means there). Modules inside the blocks that no role covers (a mixture-of-experts
layer's 3-D expert weights and router) are reported by :func:`untracked_modules`.

To add an architecture, add a row to ``ARCHITECTURES`` (keyed by ``config.model_type``; recipes,
the tiny-model builder and the instruments all read this table) or pass your own ``ArchSpec`` to
:func:`resolve_tracked` (``arch=``). A model whose type has no row gets a mapping inferred from its
module names (:mod:`weightgeom.hooks.fallback_roles`), with a warning naming it and what it leaves out.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from weightgeom.hooks import keys
from weightgeom.hooks.fallback_roles import InferredRoles, infer_roles, uncovered_weights

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

    ``layout="blocks"``: ``[q | k | v]``, each a contiguous block (GPT-2 ``c_attn``, Phi-3 ``qkv_proj``
    and ``gate_up_proj``). The blocks are equal unless ``sizes`` gives their row counts from the
    model's config (Phi-3 under grouped-query attention: ``[heads * hd | kv_heads * hd | kv_heads * hd]``).
    ``layout="heads"``: per head ``[q_h | k_h | v_h]`` (GPT-NeoX ``query_key_value``).
    """

    index: int
    parts: int = 3
    layout: str = "blocks"
    sizes: Callable[[object], tuple[int, ...]] | None = None  # config -> row count of each block

    def rows(self, out_features: int, num_heads: int | None, config: object = None) -> torch.Tensor:
        if self.layout == "blocks":
            sizes = self.block_sizes(out_features, config)
            start = sum(sizes[: self.index])
            return torch.arange(start, start + sizes[self.index])
        if self.layout == "heads":
            if not num_heads:
                raise ValueError("a head-interleaved fused projection needs config.num_attention_heads")
            head_dim = out_features // (self.parts * num_heads)
            per_head = torch.arange(head_dim) + self.index * head_dim
            starts = torch.arange(num_heads) * self.parts * head_dim
            return (starts[:, None] + per_head[None, :]).reshape(-1)
        raise ValueError(f"unknown fused layout {self.layout!r} (expected 'blocks' or 'heads')")

    def block_sizes(self, out_features: int, config: object = None) -> tuple[int, ...]:
        """Row count of each block; they must add up to the fused module's ``out_features``."""
        if self.sizes is None:
            if out_features % self.parts:
                raise ValueError(f"a fused projection with {out_features} rows cannot be cut into {self.parts} "
                                 "equal blocks; give Fused(sizes=...) the block sizes from the config")
            return (out_features // self.parts,) * self.parts
        sizes = tuple(int(n) for n in self.sizes(config))
        if len(sizes) != self.parts or sum(sizes) != out_features:
            raise ValueError(f"fused block sizes {sizes} from the config do not cut {out_features} rows into "
                             f"{self.parts} blocks")
        return sizes


def gqa_qkv_sizes(config) -> tuple[int, int, int]:
    """``[q | k | v]`` row counts of a fused QKV projection under grouped-query attention (Phi-3)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads * head_dim, kv_heads * head_dim, kv_heads * head_dim


@dataclass(frozen=True)
class RoleSpec:
    """Where one role lives inside a block. ``module``: its path, or several paths of which a block has
    one (Qwen2-MoE: a dense layer's ``mlp.gate_proj`` or a sparse layer's ``mlp.shared_expert.gate_proj``).
    ``optional``: a block may have none of them (Qwen3-MoE: only its dense layers have an MLP role);
    otherwise a block without the module is an error (a wrong row should not track silently less)."""

    module: str | tuple[str, ...]
    fused: Fused | None = None
    transposed: bool = False  # Conv1D stores (in, out)
    optional: bool = False

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.module,) if isinstance(self.module, str) else tuple(self.module)


# How a family's HF config names the sizes that `model:` recipes set (weightgeom.core.models builds tiny models
# from these); a family without `num_kv_heads` has no grouped-query attention.
LLAMA_CONFIG_NAMES = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
                      "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
                      "intermediate_size": "intermediate_size", "max_seq_len": "max_position_embeddings"}


@dataclass(frozen=True)
class ArchSpec:
    """One architecture family's row.

    ``layers``: path of the ModuleList of blocks; ``final_norm``, ``unembed``: model-level paths
    (``unembed`` None or absent from a model: no prediction subspace); ``roles``: role -> RoleSpec.
    ``layernorm``: the final norm is a LayerNorm (mean-free output) rather than an RMSNorm.
    ``gain_offset``: every norm of the family multiplies by ``gain_offset + weight`` (Gemma 1, 2, 3: 1.0;
    0.0 elsewhere): the prediction subspace uses that effective gain, and so do the post-norms.
    ``post_norms``: write role -> path inside a block of the norm its output passes before the residual
    add (OLMo2, Gemma2/3); ``rsf_out_pred`` then measures ``diag(g_post) dW`` (docs/metrics.md).
    ``config_names``: how the family's config names the sizes a recipe sets (a tuple: every one of those
    fields gets the size); ``tiny_settings``: further config fields a tiny model built from it sets.
    """

    layers: str
    final_norm: str
    unembed: str | None
    roles: dict[str, RoleSpec]
    layernorm: bool = False
    gain_offset: float = 0.0
    post_norms: dict[str, str] = field(default_factory=dict)
    config_names: dict[str, str | tuple[str, ...]] = field(default_factory=lambda: dict(LLAMA_CONFIG_NAMES))
    tiny_settings: dict[str, object] = field(default_factory=dict)


_ATTENTION = {"q": RoleSpec("self_attn.q_proj"), "k": RoleSpec("self_attn.k_proj"),
              "v": RoleSpec("self_attn.v_proj"), "o": RoleSpec("self_attn.o_proj")}
_GATED_MLP = {"gate": RoleSpec("mlp.gate_proj"), "up": RoleSpec("mlp.up_proj"), "down": RoleSpec("mlp.down_proj")}
_LLAMA = ArchSpec(layers="model.layers", final_norm="model.norm", unembed="lm_head",
                  roles={**_ATTENTION, **_GATED_MLP})
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
# Gemma: Llama's modules; every RMSNorm multiplies by (1 + weight) (weights start at 0), so the
# prediction subspace is that of W_U diag(1 + g). Embeddings are scaled by sqrt(d) on the way in;
# lm_head (tied) uses the unscaled matrix, which is the W_U taken here.
_GEMMA = ArchSpec(layers="model.layers", final_norm="model.norm", unembed="lm_head", gain_offset=1.0,
                  roles={**_ATTENTION, **_GATED_MLP})
# Gemma2/3: o_proj's output passes post_attention_layernorm and down_proj's passes
# post_feedforward_layernorm before the residual add (the MLP's input norm is pre_feedforward_layernorm,
# which needs no entry: inputs are hooked at the module). Gemma3 adds q_norm / k_norm after q_proj /
# k_proj: C_delta of q, k is the gradient at the projection's output, before that norm. The final
# logit soft-cap (cap * tanh(z / cap)) is elementwise and monotone: it changes no direction of W_U.
_GEMMA2 = ArchSpec(
    layers="model.layers", final_norm="model.norm", unembed="lm_head", gain_offset=1.0,
    roles={**_ATTENTION, **_GATED_MLP},
    post_norms={"o": "post_attention_layernorm", "down": "post_feedforward_layernorm"})
# OLMo (1): LayerNorm without affine parameters everywhere (final norm: no gain, mean-free output).
_OLMO = ArchSpec(layers="model.layers", final_norm="model.norm", unembed="lm_head", layernorm=True,
                 roles={**_ATTENTION, **_GATED_MLP})
# OLMo2: no norm before attention or the MLP (q/k/v and gate/up read the residual stream itself);
# post_attention_layernorm / post_feedforward_layernorm follow o_proj / down_proj before the residual
# add; q_norm / k_norm (over the whole projection width) follow q_proj / k_proj.
_OLMO2 = ArchSpec(layers="model.layers", final_norm="model.norm", unembed="lm_head",
                  roles={**_ATTENTION, **_GATED_MLP},
                  post_norms={"o": "post_attention_layernorm", "down": "post_feedforward_layernorm"})
# Phi-3: one qkv_proj, rows [q | k | v] with q wider than k and v under grouped-query attention (the
# sizes come from the config), and one gate_up_proj, rows [gate | up] (equal halves: forward's chunk(2)).
_PHI3 = ArchSpec(
    layers="model.layers", final_norm="model.norm", unembed="lm_head",
    roles={"q": RoleSpec("self_attn.qkv_proj", Fused(0, sizes=gqa_qkv_sizes)),
           "k": RoleSpec("self_attn.qkv_proj", Fused(1, sizes=gqa_qkv_sizes)),
           "v": RoleSpec("self_attn.qkv_proj", Fused(2, sizes=gqa_qkv_sizes)),
           "o": RoleSpec("self_attn.o_proj"),
           "gate": RoleSpec("mlp.gate_up_proj", Fused(0, parts=2)),
           "up": RoleSpec("mlp.gate_up_proj", Fused(1, parts=2)),
           "down": RoleSpec("mlp.down_proj")},
)
# Mixture of experts (transformers 5.x): the routed experts are one module holding 3-D parameters
# (experts x out x in: gate_up_proj, down_proj), applied per expert to the tokens routed to it, and the
# router ("mlp.gate") is a plain weight too: neither is an nn.Linear a role could hook, so both are
# reported untracked. Attention is tracked. Mixtral has no dense MLP.
_MIXTRAL = ArchSpec(layers="model.layers", final_norm="model.norm", unembed="lm_head", roles=dict(_ATTENTION),
                    tiny_settings={"num_local_experts": 4, "num_experts_per_tok": 2})
# Qwen2-MoE: every sparse layer also has a dense shared expert (seen by every token, its output scaled
# per token by sigmoid(shared_expert_gate) before the residual add: a per-token scalar, no direction);
# layers in mlp_only_layers (or off decoder_sparse_step) have a plain dense MLP instead. Either is tracked
# as gate / up / down. The shared expert reads the flattened (B*T, d) tokens.
_QWEN2_MOE = ArchSpec(
    layers="model.layers", final_norm="model.norm", unembed="lm_head",
    roles={**_ATTENTION, **{role: RoleSpec((spec.module, spec.module.replace("mlp.", "mlp.shared_expert.")))
                            for role, spec in _GATED_MLP.items()}},
    config_names={**LLAMA_CONFIG_NAMES, "intermediate_size": ("intermediate_size", "moe_intermediate_size",
                                                              "shared_expert_intermediate_size")},
    tiny_settings={"num_experts": 4, "num_experts_per_tok": 2},
)
# Qwen3-MoE: no shared expert; only the dense layers (mlp_only_layers, decoder_sparse_step) have MLP roles.
_QWEN3_MOE = ArchSpec(
    layers="model.layers", final_norm="model.norm", unembed="lm_head",
    roles={**_ATTENTION, **{role: RoleSpec(spec.module, optional=True) for role, spec in _GATED_MLP.items()}},
    config_names={**LLAMA_CONFIG_NAMES, "intermediate_size": ("intermediate_size", "moe_intermediate_size")},
    tiny_settings={"num_experts": 4, "num_experts_per_tok": 2},
)
# The one list of supported architectures, keyed by ``config.model_type``: the instruments' role
# tables, the model builder (weightgeom.core.models) and the recipe check (model.arch) all read it.
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA, "qwen2": _LLAMA, "mistral": _LLAMA, "qwen3": _LLAMA,
    "gpt2": _GPT2, "gpt_neox": _NEOX,
    "gemma": _GEMMA, "gemma2": _GEMMA2, "gemma3_text": _GEMMA2,
    "olmo": _OLMO, "olmo2": _OLMO2, "phi3": _PHI3,
    "mixtral": _MIXTRAL, "qwen2_moe": _QWEN2_MOE, "qwen3_moe": _QWEN3_MOE,
}


@dataclass
class TrackedMatrix:
    """One role's matrix in one layer, with the module whose input/output the hooks see.

    ``module`` may be a PEFT LoRA wrapper; then :meth:`weight` is the effective
    ``W_base + scale * B @ A`` and the hooks see the wrapper's input and full output.
    ``post_norm``: the norm between this (write-role) matrix's output and the residual add, if any
    (OLMo2, Gemma2/3), whose gain is ``gain_offset + weight``.
    """

    layer: int
    role: str
    module: nn.Module
    rows: torch.Tensor | None = None  # output rows of a fused module, None = all
    transposed: bool = False
    post_norm: nn.Module | None = None
    gain_offset: float = 0.0
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
    def plain(self) -> bool:
        """A whole, untransposed weight with no adapter: its rows are the effective matrix's rows."""
        w = getattr(self.module, "weight", None)
        return (self.rows is None and not self.transposed and _base_layer(self.module) is self.module
                and isinstance(w, torch.Tensor))

    @property
    def plain_fp32(self) -> bool:
        """:attr:`plain` and fp32: ``weight()`` is just a copy of it."""
        return self.plain and self.module.weight.dtype == torch.float32

    @torch.no_grad()
    def lora_factors(self) -> list[tuple[float, torch.Tensor, torch.Tensor]] | None:
        """``[(scale, B (out, r), A (r, in))]`` of every active LoRA adapter, oriented like :meth:`weight`
        (``weight() = W_base + sum scale B A``), as detached live tensors (gathered when sharded); None
        unless the matrix is a LoRA wrapper whose base weight is frozen and whose adapters are plain
        ``nn.Linear`` factors (not DoRA): then the base cancels from every delta and a delta is
        ``sum scale (B A - B0 A0)``, of rank at most twice the adapters' ranks."""
        base = _base_layer(self.module)
        if base is self.module or base.weight.requires_grad:
            return None
        names = _active_adapters(self.module)
        use_dora = getattr(self.module, "use_dora", {}) or {}
        factors = []
        for name in names:
            A, B = self.module.lora_A[name], self.module.lora_B[name]
            if use_dora.get(name) or type(A) is not nn.Linear or type(B) is not nn.Linear:
                return None
            b = full(B.weight.detach())
            b = b if self.rows is None else b.index_select(0, self.rows.to(b.device))
            factors.append((float(self.module.scaling[name]), b, full(A.weight.detach())))
        return factors

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

    @torch.no_grad()
    def post_norm_gain(self) -> torch.Tensor | None:
        """The post-norm's effective gain ``gain_offset + weight`` (out,), fp32 (gathered when sharded),
        or None when the output reaches the residual stream directly (or the norm has no weight)."""
        w = getattr(self.post_norm, "weight", None)
        if w is None:
            return None
        g = full(w.detach()).to(torch.float32, copy=True) + self.gain_offset
        return g if self.rows is None else g.index_select(0, self.rows.to(g.device))

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


# Mappings inferred for models whose type has no row, one per model object: inferred (and warned about) once.
_INFERRED: weakref.WeakKeyDictionary[nn.Module, ArchSpec] = weakref.WeakKeyDictionary()


class InferredRolesWarning(UserWarning):
    """A model's roles were inferred from its module names (no row in ARCHITECTURES): check the mapping."""


def arch_spec_for(model: nn.Module, arch: ArchSpec | str | None = None) -> ArchSpec:
    """The row for ``arch`` (an ArchSpec, or a key of ARCHITECTURES), else for the model's
    ``config.model_type``; a type without a row gets the mapping inferred from its module names (warned
    about once per model). Raises ValueError when there is no row and nothing sensible is found."""
    if isinstance(arch, ArchSpec):
        return arch
    base = unwrap_model(model)
    model_type = arch or getattr(getattr(base, "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    if arch is None:
        spec = _INFERRED.get(base)
        if spec is None:
            inferred = infer_roles(base)
            if inferred is not None:
                spec = _INFERRED[base] = _spec_from_inferred(inferred)
                warnings.warn(_describe_inferred(base, model_type, inferred, spec), InferredRolesWarning,
                              stacklevel=2)
        if spec is not None:
            return spec
    raise ValueError(
        f"no role table for architecture {model_type!r}; known: {sorted(ARCHITECTURES)}. "
        "Add a row to weightgeom.hooks.roles.ARCHITECTURES (an ArchSpec naming the block list, final norm, "
        "unembedding and each role's module path inside a block), or pass arch=ArchSpec(...). "
        "(No mapping could be inferred from its module names either: that needs a ModuleList of blocks with "
        "recognisable q_proj/o_proj/fc1/... linear layers and a final norm beside it.)"
    )


def _spec_from_inferred(found: InferredRoles) -> ArchSpec:
    roles = {role: RoleSpec(paths[0] if len(paths) == 1 else paths, transposed=role in found.transposed,
                            optional=role in found.optional)
             for role, paths in found.roles.items()}
    return ArchSpec(layers=found.layers, final_norm=found.final_norm, unembed=found.unembed, roles=roles,
                    layernorm=found.layernorm, config_names={})


def _describe_inferred(base: nn.Module, model_type: str | None, found: InferredRoles, spec: ArchSpec) -> str:
    """The warning: the mapping chosen, and every weight it leaves untracked."""
    roles = ", ".join(f"{role}={'|'.join(found.roles[role])}{' (some layers)' if role in found.optional else ''}"
                      for role in ROLES if role in found.roles)
    kind = "LayerNorm" if found.layernorm else "RMSNorm"
    norm = f"{found.final_norm} ({found.norm_type}, taken as {kind}, gain = weight)"
    left = untracked_modules(base, spec)
    return (f"no role table for architecture {model_type!r} ({type(base).__name__}): roles inferred from module "
            f"names: blocks {found.layers}, {roles}; final norm {norm}; unembedding {found.unembed or 'none'}. "
            f"Left untracked: {'; '.join(left) if left else 'nothing'}. Check this mapping, or add a row to "
            "weightgeom.hooks.roles.ARCHITECTURES.")


def resolve_tracked(model: nn.Module, roles: tuple[str, ...] | list[str] = ROLES,
                    arch: ArchSpec | str | None = None,
                    layers: list[int] | None = None) -> list[TrackedMatrix]:
    """Find every (layer, role) matrix of ``model``; roles the architecture lacks (GPT-2 has no
    gate), or a layer lacks (an optional role: a sparse MoE layer's MLP), are skipped. ``layers=None``
    tracks all layers."""
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)} in instruments.roles; valid roles: {list(ROLES)}")
    spec = arch_spec_for(model, arch)
    base = unwrap_model(model)
    blocks = base.get_submodule(spec.layers)
    config = getattr(base, "config", None)
    num_heads = getattr(config, "num_attention_heads", None)
    chosen = range(len(blocks)) if layers is None else layers
    tracked = []
    for i in chosen:
        if not 0 <= i < len(blocks):
            raise ValueError(f"instruments.layers has {i}, but the model has {len(blocks)} layers")
        for role in roles:
            if role not in spec.roles:
                continue
            rs = spec.roles[role]
            module = _role_module(blocks[i], rs)
            if module is None:
                if rs.optional:
                    continue
                raise ValueError(f"layer {i} of {type(base).__name__} has no module {' or '.join(rs.paths)} for "
                                 f"role {role!r}: the architecture's row in weightgeom.hooks.roles does not fit it")
            rows = None
            if rs.fused is not None:
                w = _base_layer(module).weight
                out_features = w.shape[1] if rs.transposed else w.shape[0]
                rows = rs.fused.rows(out_features, num_heads, config)
            post = blocks[i].get_submodule(spec.post_norms[role]) if role in spec.post_norms else None
            tracked.append(TrackedMatrix(i, role, module, rows, rs.transposed, post, spec.gain_offset))
    return tracked


def _role_module(block: nn.Module, rs: RoleSpec) -> nn.Module | None:
    """The first of the role's paths that ``block`` has."""
    for path in rs.paths:
        try:
            return block.get_submodule(path)
        except AttributeError:
            continue
    return None


def untracked_modules(model: nn.Module, arch: ArchSpec | str | None = None) -> list[str]:
    """What no role of the row covers: one line per module (path inside a block, or at model level) that
    holds a weight of two or more dimensions, with its type, shapes and the layers it is in (a MoE
    layer's 3-D experts and router, a fused QKV the fallback does not split, a reward model's ``score``).
    Embeddings, norms and the unembedding are not counted."""
    spec = arch_spec_for(model, arch)
    base = unwrap_model(model)
    covered = {p for rs in spec.roles.values() for p in rs.paths}
    blocks = base.get_submodule(spec.layers)
    outside = {spec.layers, spec.unembed or ""}
    lines = uncovered_weights(list(blocks), covered)
    lines += [f"{line} (outside the blocks)" for line in uncovered_weights([base], outside, skip_embeddings=True)]
    return lines


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


def unembedding(model: nn.Module, arch: ArchSpec | str | None = None,
                copy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """``(W_U (vocab, d), final-norm gain (d,) or None, layernorm)`` as whole fp32 copies (gathered
    when the model is sharded: a collective). The gain is the effective one, ``gain_offset + weight``
    (Gemma's RMSNorm: ``1 + weight``); None for a norm without affine parameters (OLMo). Raises
    :class:`NoUnembedding` when the model has none (check with :func:`has_unembedding`). ``copy=False``:
    ``W_U`` is the live detached weight itself when it is an unsharded fp32 tensor (a vocab x d copy saved;
    never write to it)."""
    spec = arch_spec_for(model, arch)
    base = unwrap_model(model)
    head = _unembedding_module(base, spec)
    if head is None:
        raise NoUnembedding(f"{type(base).__name__} has no unembedding module {spec.unembed!r} (a reward or "
                            "classification model?): there is no prediction subspace to measure against")
    head = _base_layer(head)
    norm = base.get_submodule(spec.final_norm)
    gain = getattr(norm, "weight", None)
    if gain is not None:
        gain = full(gain.detach()).float().clone() + spec.gain_offset  # Gemma: 1 + weight
    W = full(head.weight.detach()).float()  # float() of an fp32 tensor is that tensor: no copy
    return (W.clone() if copy else W), gain, spec.layernorm
