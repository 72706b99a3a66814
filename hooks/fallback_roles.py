"""The generic fallback for a causal LM whose ``model_type`` has no row in the role table: the roles
inferred from module names.

What it looks for (:func:`infer_roles`):

- the blocks: the ``nn.ModuleList`` of same-type modules holding the most linear layers;
- in each block, linear layers (``nn.Linear``, GPT-2 style ``Conv1D``, or a PEFT wrapper of one) whose
  name says their role. Some names say it anywhere (``q_proj``, ``o_proj``, ``gate_proj``, ``fc1``,
  ``c_fc``, ``dense_h_to_4h``...); others only by where they sit: ``query`` / ``key`` / ``value`` /
  ``dense`` / ``out_proj`` / ``c_proj`` / ``wo`` under an attention module are q / k / v / o, ``w1`` /
  ``w3`` / ``w2`` / ``c_proj`` under an MLP are gate / up / down. A name two layers of one block claim
  is ambiguous and left out; so are fused projections (``qkv_proj``, ``query_key_value``, ``c_attn``:
  their row layout differs between families and a wrong split would be silently wrong) and anything
  inside routed experts;
- the final norm: a norm module beside the block list (a pre-norm decoder's last norm), LayerNorm or
  RMSNorm by its type, its gain taken as its weight;
- the unembedding: ``get_output_embeddings()`` (``lm_head``), or none (a reward model).

Nothing found (no blocks, no role, no final norm beside the blocks, as in a post-norm encoder such as
BERT) gives None, and the caller raises the role-table error. Plain torch: no transformers import.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from torch import nn

# Linear-layer names that say their role wherever they sit in a block.
_ANYWHERE = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
             "gate_proj": "gate", "up_proj": "up", "down_proj": "down",
             "fc1": "up", "fc2": "down", "c_fc": "up", "fc_in": "up", "fc_out": "down",
             "dense_h_to_4h": "up", "dense_4h_to_h": "down"}
# Names whose role depends on the module they sit in.
_IN_ATTENTION = {"query": "q", "key": "k", "value": "v", "q": "q", "k": "k", "v": "v", "wq": "q", "wk": "k",
                 "wv": "v", "out_proj": "o", "dense": "o", "c_proj": "o", "wo": "o", "o": "o"}
_IN_MLP = {"w1": "gate", "w3": "up", "w2": "down", "c_proj": "down", "wi": "up", "wo": "down"}
_ATTENTION_WORDS = ("attn", "attention")
_MLP_WORDS = ("mlp", "ffn", "feed_forward", "feedforward")
# Fused projections: left untracked, never split by guess.
FUSED_NAMES = frozenset({"qkv_proj", "c_attn", "query_key_value", "wqkv", "w_pack", "qkv", "in_proj",
                         "gate_up_proj", "qkv_linear"})


@dataclass(frozen=True)
class InferredRoles:
    """A mapping found by name. ``roles``: role -> the paths inside a block that compute it (a block has
    one of them); ``optional``: roles some blocks lack; ``transposed``: roles stored ``(in, out)``."""

    layers: str
    roles: dict[str, tuple[str, ...]]
    optional: frozenset[str]
    transposed: frozenset[str]
    final_norm: str
    norm_type: str
    layernorm: bool
    unembed: str | None


def infer_roles(base: nn.Module) -> InferredRoles | None:
    """The mapping for ``base`` (an unwrapped model), or None when nothing sensible is found."""
    found = _block_list(base)
    if found is None:
        return None
    layers, blocks = found
    per_block = [_roles_in_block(block) for block in blocks]
    paths: dict[str, list[str]] = defaultdict(list)
    transposed = set()
    for roles in per_block:
        for role, (path, module) in roles.items():
            if path not in paths[role]:
                paths[role].append(path)
            if _is_conv1d(module):
                transposed.add(role)
    norm = _final_norm(base, layers)
    if not paths or norm is None:
        return None
    norm_path, norm_module = norm
    optional = frozenset(role for role in paths if any(role not in roles for roles in per_block))
    return InferredRoles(layers=layers, roles={role: tuple(p) for role, p in paths.items()}, optional=optional,
                         transposed=frozenset(transposed), final_norm=norm_path,
                         norm_type=type(norm_module).__name__, layernorm=_is_layernorm(norm_module),
                         unembed=_unembedding_path(base))


def uncovered_weights(roots: list[nn.Module], covered: set[str], skip_embeddings: bool = False) -> list[str]:
    """One line per module path (relative to each root) holding a weight of >= 2 dimensions and not at or
    under a ``covered`` path, with its type, weight shapes and, for several roots (the blocks), the roots
    it is in. Modules under a linear layer (a PEFT wrapper's adapters) belong to it."""
    covered = {c for c in covered if c}
    where: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, root in enumerate(roots):
        linear_paths: list[str] = []
        for name, module in root.named_modules():
            if not name or _under(name, covered) or _under(name, linear_paths):
                continue
            if _is_linear(module):
                linear_paths.append(name)
            if skip_embeddings and "embedding" in type(module).__name__.lower():
                continue
            what = _describe_weights(module)
            if what:
                where[(name, what)].append(i)
    lines = []
    for (name, what), found_in in where.items():
        if name.rsplit(".", 1)[-1].lower() in FUSED_NAMES:
            what += ", fused: its split is not guessed"
        line = f"{name} ({what})"
        if len(roots) > 1:
            line += " in every layer" if len(found_in) == len(roots) else f" in layers {found_in}"
        lines.append(line)
    return lines


# ----- the pieces -------------------------------------------------------------------------------------

def _block_list(base: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The ModuleList of same-type blocks holding the most linear layers (the outermost on a tie)."""
    best = None
    for path, module in base.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or len({type(b) for b in module}) != 1:
            continue
        count = sum(_is_linear(m) for block in module for m in block.modules())
        if count and (best is None or count > best[0]):
            best = (count, path, module)
    return None if best is None else (best[1], best[2])


def _roles_in_block(block: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Role -> (path, module) for the linear layers of one block whose names say their role; a role two
    layers claim is dropped (ambiguous)."""
    claims: dict[str, list[tuple[str, nn.Module]]] = defaultdict(list)
    linear_paths: list[str] = []
    for path, module in block.named_modules():
        if not path or _under(path, linear_paths) or not _is_linear(module):
            continue
        linear_paths.append(path)  # a PEFT wrapper's base_layer and adapters belong to it
        role = _role_of(path)
        if role is not None:
            claims[role].append((path, module))
    return {role: found[0] for role, found in claims.items() if len(found) == 1}


def _role_of(path: str) -> str | None:
    *context, leaf = path.lower().split(".")
    if leaf in FUSED_NAMES or any("expert" in c for c in context):
        return None  # fused layouts are not guessed; routed experts see only their tokens
    in_attention = any(w in c for c in context for w in _ATTENTION_WORDS)
    in_mlp = any(w in c for c in context for w in _MLP_WORDS)
    if leaf in _ANYWHERE:
        return _ANYWHERE[leaf]
    if in_attention and not in_mlp:
        return _IN_ATTENTION.get(leaf)
    if in_mlp and not in_attention:
        return _IN_MLP.get(leaf)
    return None


def _final_norm(base: nn.Module, layers: str) -> tuple[str, nn.Module] | None:
    """The last norm module registered beside the block list (a pre-norm decoder's final norm)."""
    parent_path = layers.rsplit(".", 1)[0] if "." in layers else ""
    parent = base.get_submodule(parent_path) if parent_path else base
    norms = [(name, m) for name, m in parent.named_children() if _is_norm(m)]
    if not norms:
        return None
    name, module = norms[-1]
    return (f"{parent_path}.{name}" if parent_path else name), module


def _unembedding_path(base: nn.Module) -> str | None:
    getter = getattr(base, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        return None
    return next((name for name, m in base.named_modules() if m is head), None)


def _is_linear(module: nn.Module | None) -> bool:
    if module is None:
        return False
    return isinstance(module, nn.Linear) or _is_conv1d(module) or _is_linear(getattr(module, "base_layer", None))


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style ``Conv1D`` (weight stored ``(in, out)``), by name: hooks never import transformers."""
    return type(getattr(module, "base_layer", module)).__name__ == "Conv1D"


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "norm" in type(module).__name__.lower()


def _is_layernorm(module: nn.Module) -> bool:
    """LayerNorm (mean-free output) by type; anything named RMS (or unnamed) is taken as an RMSNorm."""
    name = type(module).__name__.lower()
    return isinstance(module, nn.LayerNorm) or ("layernorm" in name and "rms" not in name)


def _describe_weights(module: nn.Module) -> str:
    """``Linear (48, 32)`` for a single 2-D ``weight``; else the type and each own >= 2-D parameter's shape
    (3-D ones, a MoE layer's experts, say so); empty when the module holds none."""
    own = [(name, tuple(p.shape)) for name, p in module.named_parameters(recurse=False) if p.dim() >= 2]
    if not own:
        return ""
    kind = type(module).__name__
    if len(own) == 1 and own[0][0] == "weight" and len(own[0][1]) == 2:
        return f"{kind} {own[0][1]}"
    text = f"{kind}: " + ", ".join(f"{name} {shape}" for name, shape in own)
    if any(len(shape) == 3 for _, shape in own):
        text += "; 3-D, one matrix per expert: no nn.Linear to hook"
    return text


def _under(path: str, prefixes) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)
