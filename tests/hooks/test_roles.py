"""The role table's rows for Gemma (1, 2, 3), OLMo (1, 2), Phi-3 and the mixtures of experts, each on a tiny
``from_config`` model of that family (2 layers, d = 32, grouped-query attention, every norm gain perturbed so
that a wrong gain convention shows), against references that do not use the row:

- ``C_a``, ``C_delta`` and the weight deltas of one instrumented SGD step equal the float64 brute force
  from per-token inputs and output gradients captured by plain hooks (Phi-3's fused rows cut by slices
  written out here from the config);
- the prediction subspace equals the SVD of ``W_U diag(g)`` built by hand with the family's gain
  convention (Gemma ``1 + w``; OLMo no gain, LayerNorm), the convention itself checked on the real module;
- behind a post-norm (OLMo2, Gemma2/3) ``rsf_out_pred`` is that of ``diag(g_post) dW``, and the post-norms
  named by the row are the modules the o / down outputs really pass;
- Phi-3's split q/k/v and gate/up, loaded into a Llama of the same config, reproduce Phi-3's logits;
- mixtures of experts: attention measured, routed experts and router reported untracked, the dense and
  shared-expert MLPs (Qwen2-MoE's shared expert sees flattened (B*T, d) tokens) measured with padding.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from tests.conftest import VOCAB, make_batch
from tests.hooks.brute_force import REL, K, check_exact_step
from weightgeom.hooks import keys
from weightgeom.hooks.measurement import Measurement
from weightgeom.hooks.roles import Fused, resolve_tracked, untracked_modules

D, HEADS, KV_HEADS, HEAD_DIM, FF = 32, 4, 2, 8, 48
# Per family: config fields beyond the shared tiny sizes (MoE: 4 experts, narrow experts; one dense layer).
EXTRA = {
    "gemma": {}, "gemma2": {}, "gemma3_text": {}, "olmo": {}, "olmo2": {}, "phi3": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                  "shared_expert_intermediate_size": 40, "mlp_only_layers": [1]},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24, "mlp_only_layers": [0]},
}
ARCHS = list(EXTRA)
GEMMAS = ("gemma", "gemma2", "gemma3_text")  # RMSNorm scales by (1 + weight)
POST_NORMS = {"o": "post_attention_layernorm", "down": "post_feedforward_layernorm"}
HAS_POST_NORMS = ("gemma2", "gemma3_text", "olmo2")
TOL = 1e-6  # float64 statistics against a float64 brute force over fp32 activations


def tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny ``arch`` model, dropout off, eager attention, every norm weight moved off its init (Gemma's 0,
    others' 1) so the effective gains are anisotropic and ``w`` and ``1 + w`` differ."""
    config = transformers.AutoConfig.for_model(
        arch, vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, intermediate_size=FF, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=1, pad_token_id=2, **EXTRA[arch])
    for name, value in list(vars(config).items()):
        if isinstance(value, float) and ("dropout" in name or "pdrop" in name):
            setattr(config, name, 0.0)
    config._attn_implementation = "eager"
    g = torch.Generator().manual_seed(seed + 100)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for module in model.modules():
            w = getattr(module, "weight", None)
            if "norm" in type(module).__name__.lower() and isinstance(w, torch.Tensor) and w.dim() == 1:
                w.add_(0.5 * torch.randn(w.shape, generator=g))
    return model


def effective_gain(arch: str, norm: torch.nn.Module) -> torch.Tensor | None:
    """The family's gain convention, written out: Gemma ``1 + w``, OLMo none, else ``w`` (float64)."""
    if arch == "olmo":
        assert getattr(norm, "weight", None) is None  # OLMo's LayerNorm has no affine parameters
        return None
    w = norm.weight.detach().double()
    return 1.0 + w if arch in GEMMAS else w


