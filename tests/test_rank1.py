"""Rank-1 interventions: edit math, controls, statistics, in-place editing, and the end-to-end command.

Brute-force references: dense float64 Kronecker products, per-token activations and output
gradients captured with plain hooks and autograd, and the exact derivative of the loss along an
edit (``torch.func.functional_call`` with a scalar step).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import random
import shutil

import pytest
import torch

from tests.conftest import make_model
from tests.test_trl_dpo import PROMPTS, tiny_tokenizer
from weightgeom.core.data import tokenize_pairs
from weightgeom.harness.cli import main
from weightgeom.harness.rank1.directions import (
    family_generator,
    haar_directions,
    lower_ranks,
    variance_matched,
    widest_angle_in_band,
)
from weightgeom.harness.rank1.edits import (
    edited_weight,
    first_order,
    input_side_edit,
    kfac_second_order,
    output_side_edit,
    role_shape,
)
from weightgeom.harness.rank1.experiment import (
    FAMILIES,
    Forms,
    Rank1Config,
    Rank1Result,
    build_directions,
    prediction_form,
    rank1_experiment,
    zscore,
)
from weightgeom.harness.rank1.measure import evaluate, measure_statistics, prepare_heldout
from weightgeom.harness.rank1.report import rank1_section, write_rank1_report
from weightgeom.hooks import geometry as geo
from weightgeom.hooks.roles import resolve_tracked
from weightgeom.hooks.roles import unembedding as resolve_unembedding
from weightgeom.trainers.losses import DPOLoss, sequence_logps
from weightgeom.trainers.pairs import pair_logps

CPU = torch.device("cpu")
WORDS = ["the", "a", "cat", "dog", "bird", "sat", "ran", "flew", "on", "under", "mat", "tree", "yes", "no", "good", "bad", "very"]


def random_pairs(n: int, seed: int = 0) -> list[dict]:
    """Pairs of different lengths (so the batches have padding) in the tiny word-level vocabulary."""
    rng = random.Random(seed)

    def words() -> str:
        return " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))

    return [{"prompt": PROMPTS[i % len(PROMPTS)], "chosen": words(), "rejected": words()} for i in range(n)]


def text_blocks(n: int = 3, length: int = 12) -> torch.Tensor:
    return torch.randint(3, len(WORDS), (n, length), generator=torch.Generator().manual_seed(0))


def tracked_matrix(model, key: str):
    layer, role = key.split("/")
    return next(tm for tm in resolve_tracked(model, (role,)) if tm.layer == int(layer[1:]))


def rand_psd(n: int, seed: int, spike: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3 * n, generator=g, dtype=torch.float64)
    C = X @ X.T / (3 * n)
    if spike:
        e = torch.randn(n, generator=g, dtype=torch.float64)
        C = C + spike * torch.outer(e, e) / e.dot(e)
    return C


# ----- edits -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["in", "out"])
def test_edit_has_rank_one_norm_eps_and_is_the_steepest_given_its_direction(side):
    g = torch.Generator().manual_seed(0)
    G = torch.randn(7, 5, generator=g, dtype=torch.float64)
    direction = torch.randn(5 if side == "in" else 7, generator=g, dtype=torch.float64) * 3.0  # not unit
    edit = input_side_edit(G, direction) if side == "in" else output_side_edit(G, direction)
    for eps in (0.3, 1.7):
        dW = edit.dense(eps)
        s = torch.linalg.svdvals(dW)
        assert s[0] == pytest.approx(eps, rel=1e-12) and float(s[1]) < 1e-12 * eps  # rank 1, ||dW||_F = eps
        assert float(dW.norm()) == pytest.approx(eps, rel=1e-12)
        unit = direction / direction.norm()
        expected = -eps * float((G @ unit).norm() if side == "in" else (unit @ G).norm())
        assert first_order(G, dW) == pytest.approx(expected, rel=1e-12)
        # reads (writes) only along the direction: anything orthogonal to it is untouched
        other = torch.randn(unit.shape[0], generator=g, dtype=torch.float64)
        other = other - other.dot(unit) * unit
        assert float((dW @ other if side == "in" else other @ dW).abs().max()) < 1e-12
        # no other rank-1 edit of norm eps along the same direction lowers <G, dW> further
        for _ in range(50):
            free = torch.randn(7 if side == "in" else 5, generator=g, dtype=torch.float64)
            free = free / free.norm()
            rival = -eps * (torch.outer(free, unit) if side == "in" else torch.outer(unit, free))
            assert first_order(G, rival) >= first_order(G, dW) - 1e-12


def test_edit_refuses_a_direction_the_gradient_does_not_see():
    G = torch.zeros(4, 3, dtype=torch.float64)
    G[:, 0] = 1.0
    with pytest.raises(ValueError, match="G v = 0"):
        input_side_edit(G, torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="length matches"):
        output_side_edit(G, torch.ones(3))


def test_kfac_term_equals_the_dense_kronecker_quadratic_form():
    m, n = 5, 4
    C_a, C_d = rand_psd(n, 1), rand_psd(m, 2)
    dW = torch.randn(m, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    vec = dW.T.reshape(-1)  # column-major vec: vec(C_d dW C_a) = (C_a kron C_d) vec(dW)
    dense = 0.5 * 3.5 * float(vec @ torch.kron(C_a, C_d) @ vec)
    assert kfac_second_order(dW, C_a, C_d, tokens_per_unit=3.5) == pytest.approx(dense, rel=1e-12)


def test_kfac_with_tokens_per_pair_is_the_per_pair_fisher_when_its_factorisation_is_exact():
    """Tokens on a product grid (every activation meets every output gradient once): then
    sum_t (a a^T) kron (d d^T) = N C_a kron C_delta exactly, and the K-FAC term with N/P tokens per
    pair is (1/P) sum_t (d_t^T dW a_t)^2, the per-pair Fisher without cross-token terms."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 3, generator=g, dtype=torch.float64)  # 4 activations in R^3
    D = torch.randn(5, 6, generator=g, dtype=torch.float64)  # 5 output gradients in R^6
    a = A.repeat_interleave(5, 0)
    d = D.repeat(4, 1)  # 20 tokens: every (a_i, d_j) once
    n_pairs = 4
    C_a, C_d = a.T @ a / len(a), d.T @ d / len(d)
    dW = torch.randn(6, 3, generator=g, dtype=torch.float64)
    per_token = ((d @ dW) * a).sum(1).square().sum() / n_pairs
    assert kfac_second_order(dW, C_a, C_d, len(a) / n_pairs) == pytest.approx(0.5 * float(per_token), rel=1e-12)


