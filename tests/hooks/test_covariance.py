"""CovarianceInstrument against brute-force references on tiny models.

Reference: forward hooks that store each module's input and add a zero perturbation ``eps``
(requires_grad) to its output, so ``autograd.grad(L, eps)`` is the per-token ``delta = dL/dy``
through a mechanism independent of the instrument's tensor hooks.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from tests.conftest import make_batch, make_model, token_loss_sum
from weightgeom.hooks.covariance import CovarianceInstrument
from weightgeom.hooks.roles import TrackedMatrix, resolve_tracked


class Reference:
    def __init__(self, modules: dict):
        self.inputs, self.eps, self.handles = {}, {}, []
        for name, module in modules.items():
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(module, args, out):
            self.inputs[name] = args[0].detach().clone()
            eps = torch.zeros_like(out, requires_grad=True)
            self.eps[name] = eps
            return out + eps
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def reference_stats(model, batch, tracked, roles_out=("o", "down")):
    """Brute-force sums: C_a inputs and per-token deltas of the mean-token loss times N."""
    mods = {tm.key: tm.module for tm in tracked}
    ref = Reference(mods)
    loss_sum, n = token_loss_sum(model, batch)
    loss = loss_sum / n
    keys = [tm.key for tm in tracked if tm.role in roles_out]
    grads = torch.autograd.grad(loss, [ref.eps[k] for k in keys])
    ref.remove()
    keep = batch["attention_mask"].reshape(-1) == 1
    out = {}
    for tm in tracked:
        x = ref.inputs[tm.key].reshape(-1, ref.inputs[tm.key].shape[-1])[keep].double()
        out[f"in/{tm.group_key}"] = (x.T @ x, x.sum(0), x.shape[0], x)
    for key, g in zip(keys, grads):
        tm = next(t for t in tracked if t.key == key)
        d = g.reshape(-1, g.shape[-1])[keep].double() * n
        if tm.rows is not None:
            d = d[:, tm.rows]
        out[f"out/{key}"] = (d.T @ d, d.shape[0], d)
    return out


def run_instrumented(model, batches, tracked, **kw):
    inst = CovarianceInstrument(tracked, **kw)
    inst.attach(model)
    try:
        total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        inst.loss_normalizer = total
        for b in batches:
            loss_sum, _ = token_loss_sum(model, b)
            (loss_sum / total).backward()
    finally:
        inst.detach()
    return inst


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "qwen2"])
def test_stats_match_brute_force(arch):
    model = make_model(arch)
    batch = make_batch()
    out_roles = ("q", "k", "v", "o", "up", "down")
    tracked = resolve_tracked(model)
    ref = reference_stats(model, batch, tracked, out_roles)
    model.zero_grad()
    inst = run_instrumented(model, [batch], tracked, output_roles=out_roles, dtype=torch.float64)
    state = inst.state_dict()
    for key in inst.group_keys:
        outer, total, count, x = ref[f"in/{key}"]
        torch.testing.assert_close(state[f"cov_in/{key}/sum_outer"], outer, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(state[f"cov_in/{key}/sum"], total, rtol=1e-6, atol=1e-8)
        assert int(state[f"cov_in/{key}/count"]) == count == 27  # 3 x 10 tokens minus 3 padding
        # centered covariance equals torch.cov on the stored activations
        torch.testing.assert_close(inst.covariance_in(key, centered=True), torch.cov(x.T, correction=0),
                                   rtol=1e-6, atol=1e-8)
    assert len(inst.output_keys) == 2 * len(out_roles)
    for key in inst.output_keys:
        outer, count, _ = ref[f"out/{key}"]
        torch.testing.assert_close(state[f"cov_out/{key}/sum_outer"], outer, rtol=1e-5, atol=1e-9)
        assert int(state[f"cov_out/{key}/count"]) == count


def test_delta_is_per_token_gradient_and_reconstructs_weight_grad():
    """delta (scaled by N) is the gradient of the summed per-token loss, checked with an explicit
    loop over loss tokens; and (1/N) sum_t delta_t a_t^T equals the layer's .grad."""
    model = make_model("llama")
    batch = make_batch(batch=2, seq=6, pad_last=2)
    tracked = [tm for tm in resolve_tracked(model) if tm.key == "L1/o"]
    ref = Reference({"o": tracked[0].module})
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    eps = ref.eps["o"]
    per_token = torch.zeros_like(eps)
    positions = (batch["labels"][:, 1:] != -100).nonzero().tolist()
    for b, t in positions:  # explicit per-token autograd
        ce_t = torch.nn.functional.cross_entropy(logits[b, t][None], batch["labels"][b, t + 1][None])
        per_token += torch.autograd.grad(ce_t, eps, retain_graph=True)[0]
    ref.remove()
    model.zero_grad()
    inst = run_instrumented(model, [batch], tracked, output_roles=("o",), dtype=torch.float64)
    keep = batch["attention_mask"].reshape(-1) == 1
    d = per_token.reshape(-1, per_token.shape[-1])[keep].double()
    torch.testing.assert_close(inst.state_dict()["cov_out/L1/o/sum_outer"], d.T @ d, rtol=1e-5, atol=1e-10)
    # the weight gradient is the sum of outer products delta a^T (padding contributes nothing)
    a = ref.inputs["o"].reshape(-1, ref.inputs["o"].shape[-1])[keep].double()
    n = len(positions)
    torch.testing.assert_close(tracked[0].grad().double(), d.T @ a / n, rtol=1e-4, atol=1e-7)