def check_gain_convention(arch: str, norm: torch.nn.Module) -> None:
    """The real module computes ``x_hat * g`` with the gain :func:`effective_gain` says (RMSNorm), or a
    mean-free, affine-free LayerNorm (OLMo)."""
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(3))
    g = effective_gain(arch, norm)
    if g is None:
        expected = torch.nn.functional.layer_norm(x, (D,), eps=1e-5)
    else:
        eps = getattr(norm, "eps", None) or norm.variance_epsilon
        expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g.float()
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-6)


def phi3_rows(tm) -> torch.Tensor | None:
    """Phi-3's fused rows from the config, by hand: qkv_proj = [q (H*hd) | k (KV*hd) | v (KV*hd)],
    gate_up_proj = [gate (ff) | up (ff)]."""
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    slices = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv), "gate": (0, FF), "up": (FF, 2 * FF)}
    return torch.arange(*slices[tm.role]) if tm.role in slices else None


@pytest.fixture(scope="module", params=ARCHS)
def stepped(request):
    arch = request.param
    model = tiny(arch)
    batch = make_batch(batch=3, seq=10, pad_last=3)  # 27 counted tokens
    result = check_exact_step(model, batch, rows_of=phi3_rows if arch == "phi3" else None)
    return arch, model, result


def test_statistics_and_deltas_equal_the_brute_force(stepped):
    arch, _, result = stepped
    for kind in ("C_a", "C_delta", "dW"):
        assert result.errors[kind][1] < TOL, (arch, kind, result.errors[kind])
    assert set(result.counts.values()) == {27}, result.counts  # padding excluded everywhere
    roles = {tm.role for tm in result.suite.tracked}
    assert {"q", "k", "v", "o"} <= roles


def test_prediction_subspace_is_built_with_the_family_gain_convention(stepped):
    arch, model, result = stepped
    norm = model.model.norm
    check_gain_convention(arch, norm)
    W = model.lm_head.weight.detach().double()
    g = effective_gain(arch, norm)
    M = W if g is None else W * g[None, :]
    if arch == "olmo":  # LayerNorm: the all-ones direction of d-space is never written
        M = M - M.mean(dim=1, keepdim=True)
    V = torch.linalg.svd(M, full_matrices=False).Vh[:K].T
    suite = result.suite
    m = Measurement(step=1, k=K, zscores=False, dtype=torch.float64, cov=suite.cov, upd=suite.upd,
                    tracked=suite.tracked, input_roles=suite.input_roles, frozen={}, model=model)
    V_suite = m.prediction(K)[0]
    # fp32 W_U and gain (as the suite holds them) and a Gram eigendecomposition: ~1e-8; a wrong gain: O(0.1)
    torch.testing.assert_close(V_suite @ V_suite.T, V @ V.T, rtol=0, atol=1e-6)


def test_rsf_out_pred_measures_what_the_residual_stream_receives(stepped):
    """Behind a post-norm: ``diag(g_post) dW`` (g_post with the family's convention); elsewhere ``dW``."""
    arch, model, result = stepped
    norm = model.model.norm
    g = effective_gain(arch, norm)
    M = model.lm_head.weight.detach().double() * (1.0 if g is None else g[None, :])
    if arch == "olmo":
        M = M - M.mean(dim=1, keepdim=True)
    V = torch.linalg.svd(M, full_matrices=False).Vh[:K].T
    for tm in result.suite.tracked:
        if tm.role not in ("o", "down"):
            continue
        written = result.dW[tm.key]
        if arch in HAS_POST_NORMS:
            post = model.model.layers[tm.layer].get_submodule(POST_NORMS[tm.role])
            check_gain_convention(arch, post)
            written = effective_gain(arch, post)[:, None] * written
        expected = float((V.T @ written).pow(2).sum() / written.pow(2).sum()) * D / K
        assert result.metrics[keys.at("rsf_out_pred", tm.key)] == pytest.approx(expected, rel=REL), (arch, tm.key)