# ----- controls --------------------------------------------------------------------------------------

def test_haar_controls_are_orthonormal_unit_and_reproducible_from_the_seed():
    H = haar_directions(16, 10, family_generator(7, "haar", "L0/q", "in"))
    assert torch.allclose(H.T @ H, torch.eye(10, dtype=torch.float64), atol=1e-12)
    assert torch.equal(H, haar_directions(16, 10, family_generator(7, "haar", "L0/q", "in")))
    assert not torch.allclose(H, haar_directions(16, 10, family_generator(8, "haar", "L0/q", "in")))
    assert not torch.allclose(H, haar_directions(16, 10, family_generator(7, "haar", "L1/q", "in")))
    wide = haar_directions(4, 10, family_generator(0))  # more than dim: orthonormal frames of 4
    assert torch.allclose(wide.norm(dim=0), torch.ones(10, dtype=torch.float64))
    assert torch.allclose(wide[:, :4].T @ wide[:, :4], torch.eye(4, dtype=torch.float64), atol=1e-12)


def test_lower_ranks_spread_from_below_the_tested_ones_to_the_bottom():
    assert lower_ranks(2, 32, 4) == [2, 12, 21, 31]
    assert lower_ranks(1, 3, 8) == [1, 2]
    assert lower_ranks(1, 8, 0) == []


