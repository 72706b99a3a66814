"""The rank-1 statistics pass (G, C_a, C_delta in one pass) against per-token autograd, K-FAC against
brute force, the first order as eps shrinks, and hook removal."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_model
from tests.harness.rank1.helpers import CPU, random_pairs, text_blocks, tracked_matrix
from tests.tiny import tiny_tokenizer
from weightgeom.core.data import tokenize_pairs
from weightgeom.harness.rank1.edits import (
    edited_weight,
    first_order,
    input_side_edit,
    kfac_second_order,
    output_side_edit,
    role_shape,
)
from weightgeom.harness.rank1.measure import evaluate, measure_statistics, prepare_heldout
from weightgeom.hooks import geometry as geo
from weightgeom.hooks.roles import resolve_tracked
from weightgeom.trainers.losses import DPOLoss, sequence_logps
from weightgeom.trainers.pairs import pair_logps

# ----- statistics: one consistent pass, checked per token ------------------------------------------------

@pytest.mark.parametrize("arch,key", [("llama", "L1/q"), ("llama", "L0/o"), ("gpt2", "L1/k"), ("gpt_neox", "L0/v")])
def test_statistics_pass_matches_per_token_autograd_and_kfac_matches_brute_force(arch, key):
    """G, C_a and C_delta from the instruments' pass (in batches of 3 pairs, with padding) equal the
    per-token brute force of one big forward: G = sum_t d_t a_t^T, d_t the per-pair output gradient;
    and the K-FAC term built from them equals the dense Kronecker form of the brute-force factors."""
    model = make_model(arch).eval()
    tok = tiny_tokenizer()
    data = tokenize_pairs(random_pairs(7), tok, 16)
    assert not bool(data["rejected_attention_mask"].all())  # padding present
    tm = tracked_matrix(model, key)
    stats = measure_statistics(model, resolve_tracked(model, (tm.role,)), train_data=data, heldout_data=data,
                               text_blocks=text_blocks(), beta=0.5, batch_size=3, device=CPU)

    captured = {}

    def hook(module, args, output):
        captured["a"] = args[0].detach()
        output.retain_grad()
        captured["y"] = output

    handle = tm.module.register_forward_hook(hook)
    try:
        idx = torch.arange(7)
        chosen, rejected, counts = pair_logps(model, data, idx, CPU)
        loss = DPOLoss(0.5)(chosen, rejected, chosen.detach(), rejected.detach(), counts).loss
        model.zero_grad()
        loss.backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    mask = torch.cat([data["chosen_attention_mask"], data["rejected_attention_mask"]]).reshape(-1).bool()
    a = captured["a"].reshape(-1, captured["a"].shape[-1])[mask].double()
    grad = captured["y"].grad
    grad = grad.reshape(-1, grad.shape[-1])[mask].double()
    if tm.rows is not None:
        grad = grad[:, tm.rows]
    delta = grad * 7  # the loss is a mean over 7 pairs: undo it for per-pair gradients
    N = a.shape[0]
    assert stats.tokens[key] == N
    for measured, brute in ((stats.G[key], grad.T @ a), (stats.C_a[tm.group_key], a.T @ a / N),
                            (stats.C_delta[key], delta.T @ delta / N)):
        assert torch.allclose(measured, brute, rtol=1e-4, atol=1e-5 * float(brute.abs().max()))  # fp32 model

    dW = torch.randn(*role_shape(tm), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    vec = dW.T.reshape(-1)
    brute = 0.5 * (N / 7) * float(vec @ torch.kron(a.T @ a / N, delta.T @ delta / N) @ vec)
    kfac = kfac_second_order(dW, stats.C_a[tm.group_key], stats.C_delta[key], stats.tokens_per_pair(key))
    assert kfac == pytest.approx(brute, rel=1e-4)


def test_gradient_is_the_exact_derivative_of_the_loss_along_an_edit():
    """<G, dW> equals d/ds L(W + s dW) at s = 0, taken by autograd through the edited weight."""
    model = make_model("gpt2").eval()  # fused, transposed c_attn: the edit must land on the k rows
    data = tokenize_pairs(random_pairs(6), tiny_tokenizer(), 16)
    tm = tracked_matrix(model, "L1/k")
    stats = measure_statistics(model, [tm], train_data=data, heldout_data=data, text_blocks=text_blocks(),
                               beta=0.5, batch_size=4, device=CPU)
    dW = input_side_edit(stats.G["L1/k"], torch.randn(32, generator=torch.Generator().manual_seed(1),
                                                      dtype=torch.float64)).dense(1.0)
    name = next(n for n, p in model.named_parameters() if p is tm.module.weight)
    step = torch.zeros((), requires_grad=True)
    full = torch.zeros_like(tm.module.weight)
    full.t().index_add_(0, tm.rows, dW.float())  # (out, in) rows of the stored (in, out) Conv1D weight
    params = {n: p for n, p in model.named_parameters()}
    params[name] = tm.module.weight + step * full
    ids = torch.cat([data["chosen_input_ids"], data["rejected_input_ids"]])
    mask = torch.cat([data["chosen_attention_mask"], data["rejected_attention_mask"]])
    loss_mask = torch.cat([data["chosen_loss_mask"], data["rejected_loss_mask"]])
    logits = torch.func.functional_call(model, params, (), {"input_ids": ids, "attention_mask": mask}).logits

    logps, counts = sequence_logps(logits, ids, loss_mask)
    loss = DPOLoss(0.5)(logps[:6], logps[6:], logps[:6].detach(), logps[6:].detach(), counts[:6]).loss
    (derivative,) = torch.autograd.grad(loss, step)
    assert first_order(stats.G["L1/k"], dW) == pytest.approx(float(derivative), rel=1e-4)


@pytest.mark.parametrize("key,side", [("L0/o", "out"), ("L0/up", "in")])
def test_measured_change_matches_the_first_order_prediction_as_eps_shrinks(key, side):
    """Held-out = training pairs here, so <G, dW> is the exact first-order term of the measured change:
    the relative error falls roughly linearly with eps until it reaches float32 round-off."""
    model = make_model("llama").eval()
    data = tokenize_pairs(random_pairs(10), tiny_tokenizer(), 16)
    tm = tracked_matrix(model, key)
    stats = measure_statistics(model, [tm], train_data=data, heldout_data=data, text_blocks=text_blocks(),
                               beta=1.0, batch_size=4, device=CPU)
    held = prepare_heldout(model, data, text_blocks(), beta=1.0, batch_size=4, device=CPU)
    base = evaluate(model, held)
    C = stats.C_a[tm.group_key] if side == "in" else stats.C_delta[key]
    top = geo.sym_eigh(C)[1][:, 0]
    edit = (input_side_edit if side == "in" else output_side_edit)(stats.G[key], top)
    errors = []
    for eps in (0.4, 0.2, 0.1, 0.05, 0.025):
        with edited_weight(tm, edit.dense(eps)):
            change = evaluate(model, held)["dpo_loss"] - base["dpo_loss"]
        predicted = first_order(stats.G[key], edit.dense(eps))
        errors.append(abs(change - predicted) / abs(predicted))
    assert errors[0] > 0.02  # the second-order term is visible at the largest eps ...
    for big, small in zip(errors, errors[1:]):
        assert small < 0.7 * big or small < 5e-3  # ... and shrinks with eps down to round-off
    assert errors[-1] < 0.03


def test_statistics_pass_removes_its_hooks_also_when_it_raises():
    model = make_model("llama").eval()
    data = tokenize_pairs(random_pairs(4), tiny_tokenizer(), 16)
    tracked = resolve_tracked(model, ("q", "o"))
    measure_statistics(model, tracked, train_data=data, heldout_data=data, text_blocks=text_blocks(), beta=0.1,
                       batch_size=4, device=CPU)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    broken = {**data, "chosen_input_ids": data["chosen_input_ids"] + 1000}  # ids past the vocabulary
    with pytest.raises(IndexError):
        measure_statistics(model, tracked, train_data=broken, heldout_data=data, text_blocks=text_blocks(),
                           beta=0.1, batch_size=4, device=CPU)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