@pytest.mark.parametrize("arch", HAS_POST_NORMS)
def test_post_norms_are_the_modules_the_write_outputs_pass(arch):
    """The o / down outputs are exactly the inputs of the norms the row names, and the tracked matrices
    carry those norms (so the transform above is applied to the right gain)."""
    model = tiny(arch)
    block = model.model.layers[0]
    seen = {}
    handles = [block.self_attn.o_proj.register_forward_hook(lambda m, a, out: seen.__setitem__("o", out)),
               block.mlp.down_proj.register_forward_hook(lambda m, a, out: seen.__setitem__("down", out))]
    for role, path in POST_NORMS.items():
        handles.append(block.get_submodule(path).register_forward_pre_hook(
            lambda m, args, role=role: seen.__setitem__(f"{role}_norm_in", args[0])))
    model(input_ids=make_batch()["input_ids"])
    for h in handles:
        h.remove()
    for role, path in POST_NORMS.items():
        assert torch.equal(seen[role], seen[f"{role}_norm_in"]), role
        tm = next(t for t in resolve_tracked(model, (role,)) if t.layer == 0)
        assert tm.post_norm is block.get_submodule(path)


def test_phi3_fused_rows_are_the_forwards_own_split():
    """Phi-3's q/k/v and gate/up as the role table cuts them, loaded into separate projections of a Llama
    with the same config, give Phi-3's logits: the rows are the ones its forward uses (an equal-thirds
    cut of qkv_proj, wrong under grouped-query attention, fails here)."""
    phi3 = tiny("phi3").eval()
    c = phi3.config
    llama_config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM, intermediate_size=FF, max_position_embeddings=64, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=c.rope_parameters, hidden_act=c.hidden_act, pad_token_id=2)
    llama_config._attn_implementation = "eager"
    llama = transformers.AutoModelForCausalLM.from_config(llama_config).eval()
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    state = {k: v for k, v in phi3.state_dict().items() if "qkv_proj" not in k and "gate_up_proj" not in k}
    for tm in resolve_tracked(phi3):
        state[f"model.layers.{tm.layer}.{names[tm.role]}.weight"] = tm.weight()
    llama.load_state_dict(state, strict=True)
    batch = make_batch()
    with torch.no_grad():
        expected = phi3(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fused_block_sizes_must_fit():
    config = transformers.Phi3Config(hidden_size=D, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS)
    q = Fused(0, sizes=lambda cfg: (32, 8, 8))
    with pytest.raises(ValueError, match=r"block sizes \(32, 8, 8\) from the config do not cut 64 rows"):
        q.rows(64, HEADS, config)
    with pytest.raises(ValueError, match="cannot be cut into 3 equal blocks"):
        Fused(0).rows(64, HEADS)


def test_moe_attention_tracked_experts_reported_untracked(stepped):
    arch, model, result = stepped
    if arch not in ("mixtral", "qwen2_moe", "qwen3_moe"):
        pytest.skip("dense architecture")
    tracked = {tm.key for tm in result.suite.tracked}
    mlp = {f"L{i}/{r}" for i in range(2) for r in ("gate", "up", "down")}
    assert {f"L{i}/{r}" for i in range(2) for r in ("q", "k", "v", "o")} <= tracked
    expected_mlp = {"mixtral": set(), "qwen2_moe": mlp,  # layer 0: shared expert, layer 1: dense MLP
                    "qwen3_moe": {k for k in mlp if k.startswith("L0/")}}[arch]  # only the dense layer 0
    assert tracked & mlp == expected_mlp
    if arch == "qwen2_moe":
        block = model.model.layers[0].mlp
        shared = {tm.role: tm.module for tm in result.suite.tracked if tm.layer == 0}
        assert shared["gate"] is block.shared_expert.gate_proj and shared["down"] is block.shared_expert.down_proj
    untracked = untracked_modules(model)
    experts = next(line for line in untracked if line.startswith("mlp.experts "))
    assert "3-D" in experts and experts.endswith({"mixtral": "in every layer", "qwen2_moe": "in layers [0]",
                                                  "qwen3_moe": "in layers [1]"}[arch])
    assert any(line.startswith("mlp.gate ") for line in untracked)  # the router
    assert any("mlp.experts" in line for line in result.suite.skipped)
    assert keys.metric("rsf_out_pred", 1, "o") in result.metrics