def test_variance_matched_controls_lie_in_the_band_with_the_least_overlap_the_spectrum_allows():
    Q = rand_psd(12, 4, spike=20.0)  # one spiked direction
    evals, evecs = geo.sym_eigh(Q)
    tol = 0.1
    mixed = evecs[:, 0] + 0.5 * evecs[:, 1] + 0.3 * evecs[:, 5]  # no eigenvector
    for rank, t in ((0, evecs[:, 0]), (3, evecs[:, 3]), (None, mixed / mixed.norm())):
        match = variance_matched(Q, t, 25, tol, family_generator(0, "matched", rank))
        W = match.directions
        q = float(t @ Q @ t)
        values = torch.einsum("ic,ij,jc->c", W, Q, W)
        assert torch.allclose(W.norm(dim=0), torch.ones(25, dtype=torch.float64))
        assert float(values.min()) >= q * (1 - tol) * (1 - 1e-10) and float(values.max()) <= q * (1 + tol) * (1 + 1e-10)
        assert torch.allclose(values, match.values)
        assert torch.allclose((W.T @ t).abs(), match.overlaps)
        assert torch.equal(W, variance_matched(Q, t, 25, tol, family_generator(0, "matched", rank)).directions)
        assert float((W.T @ W - torch.eye(25, dtype=torch.float64)).abs().max()) < 1 - 1e-6  # distinct controls
        assert (match.min_overlap is None) == (rank is None)
        assert rank is None or float(match.overlaps.min()) >= match.min_overlap - 1e-9
        # no point of the great circle from t through a control is in the band and farther from t
        for c in range(25):
            w = W[:, c]
            r = w - w.dot(t) * t
            r = r / r.norm()
            thetas = torch.linspace(0, math.pi, 20001, dtype=torch.float64)
            circle = torch.cos(thetas)[:, None] * t + torch.sin(thetas)[:, None] * r
            f = torch.einsum("ti,ij,tj->t", circle, Q, circle)
            feasible = (f >= q * (1 - tol)) & (f <= q * (1 + tol))
            assert float(torch.sin(thetas[feasible]).abs().max()) <= math.sqrt(1 - float(match.overlaps[c]) ** 2) + 1e-4
    # the spiked top eigenvector: every vector in the band must overlap it (the spectrum's bound); the
    # controls come within the tol slack of the bound: they mix t with a direction of >= (1 - tol) l2
    l1, l2 = float(evals[0]), float(evals[1])
    top = variance_matched(Q, evecs[:, 0], 25, tol, family_generator(1))
    assert top.min_overlap == pytest.approx(math.sqrt(((1 - tol) * l1 - l2) / (l1 - l2)), rel=1e-9)
    worst = math.sqrt(((1 - tol) * l1 - (1 - tol) * l2) / (l1 - (1 - tol) * l2))
    assert top.min_overlap > 0.8 and float(top.overlaps.max()) <= worst + 1e-9
    # a lower eigenvector's band, and a top one without a dominant spike, are reachable orthogonally
    assert variance_matched(Q, evecs[:, 3], 5, tol, family_generator(1)).overlaps.max() < 1e-9
    flat = torch.diag(torch.tensor([10.0, 9.5, 9.2, 3.0, 2.0, 1.0, 1.0, 0.5], dtype=torch.float64))
    near = variance_matched(flat, torch.eye(8, dtype=torch.float64)[:, 0], 10, tol, family_generator(2))
    assert near.min_overlap == 0.0 and float(near.overlaps.max()) < 1e-9
    gram = (near.directions.T @ near.directions).abs()
    assert near.pairwise_overlap == pytest.approx(float((gram.sum() - 10) / 90), rel=1e-9)
    assert near.pairwise_overlap > 0.5  # the band [9, 11] holds little besides e_2 = 9.5 and e_3 = 9.2
    assert variance_matched(torch.eye(8, dtype=torch.float64), torch.eye(8, dtype=torch.float64)[:, 0], 10, tol,
                            family_generator(3)).pairwise_overlap < 0.5  # isotropic: spread-out controls


