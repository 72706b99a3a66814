import pytest
import torch
from torch import nn

from weightgeom.core.models import build_tiny_model, count_parameters, load_local_model
from weightgeom.hooks.roles import ARCHITECTURES

VOCAB = 97


def tokens(batch: int = 2, length: int = 8) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_arch_builds_runs_and_has_no_dropout(arch):
    model = build_tiny_model(arch, vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4)
    assert model.training
    # sdpa wherever the family has it (Gemma2's attention-logit soft-capping has not: eager)
    assert model.config._attn_implementation == ("eager" if arch == "gemma2" else "sdpa")
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.Dropout))
    ids = tokens()
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 8, VOCAB)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with torch.no_grad():  # train mode, yet deterministic: dropout is really off
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_sizes_follow_arguments():
    model = build_tiny_model("llama", vocab_size=VOCAB, hidden_size=32, num_heads=4, num_kv_heads=2, num_layers=3)
    attn = model.model.layers[0].self_attn
    assert len(model.model.layers) == 3
    assert attn.q_proj.weight.shape == (32, 32) and attn.k_proj.weight.shape == (16, 32)  # 2 kv heads * 8
    assert model.model.layers[0].mlp.down_proj.weight.shape == (32, 128)  # default d_ff = 4 * d
    gpt2 = build_tiny_model("gpt2", vocab_size=VOCAB, hidden_size=32, intermediate_size=48)
    assert gpt2.transformer.h[0].mlp.c_fc.weight.shape == (32, 48)  # Conv1D stores (in, out)


def test_tied_embeddings_share_one_tensor_and_count_once():
    untied = build_tiny_model("llama", vocab_size=VOCAB, hidden_size=32)
    tied = build_tiny_model("llama", vocab_size=VOCAB, hidden_size=32, tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert count_parameters(untied) - count_parameters(tied) == VOCAB * 32
    brute = sum(p.numel() for _, p in untied.named_parameters(remove_duplicate=False))
    assert count_parameters(untied) == brute


def test_seeded_init_is_reproducible_and_leaves_global_rng():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = build_tiny_model("qwen2", vocab_size=VOCAB, hidden_size=32, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    b = build_tiny_model("qwen2", vocab_size=VOCAB, hidden_size=32, seed=5)
    c = build_tiny_model("qwen2", vocab_size=VOCAB, hidden_size=32, seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(sa[q], sc[q])


def test_build_errors():
    with pytest.raises(ValueError, match="unknown arch 'bert'"):
        build_tiny_model("bert", vocab_size=VOCAB)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        build_tiny_model("llama", vocab_size=VOCAB, hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="no grouped-query attention"):
        build_tiny_model("gpt2", vocab_size=VOCAB, num_kv_heads=2)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_and_load_local_round_trip(arch, tmp_path):
    model = build_tiny_model(arch, vocab_size=VOCAB, hidden_size=32, tie_word_embeddings=arch == "gpt2").eval()
    model.save_pretrained(tmp_path)
    loaded = load_local_model(tmp_path)
    assert not loaded.training
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    half = load_local_model(tmp_path, dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_load_local_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="hub names are not downloaded"):
        load_local_model("meta-llama/Llama-3.2-1B")
    with pytest.raises(ValueError, match="no config.json; found: nothing"):
        load_local_model(tmp_path)
    build_tiny_model("llama", vocab_size=VOCAB, hidden_size=32).config.save_pretrained(tmp_path)
    (tmp_path / "training_args.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"model dir without weights: .*found: config.json, training_args.bin"):
        load_local_model(tmp_path)


def test_moe_rows_build_small_expert_layers():
    """The MoE rows' tiny models: every expert width is the recipe's intermediate_size, 4 experts."""
    model = build_tiny_model("qwen2_moe", vocab_size=VOCAB, hidden_size=32, num_heads=4, intermediate_size=24)
    mlp = model.model.layers[0].mlp
    assert mlp.experts.gate_up_proj.shape == (4, 48, 32) and mlp.shared_expert.down_proj.weight.shape == (32, 24)
    mixtral = build_tiny_model("mixtral", vocab_size=VOCAB, hidden_size=32, num_heads=4, intermediate_size=24)
    assert mixtral.model.layers[0].mlp.experts.down_proj.shape == (4, 32, 24)
