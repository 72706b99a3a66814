"""InstrumentSuite end to end: the quantities together, layer means, schedule, no side effects on
training, hook removal, PEFT LoRA, state round trip and mid-phase resume. Each quantity's own
brute-force check is in tests/hooks/quantities/; the references are built by tests/hooks/brute_force.py.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_batch, make_model, token_loss_sum
from tests.hooks.brute_force import REL, K, Recorder, batches, layer, second_moment, step_once
from weightgeom.hooks import geometry as geo
from weightgeom.hooks import keys
from weightgeom.hooks.quantities import DEFAULT_QUANTITIES
from weightgeom.hooks.roles import ROLES
from weightgeom.hooks.schedule import Schedule
from weightgeom.hooks.suite import InstrumentSuite


def test_default_metrics_are_every_quantity_with_layer_means(trained):
    """compute() with the default quantities is the union of each quantity's own metrics (checked against
    brute force one by one in tests/hooks/quantities/), and every ``{family}/all/{name}`` is the mean of
    that family's per-layer values (both layers present here)."""
    trained.suite.quantities = DEFAULT_QUANTITIES
    metrics = trained.suite.compute(3)
    union = {}
    for quantity in DEFAULT_QUANTITIES:
        union.update(trained.compute(quantity))
    assert metrics == pytest.approx(union, rel=1e-12)
    means = [k for k in metrics if keys.parse(k) is not None and keys.parse(k).mean]
    assert keys.layer_mean("rsf_in", "q") in means and keys.layer_mean("z_out_pred", "down") in means
    for key in means:
        parsed = keys.parse(key)
        per_layer = [metrics[keys.metric(parsed.family, i, parsed.name)] for i in range(2)]
        assert metrics[key] == pytest.approx(sum(per_layer) / 2, rel=1e-12), key


def test_zero_delta_role_has_no_rsf_keys():
    """A frozen matrix writes nothing: no RSF, z, gap or coherence for it; its input group is still
    measured (through a trainable role of the group), and the layer mean skips it."""
    model = make_model("llama")
    layer(model, 0).self_attn.q_proj.weight.requires_grad_(False)
    suite = InstrumentSuite(model, k=K, every_n=1)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    with suite.attached(model, opt):
        for step, batch in enumerate(batches(2), 1):
            metrics = step_once(model, opt, suite, batch, step)
    assert not [k for k in metrics if k.endswith("L0/q")]
    assert "rsf_in/L0/k" in metrics and "rsf_in/L1/q" in metrics and "spike_in/L0/attn_in/top1" in metrics
    assert metrics["rsf_in/all/q"] == metrics["rsf_in/L1/q"]


def test_k_is_capped_at_dim_minus_one():
    model = make_model("llama")
    suite = InstrumentSuite(model, input_roles=ROLES, k=100, every_n=1, zscores=False, dtype=torch.float64,
                            metric_dtype="float64")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with suite.attached(model, opt):
        metrics = step_once(model, opt, suite, make_batch(), 1)
    for key, _role, group, n in (("L0/q", "q", "L0/attn_in", 32), ("L1/down", "down", "L1/down_in", 64)):
        tm = next(t for t in suite.tracked if t.key == key)
        U = geo.top_eigvecs(suite.cov.covariance_in(group), n - 1)[0]
        expected = geo.relative_rsf(geo.rsf_in(suite.upd.delta(tm), U), n - 1, n)
        assert metrics[f"rsf_in/{key}"] == pytest.approx(expected, rel=REL)
    tm = next(t for t in suite.tracked if t.key == "L0/o")
    V = geo.prediction_subspace(model.lm_head.weight, model.model.norm.weight, k=31)[0]
    assert metrics["rsf_out_pred/L0/o"] == pytest.approx(geo.relative_rsf(geo.rsf_out(suite.upd.delta(tm), V), 31, 32),
                                                         rel=REL)


# ----- 2. schedule --------------------------------------------------------------------------------