def test_widest_angle_in_band_matches_a_brute_force_search_on_the_circle():
    thetas = torch.linspace(0, math.pi, 200001, dtype=torch.float64)[:-1]
    for q_a, q_b, c, lo, hi in ((5.0, 1.0, 1.5, 4.0, 4.6), (5.0, 1.0, -1.5, 4.0, 4.6), (2.0, 2.5, 0.7, 1.9, 2.1),
                                (3.0, 1.0, 0.0, 2.5, 3.5), (1.0, 6.0, 2.0, 6.5, 9.0)):
        f = q_a * torch.cos(thetas) ** 2 + q_b * torch.sin(thetas) ** 2 + 2 * c * torch.sin(thetas) * torch.cos(thetas)
        feasible = (f >= lo) & (f <= hi)
        angle = widest_angle_in_band(q_a, q_b, c, lo, hi)
        if not bool(feasible.any()):
            assert angle is None
            continue
        best = float(torch.sin(thetas[feasible]).abs().max())
        assert abs(math.sin(angle)) == pytest.approx(best, abs=1e-4)
        value = q_a * math.cos(angle) ** 2 + q_b * math.sin(angle) ** 2 + 2 * c * math.sin(angle) * math.cos(angle)
        assert lo - 1e-9 <= value <= hi + 1e-9
    assert widest_angle_in_band(1.0, 2.0, 0.0, 5.0, 6.0) is None


def test_zscore_uses_the_sample_std_and_refuses_to_divide_by_no_spread():
    z, mean, std = zscore(5.0, [1.0, 2.0, 3.0])
    assert (mean, std) == (2.0, 1.0) and z == 3.0
    assert zscore(5.0, [1.0])[0] is None
    assert zscore(5.0, [2.0, 2.0, 2.0])[0] is None


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


# ----- editing in place ----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_fused_edits_touch_only_the_roles_rows_in_the_right_orientation(arch):
    model = make_model(arch)
    for role in ("q", "k", "v"):
        tm = tracked_matrix(model, f"L1/{role}")
        others = [tracked_matrix(model, f"L1/{r}") for r in ("q", "k", "v") if r != role]
        before = {t.key: t.weight() for t in [tm, *others]}
        stored = tm.module.weight.detach().clone()
        x = torch.randn(2, 5, stored.shape[0] if tm.transposed else stored.shape[1],
                        generator=torch.Generator().manual_seed(0))
        y0 = tm.module(x).detach()
        dW = torch.randn(*role_shape(tm), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        with edited_weight(tm, dW):
            assert torch.allclose(tm.weight() - before[tm.key], dW.float(), atol=1e-6)
            for t in others:
                assert torch.equal(t.weight(), before[t.key])
            changed = (tm.module.weight.detach() != stored)
            changed_out = changed.any(0) if tm.transposed else changed.any(1)  # which output features moved
            rows = tm.rows if tm.rows is not None else torch.arange(changed_out.numel())
            assert set(changed_out.nonzero().squeeze(1).tolist()) == set(rows.tolist())
            # y = W a: the role's outputs move by dW a, every other output stays put
            dy = tm.module(x).detach() - y0
            expected = torch.zeros_like(dy)
            expected[..., rows] = x @ dW.float().T
            assert torch.allclose(dy, expected, atol=1e-5)
        assert torch.equal(tm.module.weight.detach(), stored)


def test_weights_are_restored_bit_for_bit_also_when_the_measurement_raises():
    model = make_model("gpt_neox")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tm = tracked_matrix(model, "L0/k")
    dW = torch.full(role_shape(tm), 0.3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="measurement failed"), edited_weight(tm, dW):
        assert not torch.equal(model.state_dict()[_param_name(model, tm)], state[_param_name(model, tm)])
        raise RuntimeError("measurement failed")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="shape"), edited_weight(tm, torch.zeros(3, 3)):
        pass


def _param_name(model, tm) -> str:
    return next(n for n, p in model.named_parameters() if p is tm.module.weight)


# ----- the experiment -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_result():
    """One small experiment on a tiny llama (both sides, two layers), and the model's weights before it."""
    model = make_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tok = tiny_tokenizer()
    cfg = Rank1Config(roles=("q", "o"), n_top=1, n_random=4, n_matched=3, n_lower=2, eps=0.5, seed=3)
    result = rank1_experiment(model, train_data=tokenize_pairs(random_pairs(12), tok, 16),
                              eval_data=tokenize_pairs(random_pairs(6, seed=1), tok, 16), text_blocks=text_blocks(),
                              config=cfg)
    return model, before, result


