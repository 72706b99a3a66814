"""UpdateInstrument: reference weights, updates and gradients, checked against plain arithmetic."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_batch, make_model, token_loss_sum
from weightgeom.hooks.roles import ARCHITECTURES, resolve_tracked
from weightgeom.hooks.updates import UpdateInstrument


def sgd_step(model, batch, lr=0.1, optimizer=None):
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=lr)
    optimizer.zero_grad()
    loss_sum, n = token_loss_sum(model, batch)
    (loss_sum / n).backward()
    optimizer.step()
    return optimizer


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_sgd_update_is_minus_lr_times_grad(arch):
    model = make_model(arch)
    tracked = resolve_tracked(model)
    inst = UpdateInstrument(tracked)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    inst.attach(model, opt)
    w_before = {tm.key: tm.weight() for tm in tracked}
    sgd_step(model, make_batch(), optimizer=opt)
    sgd_step(model, make_batch(seed=2), optimizer=opt)
    inst.detach()
    assert inst.steps == 2
    for tm in tracked:
        torch.testing.assert_close(inst.grad[tm.key], tm.grad())  # last raw gradient
        torch.testing.assert_close(inst.update[tm.key], -0.1 * tm.grad(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(inst.delta(tm), tm.weight() - w_before[tm.key])
    assert not any(opt._optimizer_step_pre_hooks) and not any(opt._optimizer_step_post_hooks)


def test_fused_split_matches_manual_slicing():
    model = make_model("gpt2")
    attn = model.transformer.h[1].attn.c_attn
    tracked = {tm.key: tm for tm in resolve_tracked(model)}
    d = 32
    torch.testing.assert_close(tracked["L1/k"].weight(), attn.weight[:, d:2 * d].t())
    neox = make_model("gpt_neox")
    qkv = neox.gpt_neox.layers[0].attention.query_key_value.weight  # (heads * 3 * hd, d)
    per_head = qkv.view(4, 3, 8, d)  # heads, (q,k,v), head_dim, in
    tracked = {tm.key: tm for tm in resolve_tracked(neox)}
    torch.testing.assert_close(tracked["L0/v"].weight(), per_head[:, 2].reshape(-1, d))
    assert set(ARCHITECTURES) >= {"llama", "qwen2", "mistral", "gpt2", "gpt_neox"}


def test_adam_update_differs_from_gradient_direction():
    model = make_model("llama")
    tracked = resolve_tracked(model, roles=["o"])
    inst = UpdateInstrument(tracked)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    inst.attach(model, opt)
    sgd_step(model, make_batch(), optimizer=opt)
    inst.detach()
    u, g = inst.update["L0/o"], inst.grad["L0/o"]
    cos = torch.nn.functional.cosine_similarity(u.flatten(), -g.flatten(), dim=0)
    assert 0 < cos < 0.999  # same half-space, not the same direction (per-element scaling)


def test_lora_effective_weight_delta():
    peft = pytest.importorskip("peft")
    model = make_model("llama")
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                                                       init_lora_weights=False))
    tracked = resolve_tracked(model, roles=["q", "o", "up"])
    inst = UpdateInstrument(tracked)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inst.attach(model, opt)
    sgd_step(model, make_batch(), optimizer=opt)
    inst.detach()
    q = next(tm for tm in tracked if tm.role == "q" and tm.layer == 0)
    base = q.module.base_layer.weight.detach()
    expected = base + q.module.get_delta_weight("default").detach()
    torch.testing.assert_close(q.weight(), expected)
    assert inst.delta(q).abs().sum() > 0  # adapters moved the effective weight
    up = next(tm for tm in tracked if tm.role == "up")
    assert inst.delta(up).abs().sum() == 0  # frozen base weight, no adapter
    assert q.key not in inst.grad  # effective-W gradient is not materialised for LoRA


def test_unknown_architecture_error_says_how_to_add():
    """No row, and nothing the fallback recognises (tests/hooks/test_fallback_roles.py has what it does)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="ARCHITECTURES"):
        resolve_tracked(model)
    with pytest.raises(ValueError, match="ARCHITECTURES"):
        resolve_tracked(make_model("llama"), arch="mystery")  # an explicit arch name must be a row


def test_state_round_trip_restores_reference():
    model = make_model("llama")
    tracked = resolve_tracked(model)
    inst = UpdateInstrument(tracked)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    inst.attach(model, opt)
    sgd_step(model, make_batch(), optimizer=opt)
    inst.detach()
    again = UpdateInstrument(tracked)
    again.load_state_dict(inst.state_dict())
    for key, value in inst.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