@pytest.mark.parametrize("every_n, log_spaced, expected", [(3, False, {3, 6, 9}), (5, True, {1, 2, 4, 5, 8, 10})])
def test_metrics_returned_exactly_at_scheduled_steps(every_n, log_spaced, expected):
    model = make_model("llama", num_layers=1)
    suite = InstrumentSuite(model, roles=("q", "o"), k=2, every_n=every_n, log_spaced=log_spaced, zscores=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = make_batch(batch=2, seq=6, pad_last=0)
    fired = set()
    with suite.attached(model, opt):
        for step in range(1, 11):
            metrics = step_once(model, opt, suite, batch, step)
            assert (metrics is None) == (step not in expected), step
            if metrics is not None:
                fired.add(step)
                assert "rsf_in/L0/q" in metrics
        forced = step_once(model, opt, suite, batch, 11, force=True)  # 11 is never scheduled here
    assert fired == expected
    assert isinstance(forced, dict) and "rsf_out_pred/L0/o" in forced


def test_schedule_predicate():
    assert [s for s in range(0, 40) if Schedule(every_n=1000, log_spaced=True)(s)] == [1, 2, 4, 8, 16, 32]
    assert [s for s in range(0, 20) if Schedule(every_n=7)(s)] == [7, 14]
    two = [s for s in range(0, 17) if Schedule(every_n=1000, log_spaced=True, points_per_octave=2)(s)]
    assert two == [1, 2, 3, 4, 6, 8, 11, 16]
    with pytest.raises(ValueError, match="every_n"):
        Schedule(every_n=0)


# ----- 3. attaching changes nothing ---------------------------------------------------------------

@pytest.mark.parametrize("max_tokens", [None, 7])
def test_suite_leaves_training_bit_identical(max_tokens):
    """Loss, gradients and updated weights bit-identical to a plain run; global RNG untouched."""
    runs = []
    for instrumented in (False, True):
        model = make_model("llama")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        suite = InstrumentSuite(model, k=K, every_n=1, max_tokens=max_tokens)
        trace = []
        if instrumented:
            suite.attach(model, opt)
        for step, batch in enumerate(batches(2), 1):
            rng = torch.get_rng_state()
            opt.zero_grad()
            loss_sum, n = token_loss_sum(model, batch)
            suite.set_loss_normalizer(n)
            (loss_sum / n).backward()
            trace.append(loss_sum.detach().clone())
            trace += [p.grad.clone() for p in model.parameters()]
            opt.step()
            if instrumented:
                assert suite.after_optimizer_step(step) is not None
                assert torch.equal(torch.get_rng_state(), rng), f"suite touched the global RNG at step {step}"
            trace += [p.detach().clone() for p in model.parameters()]
        suite.detach()
        if instrumented:
            assert int(suite.cov.state_dict()["cov_in/L0/attn_in/count"]) == (14 if max_tokens else 54)
        runs.append(trace)
    assert len(runs[0]) == len(runs[1])
    for i, (a, b) in enumerate(zip(*runs)):
        assert torch.equal(a, b), i


# ----- 4. hooks removed on error ------------------------------------------------------------------

def _no_hooks(model, opt) -> bool:
    modules_clean = all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
                        for m in model.modules())
    params_clean = all(not getattr(p, "_backward_hooks", None) for p in model.parameters())
    return modules_clean and params_clean and not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_hooks_removed_when_training_raises():
    model = make_model("llama")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    suite = InstrumentSuite(model, k=K, every_n=1, zscores=False)
    with pytest.raises(RuntimeError, match="boom"), suite.attached(model, opt):
        step_once(model, opt, suite, make_batch(), 1)
        assert not _no_hooks(model, opt)  # attached for real, so the check below can fail
        token_loss_sum(model, make_batch(seed=2))  # mid-step: a forward whose backward never runs
        raise RuntimeError("boom")
    assert _no_hooks(model, opt)
    assert not suite.cov.is_attached and not suite.upd.is_attached
    # nothing is measured any more: another plain training step leaves the suite's state alone
    before = suite.state_dict()
    opt.zero_grad()
    loss_sum, n = token_loss_sum(model, make_batch(seed=3))
    (loss_sum / n).backward()
    opt.step()
    after = suite.state_dict()
    for key in before:
        if key.startswith(("cov_", "weights/")) and not key.endswith("/delta"):
            assert torch.equal(before[key], after[key]), key
    # and the suite can be attached again
    with suite.attached(model, opt):
        step_once(model, opt, suite, make_batch(seed=4), 2)
    assert suite.upd.steps == 2 and _no_hooks(model, opt)


# ----- 5. PEFT LoRA -------------------------------------------------------------------------------