def test_experiment_restores_the_model_and_records_every_family(tiny_result):
    model, before, result = tiny_result
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.training  # make_model leaves it in train mode; the experiment puts it back
    tested = result.tested()
    assert sorted((d["layer"], d["role"], d["source"]) for d in tested) == [
        (0, "o", "C_delta"), (0, "o", "pred"), (0, "q", "C_a"), (1, "o", "C_delta"), (1, "o", "pred"), (1, "q", "C_a")]
    for t in tested:
        fams = {z["family"]: z for z in result.zscores if z["tested"] == t["id"]}
        assert set(fams) == set(FAMILIES)
        assert fams["haar"]["n"] == 4 and fams["matched"]["n"] == 3 and fams["lower"]["n"] == 2
        assert fams["layer"]["n"] == (0 if t["source"] == "pred" else 1)
        m = t["metrics"]
        assert "dpo_loss_curv" in m
        assert m["pred1_unit"] < 0 and m["pred1"] == pytest.approx(0.5 * m["pred1_unit"], rel=1e-9)
        assert m["pred2_kfac"] > 0 and m["kl"] >= 0
        band = next(x for x in result.matching if x["tested"] == t["id"])
        for d in result.directions:
            if d["tested"] == t["id"] and d["family"] == "matched":
                assert band["lo"] * (1 - 1e-9) <= d["quad"][t["source"]] <= band["hi"] * (1 + 1e-9)
    assert result.base["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)  # reference = base
    assert Rank1Result.from_json(result.to_json()).to_json() == result.to_json()


def test_control_directions_are_reproducible_from_the_seed():
    model = make_model("llama").eval()
    tok = tiny_tokenizer()
    data = tokenize_pairs(random_pairs(8), tok, 16)
    tracked = resolve_tracked(model, ("k", "down"))
    stats = measure_statistics(model, tracked, train_data=data, heldout_data=data, text_blocks=text_blocks(),
                               beta=0.1, batch_size=8, device=CPU)
    forms = Forms(stats, prediction_form(model))
    cfg = Rank1Config(roles=("k", "down"), n_top=2, n_random=5, n_matched=4, n_lower=3, seed=11)
    for tm in (t for t in tracked if t.layer == 1):
        first, _ = build_directions(tm, forms, 2, cfg)
        again, _ = build_directions(tm, Forms(stats, prediction_form(model)), 2, cfg)
        reseeded = Rank1Config(roles=("k", "down"), n_top=2, n_random=5, n_matched=4, n_lower=3, seed=12)
        other, _ = build_directions(tm, forms, 2, reseeded)
        assert [d.id for d in first] == [d.id for d in again]
        assert all(torch.equal(a.vector, b.vector) for a, b in zip(first, again))
        random_ids = [i for i, d in enumerate(first) if d.family in ("haar", "matched")]
        assert all(not torch.allclose(first[i].vector, other[i].vector) for i in random_ids)
        haar = torch.stack([d.vector for d in first if d.family == "haar"], 1)
        assert torch.allclose(haar.T @ haar, torch.eye(5, dtype=torch.float64), atol=1e-12)
        assert all(abs(float(d.vector.norm()) - 1) < 1e-12 for d in first)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("centered", [False, True])
def test_prediction_directions_are_the_right_singular_vectors_of_the_unembedding(arch, centered):
    """Dense SVD of W_U diag(g): vocab-centred on request; LayerNorm models (gpt2) without the ones direction."""
    model = make_model(arch)
    V, s = prediction_form(model, centered)
    W_U, gain, layernorm = resolve_unembedding(model)
    M = W_U.double() * gain.double()
    if centered:
        M = M - M.mean(0, keepdim=True)
    if layernorm:
        M = M - M.mean(1, keepdim=True)
    _, s_dense, Vh = torch.linalg.svd(M, full_matrices=False)
    assert torch.allclose(s[:4], s_dense[:4], rtol=1e-8)
    assert torch.allclose((V[:, :4] * Vh[:4].T).sum(0).abs(), torch.ones(4, dtype=torch.float64), atol=1e-6)


def test_report_files_and_section(tiny_result, tmp_path):
    _, _, result = tiny_result
    md = write_rank1_report(result, tmp_path / "rank1")
    text = md.read_text()
    assert "| layer | role | direction | dL/eps |" in text and "| 1 | o | pred#1 |" in text
    assert (tmp_path / "rank1" / "rank1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "rank1" / "rank1.json").read_text())
    assert len(saved["directions"]) == len(result.directions)
    lines = rank1_section(tmp_path)
    assert lines[0].startswith("## Causal test") and "![rank-1 edits](../rank1/rank1.png)" in lines
    assert rank1_section(tmp_path / "nothing_here") == []


# ----- end to end: a tiny pipeline run, then `harness rank1` -------------------------------------------------

STAGE = "rank1={layers: [1], roles: [q, o], n_top: 1, n_random: 3, n_matched: 2, n_lower: 2, text_blocks: 4}"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The asymmetry_smoke pipeline with one DPO-like objective (pretrain 30 steps, align 6 steps) and a small
    rank1 stage, whose output is kept in ``stage_rank1/`` beside the run (the command tests rewrite RUN/rank1)."""

    root = tmp_path_factory.mktemp("rank1_smoke")
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        assert main(["run", "asymmetry_smoke", f"output_dir={root}", "name=run", f"tokenizer.cache_dir={root / 'tok'}",
                     "align.objectives=[{name: g1.00, loss: graded, grade: 1.0}]",
                     "stages=[pretrain, align, rank1, report]", STAGE, "--no-progress"]) == 0
    (root / "console.txt").write_text(console.getvalue())
    shutil.copytree(root / "run" / "rank1", root / "stage_rank1")
    shutil.copy(root / "run" / "report" / "report.md", root / "stage_rank1" / "report.md")
    return root / "run"


SMALL = ["--layers", "1", "--roles", "q", "o", "--n-top", "1", "--n-random", "3", "--n-matched", "2", "--n-lower", "2",
         "--text-blocks", "4", "--no-progress"]


def test_flags_given_replace_the_defaults_and_zero_counts_as_given():
    from weightgeom.harness.rank1.cli import add_rank1_parser  # noqa: PLC0415
    from weightgeom.harness.rank1.inputs import config_from_args  # noqa: PLC0415

    parser = argparse.ArgumentParser()
    add_rank1_parser(parser.add_subparsers(dest="command"))
    recipe = Rank1Config(roles=["q", "o"], layers=[1], n_lower=2, seed=5, beta=0.2, pred_centered=True)
    args = parser.parse_args(["rank1", "RUN", "--seed", "0", "--n-lower", "0", "--tol", "0", "--eps", "0.25"])
    assert config_from_args(args, recipe) == Rank1Config(roles=["q", "o"], layers=[1], n_lower=0, seed=0, beta=0.2,
                                                         tol=0.0, eps=0.25, pred_centered=True)
    assert config_from_args(parser.parse_args(["rank1", "RUN"]), recipe) == recipe
    assert config_from_args(parser.parse_args(["rank1", "RUN", "--pred-centered"]), Rank1Config()).pred_centered


@pytest.mark.slow
def test_rank1_stage_runs_in_the_pipeline_and_the_command_reproduces_it(smoke_run, tmp_path):
    stage = smoke_run.parent / "stage_rank1"
    result = Rank1Result.from_json((stage / "rank1.json").read_text())
    # the recipe's rank1 section, the run's seed and align.beta; G from the training pairs, measured on the held out
    assert (result.config["roles"], result.config["layers"], result.config["n_random"]) == (["q", "o"], [1], 3)
    assert result.config["seed"] == 0 and result.config["beta"] == 0.1
    assert result.config["n_train_pairs"] + result.config["n_eval_pairs"] == 48
    assert result.config["text_blocks"] == [4, 32]
    assert sorted((d["role"], d["source"]) for d in result.tested()) == [("o", "C_delta"), ("o", "pred"), ("q", "C_a")]
    assert "## Causal test: closed-form rank-1 interventions" in (stage / "report.md").read_text()
    assert (smoke_run.parent / "console.txt").read_text().count("[data]") == 1  # the stage reloads the corpus quietly

    # with no flags, the command takes the recipe's rank1 section: the same experiment, number for number
    assert main(["rank1", str(smoke_run), "--out", str(tmp_path / "cmd"), "--no-progress"]) == 0
    again = Rank1Result.from_json((tmp_path / "cmd" / "rank1.json").read_text())
    assert again.directions == result.directions and again.zscores == result.zscores
    # a flag replaces its setting and nothing else
    assert main(["rank1", str(smoke_run), "--out", str(tmp_path / "seed1"), "--seed", "1", "--no-progress"]) == 0
    other = Rank1Result.from_json((tmp_path / "seed1" / "rank1.json").read_text())
    assert (other.config["seed"], other.config["roles"], other.config["n_random"]) == (1, ["q", "o"], 3)
    assert other.zscores != result.zscores


@pytest.mark.slow
def test_rank1_command_on_a_pipeline_run_writes_json_table_plot_and_report_section(smoke_run):

    weights = smoke_run / "pretrain" / "checkpoints" / "step_0000030" / "model.safetensors"
    saved = weights.read_bytes()
    assert main(["rank1", str(smoke_run), *SMALL]) == 0
    out = smoke_run / "rank1"
    result = Rank1Result.from_json((out / "rank1.json").read_text())
    assert result.config["base_dir"].endswith("pretrain/checkpoints/step_0000030")
    assert result.config["n_train_pairs"] + result.config["n_eval_pairs"] == 48
    assert result.config["text_blocks"] == [4, 32]
    assert sorted((d["role"], d["source"]) for d in result.tested()) == [("o", "C_delta"), ("o", "pred"), ("q", "C_a")]
    table = (out / "rank1.md").read_text()
    assert "| 1 | q | C_a#1 |" in table and "## Matching and overlaps" in table
    assert (out / "rank1.png").read_bytes()[:4] == b"\x89PNG"
    report = (smoke_run / "report" / "report.md").read_text()
    assert "## Causal test: closed-form rank-1 interventions" in report and "| 1 | o | pred#1 |" in report

    # the same seed reproduces every number; the checkpoint on disk is untouched
    assert main(["rank1", str(smoke_run), *SMALL, "--out", str(smoke_run / "again")]) == 0
    again = Rank1Result.from_json((smoke_run / "again" / "rank1.json").read_text())
    assert again.directions == result.directions and again.zscores == result.zscores
    assert weights.read_bytes() == saved


@pytest.mark.slow
def test_rank1_command_on_a_checkpoint_needs_pairs_and_out(smoke_run, tmp_path, capsys):

    ckpt = smoke_run / "pretrain" / "checkpoints" / "step_0000030"
    assert main(["rank1", str(ckpt), *SMALL]) == 2
    assert "--pairs FILE" in capsys.readouterr().err
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": "def f(x):\n", "chosen": f"    return x + {i}\n",
                                           "rejected": f"    x + {i} return\n"}) for i in range(12)))
    text = tmp_path / "text.txt"
    text.write_text("import os\n\ndef main():\n    return os.getcwd()\n" * 40)
    assert main(["rank1", str(ckpt), *SMALL]) == 2
    assert main(["rank1", str(ckpt), "--pairs", str(pairs), "--text", str(text), "--seq-len", "16",
                 "--out", str(tmp_path / "out"), *SMALL]) == 0
    result = Rank1Result.from_json((tmp_path / "out" / "rank1.json").read_text())
    assert (result.config["n_train_pairs"], result.config["n_eval_pairs"]) == (10, 2)  # --eval-fraction 0.2
    assert result.config["text_blocks"] == [4, 16] and "held out only if" in result.config["text_source"]
    capsys.readouterr()
    assert main(["rank1", str(ckpt), "--pairs", str(pairs), "--out", str(tmp_path / "o2"), "--layers", "5",
                 "--text", str(text), "--seq-len", "16", "--no-progress"]) == 2
    assert "layers [5] do not exist: the model has layers 0..1" in capsys.readouterr().err


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