def test_attaching_changes_nothing():
    """Loss and every gradient bit-identical with and without instruments; global RNG untouched."""
    batch = make_batch()
    results = []
    for instrumented in (False, True):
        model = make_model("llama")
        inst = CovarianceInstrument(resolve_tracked(model), max_tokens=7)
        if instrumented:
            inst.attach(model)
        rng = torch.get_rng_state()
        loss_sum, n = token_loss_sum(model, batch)
        (loss_sum / n).backward()
        assert torch.equal(torch.get_rng_state(), rng)
        inst.detach()
        results.append((loss_sum.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    for g0, g1 in zip(results[0][1], results[1][1]):
        assert torch.equal(g0, g1)


def test_no_grad_reference_forward_is_ignored():
    model = make_model("llama")
    batch = make_batch()
    inst = CovarianceInstrument(resolve_tracked(model))
    inst.attach(model)
    loss_sum, n = token_loss_sum(model, batch)
    with torch.no_grad():  # DPO reference pass through the same modules
        token_loss_sum(model, make_batch(batch=5, seq=10, pad_last=0))
    loss_sum.backward()
    inst.detach()
    for key, (_, _, count) in inst.sums_in.items():
        assert count == 27, key
    for key, (_, count) in inst.sums_out.items():
        assert count == 27, key


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_counts_once(reentrant):
    """Checkpointing re-runs forward during backward; each token must still count once."""
    batch = make_batch()
    states = []
    for checkpointing in (False, True):
        model = make_model("llama")
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": reentrant})
        inst = run_instrumented(model, [batch], resolve_tracked(model), dtype=torch.float64)
        states.append(inst.state_dict())
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        if key.endswith("count"):
            assert torch.equal(states[0][key], states[1][key]), key
        else:  # the recompute's kernels may round differently in fp32
            torch.testing.assert_close(states[0][key], states[1][key], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("between, max_tokens", [("no_grad", None), ("grad", None), ("grad", 11), ("grad_lifo", 11)])
def test_reentrant_checkpointing_uses_each_forwards_own_mask(between, max_tokens):
    """Reentrant checkpointing takes the statistics in the recompute during backward. Another forward
    with other padding (same shape) between a forward and its backward must not lend the recompute its
    mask or token subset: counts and sums equal the run without checkpointing. ``grad_lifo``: the
    second forward is back-propagated first, so subsets drawn at recompute time would be swapped."""
    first = make_batch(batch=3, seq=10, pad_last=3, seed=1)  # 27 tokens
    second = make_batch(batch=3, seq=10, pad_last=7, seed=2)  # 23 tokens
    states = []
    for checkpointing in (False, True):
        model = make_model("llama")
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": True})
        inst = CovarianceInstrument(resolve_tracked(model), dtype=torch.float64, max_tokens=max_tokens, seed=4)
        with inst.attached(model):
            loss1, n1 = token_loss_sum(model, first)
            with torch.no_grad() if between == "no_grad" else contextlib.nullcontext():
                loss2, n2 = token_loss_sum(model, second)
            order = {"no_grad": [(loss1, n1)], "grad": [(loss1, n1), (loss2, n2)],
                     "grad_lifo": [(loss2, n2), (loss1, n1)]}[between]
            for loss, n in order:
                inst.loss_normalizer = n
                (loss / n).backward()
        states.append(inst.state_dict())
    expected = 27 if between == "no_grad" else (27 + 23 if max_tokens is None else 2 * max_tokens)
    assert int(states[1]["cov_in/L0/attn_in/count"]) == expected
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        if key.endswith("count"):
            assert torch.equal(states[0][key], states[1][key]), key
        elif not key.startswith("meta/"):
            # the recompute's fp32 kernels round differently (~1e-7 of the norm seen); a wrong mask or
            # token subset moves every sum by O(10%) (4 of 27 tokens)
            rel = (states[1][key] - states[0][key]).norm() / states[0][key].norm()
            assert rel < 1e-5, (key, float(rel))


def test_accumulation_equals_one_big_batch():
    full = make_batch(batch=4, seq=8, pad_last=2, seed=3)
    halves = [{k: v[:2] for k, v in full.items()}, {k: v[2:] for k, v in full.items()}]
    states = []
    for batches in ([full], halves):
        model = make_model("llama")
        states.append(run_instrumented(model, batches, resolve_tracked(model), dtype=torch.float64).state_dict())
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=1e-6, atol=1e-9)


def test_inplace_op_after_hooked_module():
    """An output changed in place after the hooked module (PEFT does ``result += lora(x)``) still
    yields the module's own delta ``dL/dy``, not the gradient of the modified tensor."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x):
            y = self.lin(x)
            y.mul_(2.0)  # in place: dL/dy = 2 * dL/dy', so the two gradients differ
            y += 1.0
            return (y ** 2).sum()

    net = Net()
    x = torch.randn(5, 4)
    tm = TrackedMatrix(0, "o", net.lin)
    inst = CovarianceInstrument([tm], dtype=torch.float64)
    with inst.attached(net):
        net(x).backward()
    y_final = 2 * net.lin(x) + 1.0
    d = (2 * y_final * 2).double()  # dL/dy for y = lin(x): the chain through mul_(2)
    state = inst.state_dict()
    assert int(state["cov_out/L0/o/count"]) == 5
    torch.testing.assert_close(state["cov_out/L0/o/sum_outer"], d.T @ d, rtol=1e-5, atol=1e-8)


def test_bf16_autocast_accumulates_in_fp32():
    model = make_model("llama")
    batch = make_batch()
    tracked = resolve_tracked(model)
    ref = run_instrumented(model, [batch], tracked, dtype=torch.float32).state_dict()
    model.zero_grad()
    inst = CovarianceInstrument(tracked)
    inst.attach(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_sum, n = token_loss_sum(model, batch)
    inst.loss_normalizer = n
    (loss_sum / n).backward()
    inst.detach()
    state = inst.state_dict()
    for key, value in state.items():
        if key.startswith("meta/"):
            continue  # the token-subsampling generator's state
        assert value.dtype in (torch.float32, torch.float64), key
        if key.endswith("sum_outer"):
            rel = (value - ref[key]).norm() / ref[key].norm()
            assert rel < 0.1, (key, float(rel))


def test_token_subsampling_is_unbiased_size_and_seeded():
    model = make_model("llama")
    batch = make_batch()
    tracked = resolve_tracked(model)
    a = run_instrumented(model, [batch], tracked, max_tokens=11, seed=5).state_dict()
    b = run_instrumented(model, [batch], tracked, max_tokens=11, seed=5).state_dict()
    assert int(a["cov_in/L0/attn_in/count"]) == 11
    for key in a:
        assert torch.equal(a[key], b[key])


def test_hooks_removed_and_state_round_trip():
    model = make_model("llama")
    inst = CovarianceInstrument(resolve_tracked(model))
    with pytest.raises(RuntimeError, match="boom"), inst.attached(model):
        token_loss_sum(model, make_batch())[0].backward()
        raise RuntimeError("boom")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    clone = CovarianceInstrument(resolve_tracked(model))
    clone.load_state_dict(inst.state_dict())
    for key, value in inst.state_dict().items():
        assert torch.equal(clone.state_dict()[key], value)