@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["v_proj"]])
def test_lora(targets):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(make_model("llama"),
                                peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    suite = InstrumentSuite(model, k=K, every_n=1000, dtype=torch.float64, zscores=False)  # built after wrapping
    L0 = model.get_base_model().model.layers[0]
    L1 = model.get_base_model().model.layers[1]
    rec = Recorder({"attn_in": L0.self_attn.v_proj}, deltas={"o": L1.self_attn.o_proj})
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    data, norms = batches(3), []
    with suite.attached(model, opt):
        for step, batch in enumerate(data, 1):
            opt.zero_grad()
            loss_sum, n = token_loss_sum(model, batch)
            suite.set_loss_normalizer(n)
            (loss_sum / n).backward()
            norms.append(n)
            opt.step()
            metrics = suite.after_optimizer_step(step, force=step == 3)
    rec.remove()
    masks = [b["attention_mask"] for b in data]
    state = suite.cov.state_dict()
    # layer 0's input group is measured although the embedding output needs no grad
    assert int(state["cov_in/L0/attn_in/count"]) == 81
    torch.testing.assert_close(suite.cov.covariance_in("L0/attn_in"), second_moment(rec.inputs["attn_in"], masks),
                               rtol=1e-9, atol=1e-12)
    # the frozen o_proj is still a measured output side: its C_delta is the plain upstream gradient
    torch.testing.assert_close(suite.cov.covariance_out("L1/o"),
                               second_moment([e.grad for e in rec.eps["o"]], masks, scales=norms),
                               rtol=1e-6, atol=1e-12)
    # the effective delta of a LoRA-wrapped matrix is scale * B A; frozen matrices have none
    tracked = {tm.key: tm for tm in suite.tracked}
    for role, module in (("q", L0.self_attn.q_proj), ("v", L0.self_attn.v_proj)):
        if f"{role}_proj" in targets:
            BA = module.lora_B["default"].weight @ module.lora_A["default"].weight * module.scaling["default"]
            assert BA.abs().max() > 0
            torch.testing.assert_close(suite.upd.delta(tracked[f"L0/{role}"]), BA.detach(), rtol=1e-5, atol=1e-7)
            assert f"rsf_in/L0/{role}" in metrics and f"rsf_in_grad/L0/{role}" not in metrics
        else:
            assert not suite.upd.delta(tracked[f"L0/{role}"]).any()
            assert f"rsf_in/L0/{role}" not in metrics
    assert not [k for k in metrics if k.startswith(("rsf_", "z_", "coherence/")) and k.endswith(("/o", "/k", "/down"))]
    assert "spike_out/L1/o/top1" in metrics


# ----- 6. state round trip and resume -------------------------------------------------------------

def _train(model, opt, suite, data, first_step=1):
    metrics = None
    with suite.attached(model, opt):
        for step, batch in enumerate(data, first_step):
            metrics = step_once(model, opt, suite, batch, step)
    return metrics


def test_state_round_trip_gives_identical_compute(tmp_path):
    model = make_model("llama")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    suite = InstrumentSuite(model, input_roles=ROLES, k=K, every_n=1000)
    _train(model, opt, suite, batches(2))
    expected = suite.compute(2)
    suite.save(tmp_path / "s.safetensors")
    for state in (suite.state_dict(), load_file(str(tmp_path / "s.safetensors"))):
        clone = InstrumentSuite(model, input_roles=ROLES, k=K, every_n=1000)
        clone.load_state_dict(state)
        assert clone.compute(2) == expected
    assert any(k.startswith("rsf_in_frozen/") for k in expected)


@pytest.mark.parametrize("max_tokens", [None, 20])
def test_resume_mid_phase_equals_continuous_run(max_tokens):
    data = batches(4)
    kw = dict(input_roles=ROLES, k=K, every_n=1000, max_tokens=max_tokens)

    model = make_model("llama")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    continuous = InstrumentSuite(model, **kw)
    _train(model, opt, continuous, data)

    model = make_model("llama")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = InstrumentSuite(model, **kw)
    _train(model, opt, first, data[:2])
    saved = ({k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict(), first.state_dict())
    del model, opt, first

    model = make_model("llama", seed=123)  # different init: everything must come from the saved state
    model.load_state_dict(saved[0])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt.load_state_dict(saved[1])
    resumed = InstrumentSuite(model, **kw)
    resumed.load_state_dict(saved[2])
    _train(model, opt, resumed, data[2:], first_step=3)

    a, b = continuous.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert continuous.compute(4) == resumed.compute(4)


def test_default_sides_skip_write_pathway_inputs():
    """By default C_a is measured for the read pathway's inputs only (q/k/v and gate/up), and
    C_delta for the write pathway's outputs (o, down): o's and down's inputs are not accumulated."""
    model = make_model("llama")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    suite = InstrumentSuite(model, k=K, every_n=1, zscores=False)
    with suite.attached(model, opt):
        metrics = step_once(model, opt, suite, make_batch(seed=5), 1)
    groups = {key.split("/")[1] for key in suite.cov.sums_in}
    assert groups == {"attn_in", "mlp_in"}
    assert set(suite.cov.sums_out) == {f"L{i}/{r}" for i in range(2) for r in ("o", "down")}
    assert "rsf_in/L0/q" in metrics and "rsf_in/L0/up" in metrics
    assert not any(k.startswith("rsf_in/") and k.endswith(("/o", "/down")) for k in metrics)
    assert "rsf_out_pred/L0/o" in metrics and "rsf_out_delta/L1/down" in metrics


def test_attach_refuses_modules_replaced_after_construction():
    """PEFT wrapping after the suite was built would leave hooks on frozen base layers: an error."""
    peft = pytest.importorskip("peft")
    model = make_model("llama")
    suite = InstrumentSuite(model, k=K, every_n=1, zscores=False)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    with pytest.raises(RuntimeError, match="build the suite after wrapping"), \
            suite.attached(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1)):
        pass
    assert not any(m._forward_hooks for m in wrapped.modules())


def _trained_suite(**kw):
    model = make_model("llama")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    suite = InstrumentSuite(model, k=K, every_n=1000, **kw)
    with suite.attached(model, opt):
        for step in range(1, 4):
            step_once(model, opt, suite, make_batch(seed=step), step)
    return suite


def test_float32_metrics_are_close_to_float64():
    """metric_dtype float32 (the default) against float64 on the same statistics: relative RSF,
    z-scores and spikiness within 1e-3 relative (RSF itself within 1e-5 of isotropic units)."""
    suite = _trained_suite()
    suite.config.metric_dtype = "float64"
    exact = suite.compute(3)
    suite.config.metric_dtype = "float32"
    fast = suite.compute(3)
    assert fast.keys() == exact.keys()
    worst = {}
    for key, value in exact.items():
        family = key.split("/")[0]
        err = abs(fast[key] - value) / max(abs(value), 1.0)
        worst[family] = max(worst.get(family, 0.0), err)
    assert max(v for f, v in worst.items() if f.startswith("rsf_")) < 1e-5, worst
    assert max(worst.values()) < 1e-3, worst


def test_one_host_synchronisation_per_computation(monkeypatch):
    """Values are gathered on the device and brought to the host together: no .item() or bool() per
    metric (each is a device sync on a GPU). Two .tolist() calls: which matrices were written, and
    every value at the end."""
    suite = _trained_suite()
    calls = defaultdict(int)
    for name in ("item", "tolist", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _original=original, **kw):
            calls[_name] += 1
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    metrics = suite.compute(3)
    assert len(metrics) > 100
    assert dict(calls) == {"tolist": 2}, dict(calls)


def test_reward_model_without_unembedding_trains_and_skips_the_prediction_subspace(tmp_path):
    """A sequence-classification model (a reward model: ``score`` head, no ``lm_head``): the suite attaches,
    trains a step and computes every metric but the prediction-subspace ones, says so once in ``skipped``,
    and its snapshots hold no pred/W_U. Its C_delta is still the brute force of the pair loss."""
    import transformers  # noqa: PLC0415 (only this test builds a non-causal-LM head)

    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, vocab_size=97, pad_token_id=2, num_labels=1)
    config._attn_implementation = "eager"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.AutoModelForSequenceClassification.from_config(config)
    assert not hasattr(model, "lm_head") and hasattr(model, "score")
    batch = make_batch(batch=4, seq=10, pad_last=3)  # rows (0, 1) and (2, 3): chosen, rejected
    suite = InstrumentSuite(model, k=K, every_n=1, dtype=torch.float64, metric_dtype="float64")
    no_pred, untracked = suite.skipped  # one line each
    assert "no prediction subspace" in no_pred and "lm_head" in no_pred
    assert untracked == "not tracked (no role covers them): score (Linear (1, 32)) (outside the blocks)"
    rec = Recorder({}, deltas={"o": layer(model, 1).self_attn.o_proj})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with suite.attached(model, opt):
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        loss_sum = -torch.nn.functional.logsigmoid(rewards[0::2] - rewards[1::2]).sum()
        suite.set_loss_normalizer(2)  # the pair-mean loss divides by 2 pairs
        (loss_sum / 2).backward()
        opt.step()
        metrics = suite.after_optimizer_step(1)
    rec.remove()
    assert metrics and not [k for k in metrics if "pred" in keys.family(k)]
    assert keys.metric("rsf_in", 0, "q") in metrics and keys.metric("rsf_out_delta", 1, "o") in metrics
    expected = second_moment([e.grad for e in rec.eps["o"]], [batch["attention_mask"]], scales=[2])
    torch.testing.assert_close(suite.cov.covariance_out("L1/o"), expected, rtol=1e-6, atol=1e-12)
    state = suite.snapshot_state()
    assert keys.W_U not in state and keys.GAIN not in state
    suite.save(tmp_path / "s.safetensors")
    assert keys.W_U not in load_file(str(tmp_path / "s.safetensors"))
