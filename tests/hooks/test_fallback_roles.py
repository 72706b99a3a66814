"""The generic fallback for an architecture with no row (weightgeom.hooks.fallback_roles): roles found by
module names on real transformers families the table does not list (Starcoder2: q/k/v/o_proj, c_fc / c_proj,
LayerNorm with bias; Falcon: a fused query_key_value it leaves untracked, dense / dense_h_to_4h /
dense_4h_to_h, tied embeddings), a warning once naming the mapping and what it leaves out, statistics
exact (float64 brute force) for what it tracks, the prediction subspace built by hand; renamed Llama and
GPT-2 models give the rows' own mapping; nothing sensible (BERT: no final norm beside its blocks) raises
the role-table error."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

from tests.conftest import VOCAB, make_batch, make_model
from tests.hooks.brute_force import K, check_exact_step
from weightgeom.hooks.measurement import Measurement
from weightgeom.hooks.roles import ARCHITECTURES, InferredRolesWarning, arch_spec_for, resolve_tracked

D = 32
FAMILIES = {
    "starcoder2": dict(num_key_value_heads=2, intermediate_size=48),
    "falcon": dict(),  # multi-query attention: query_key_value holds q (32) + k (8) + v (8) rows
}


def tiny(family: str, seed: int = 0) -> torch.nn.Module:
    config = transformers.AutoConfig.for_model(family, vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2,
                                               num_attention_heads=4, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                                               **FAMILIES[family])
    for name, value in list(vars(config).items()):
        if isinstance(value, float) and "dropout" in name:
            setattr(config, name, 0.0)
    config._attn_implementation = "eager"
    g = torch.Generator().manual_seed(seed + 100)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # an anisotropic final-norm gain, so that using it (or not) shows
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.add_(0.5 * torch.randn(module.weight.shape, generator=g))
    return model


def inferred(warned: list) -> list[str]:
    return [str(w.message) for w in warned if issubclass(w.category, InferredRolesWarning)]


@pytest.fixture(scope="module", params=list(FAMILIES))
def stepped(request):
    family = request.param
    assert family not in ARCHITECTURES
    model = tiny(family)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        result = check_exact_step(model, make_batch(batch=3, seq=10, pad_last=3))
    return family, model, result, inferred(warned)


def test_warns_once_naming_the_mapping_and_what_it_leaves_untracked(stepped):
    family, _, result, messages = stepped
    assert len(messages) == 1, messages  # the suite resolves the model several times; one warning
    message = messages[0]
    assert f"no role table for architecture {family!r}" in message and "weightgeom.hooks.roles.ARCHITECTURES" in message
    if family == "starcoder2":
        for part in ("blocks model.layers", "q=self_attn.q_proj", "k=self_attn.k_proj", "v=self_attn.v_proj",
                     "o=self_attn.o_proj", "up=mlp.c_fc", "down=mlp.c_proj",
                     "final norm model.norm (LayerNorm, taken as LayerNorm", "unembedding lm_head",
                     "Left untracked: nothing"):
            assert part in message, part
        assert result.suite.skipped == []
    else:
        for part in ("blocks transformer.h", "o=self_attention.dense", "up=mlp.dense_h_to_4h",
                     "down=mlp.dense_4h_to_h", "final norm transformer.ln_f (LayerNorm"):
            assert part in message, part
        untracked = ("self_attention.query_key_value (FalconLinear (48, 32), fused: its split is not guessed) "
                     "in every layer")
        assert f"Left untracked: {untracked}." in message
        assert result.suite.skipped == [f"not tracked (no role covers them): {untracked}"]
        assert "q=" not in message


def test_statistics_are_exact_for_what_it_tracks(stepped):
    family, _, result, _ = stepped
    roles = {"starcoder2": {"q", "k", "v", "o", "up", "down"}, "falcon": {"o", "up", "down"}}[family]
    assert {tm.role for tm in result.suite.tracked} == roles
    for kind in ("C_a", "C_delta", "dW"):
        assert result.errors[kind][1] < 1e-6, (family, kind, result.errors[kind])
    assert set(result.counts.values()) == {27}


def test_prediction_subspace_uses_the_found_norm_and_unembedding(stepped):
    _, model, result, _ = stepped
    norm = model.get_submodule(arch_spec_for(model).final_norm)
    assert isinstance(norm, torch.nn.LayerNorm)
    M = model.lm_head.weight.detach().double() * norm.weight.detach().double()[None, :]
    M = M - M.mean(dim=1, keepdim=True)  # LayerNorm: mean-free output
    V = torch.linalg.svd(M, full_matrices=False).Vh[:K].T
    s = result.suite
    V_suite = Measurement(step=1, k=K, zscores=False, dtype=torch.float64, cov=s.cov, upd=s.upd, tracked=s.tracked,
                          input_roles=s.input_roles, frozen={}, model=model).prediction(K)[0]
    torch.testing.assert_close(V_suite @ V_suite.T, V @ V.T, rtol=0, atol=1e-6)
    assert "rsf_out_pred/L1/down" in result.metrics


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_renamed_family_gets_its_rows_mapping(arch):
    """A Llama or GPT-2 whose model_type has no row: the fallback tracks the same modules the row does
    (GPT-2's Conv1D transposed), except GPT-2's fused c_attn, which it names as untracked."""
    model = make_model(arch)
    by_row = {tm.key: tm for tm in resolve_tracked(model)}
    model.config.model_type = "mystery"
    with pytest.warns(InferredRolesWarning) as warned:
        by_name = {tm.key: tm for tm in resolve_tracked(model)}
    expected = {k for k in by_row if arch == "llama" or by_row[k].role not in ("q", "k", "v")}
    assert set(by_name) == expected
    for key in expected:
        assert by_name[key].module is by_row[key].module and by_name[key].transposed == by_row[key].transposed
        torch.testing.assert_close(by_name[key].weight(), by_row[key].weight())
    if arch == "gpt2":
        assert "attn.c_attn (Conv1D (32, 96), fused: its split is not guessed) in every layer" in str(warned[0].message)


def test_nothing_sensible_raises_the_role_table_error():
    """BERT as a causal LM: blocks and attention names, but no final norm beside the blocks (post-norm
    encoder layers): no prediction geometry to infer, so the role-table error, naming how to add a row."""
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, is_decoder=True)
    with torch.device("meta"):
        bert = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=r"no role table for architecture 'bert'.*hooks\.roles\.ARCHITECTURES"):
        resolve_tracked(bert)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="ARCHITECTURES"):
        resolve_tracked(plain)
