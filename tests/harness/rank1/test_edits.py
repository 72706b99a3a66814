"""Rank-1 edits: closed-form steepest-descent edits of one matrix, their first-order and K-FAC
predictions, and editing fused matrices in place (restored bit for bit). References: dense float64
Kronecker products and the exact derivative of the loss along an edit."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_model
from tests.harness.rank1.helpers import rand_psd, tracked_matrix
from weightgeom.harness.rank1.edits import (
    edited_weight,
    first_order,
    input_side_edit,
    kfac_second_order,
    output_side_edit,
    role_shape,
)

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
