"""Closed-form rank-1 weight edits, their first- and second-order predictions, and in-place editing.

Conventions (as everywhere in the harness): a weight ``W`` is ``(m, n)`` = out x in, ``y = W a``;
``G = dL/dW`` is the objective's mean gradient in the same orientation.

Edits (pure functions; ``eps`` is the Frobenius norm of ``dW``):

* input side, along a unit direction ``v`` (n,): the edit reads only along ``v``, ``dW = x v^T``.
  ``<G, x v^T> = x^T (G v)`` is most negative over unit ``x`` at ``x = -G v / ||G v||``, so

      dW = -eps * (G v / ||G v||) v^T,        <G, dW> = -eps ||G v||

* output side, along a unit direction ``u`` (m,): the edit writes only along ``u``, ``dW = u y^T``:

      dW = -eps * u (u^T G) / ||u^T G||,      <G, dW> = -eps ||G^T u||

Both have rank 1 and ``||dW||_F = eps``: they are the steepest-descent edit of norm ``eps`` given
the direction. Both are stored as ``dW = -eps * left right^T`` with unit ``left`` (m,) and
``right`` (n,), so one edit can be evaluated at several ``eps`` (and at ``-eps``).

Second order (K-FAC): for a loss that is a mean over P units (pairs, or sequences) of per-unit
losses, the empirical Fisher ``(1/P) sum_p vec(g_p) vec(g_p)^T`` with
``g_p = sum_{t in p} delta_t a_t^T`` is approximated by dropping the cross-token terms and
factorising the token sum: ``sum_t (a_t a_t^T) kron (delta_t delta_t^T) ~= N C_a kron C_delta``,
``C_a = (1/N) sum_t a a^T``, ``C_delta = (1/N) sum_t delta delta^T`` over the same N tokens, with
``delta_t = d l_p / d y_t`` the gradient of the token's *own unit's* loss (the per-pair scale: the
instruments' ``loss_normalizer`` set to P undoes the loss's 1/P). Hence

    L(W + dW) - L(W) ~= <G, dW> + 1/2 (N/P) vec(dW)^T (C_a kron C_delta) vec(dW)
                      = <G, dW> + 1/2 (N/P) tr(dW^T C_delta dW C_a)

(column-major ``vec``). ``N/P`` is the number of counted tokens per unit (per pair: the chosen and
the rejected sequence's non-padding tokens, prompt included). With per-token-scaled ``C_delta``
(a CE loss that is a mean over N tokens, normaliser N) the factor is 1 instead: pass
``tokens_per_unit=1``. For sigmoid DPO at the reference (policy = reference), the empirical Fisher
equals the generalised Gauss-Newton matrix with respect to the reward difference; the Hessian adds
``-beta/2 * Hess(D_w - D_l)``, which K-FAC does not see.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from weightgeom.hooks.roles import TrackedMatrix


@dataclass(frozen=True)
class Rank1Edit:
    """``dW(eps) = -eps * left right^T`` with unit ``left`` (m,) and ``right`` (n,), float64."""

    left: Tensor
    right: Tensor
    side: str  # "in": right is the chosen direction; "out": left is

    def dense(self, eps: float) -> Tensor:
        """The (m, n) float64 weight delta of Frobenius norm ``|eps|``."""
        return -float(eps) * torch.outer(self.left, self.right)


def input_side_edit(G: Tensor, v: Tensor) -> Rank1Edit:
    """Steepest-descent rank-1 edit reading along unit ``v`` (n,): ``dW = -eps (G v/||G v||) v^T``.

    ``G`` is (m, n). ``v`` is normalised here (a non-unit ``v`` is a caller's mistake worth
    forgiving; a zero one is not). Raises when ``G v = 0``: the objective has no first-order
    preference along ``v``, so there is no steepest-descent edit to make.
    """
    G, v = _check(G, v, 1, "v", "G.shape[1] (the input dim n)")
    Gv = G @ v
    norm = torch.linalg.vector_norm(Gv)
    if norm == 0:
        raise ValueError("G v = 0: the gradient has no component reading along this input direction, so the "
                         "steepest-descent edit is undefined (is the role frozen, or its output unused?)")
    return Rank1Edit(Gv / norm, v, "in")


def output_side_edit(G: Tensor, u: Tensor) -> Rank1Edit:
    """Steepest-descent rank-1 edit writing along unit ``u`` (m,): ``dW = -eps u (u^T G)/||u^T G||``."""
    G, u = _check(G, u, 0, "u", "G.shape[0] (the output dim m)")
    uG = u @ G
    norm = torch.linalg.vector_norm(uG)
    if norm == 0:
        raise ValueError("u^T G = 0: the gradient writes nothing along this output direction, so the "
                         "steepest-descent edit is undefined (is the role frozen, or its output unused?)")
    return Rank1Edit(u, uG / norm, "out")


def first_order(G: Tensor, dW: Tensor) -> float:
    """``<G, dW>`` (Frobenius inner product), in float64."""
    if G.shape != dW.shape:
        raise ValueError(f"G {tuple(G.shape)} and dW {tuple(dW.shape)} must have the same (out, in) shape")
    return float((G.double() * dW.double()).sum())


def kfac_second_order(dW: Tensor, C_a: Tensor, C_delta: Tensor, tokens_per_unit: float) -> float:
    """``1/2 t vec(dW)^T (C_a kron C_delta) vec(dW) = 1/2 t tr(dW^T C_delta dW C_a)``, ``t = tokens_per_unit``.

    ``dW`` (m, n), ``C_a`` (n, n), ``C_delta`` (m, m); see the module docstring for
    ``tokens_per_unit`` (N/P for per-pair-scaled ``C_delta``). Computed without the (mn x mn)
    Kronecker product, in float64.
    """
    m, n = dW.shape
    if tuple(C_a.shape) != (n, n) or tuple(C_delta.shape) != (m, m):
        raise ValueError(f"for dW {tuple(dW.shape)} need C_a ({n}, {n}) and C_delta ({m}, {m}), got "
                         f"{tuple(C_a.shape)} and {tuple(C_delta.shape)}")
    if not tokens_per_unit > 0:
        raise ValueError(f"tokens_per_unit must be > 0 (counted tokens per loss unit), got {tokens_per_unit}")
    dW = dW.double()
    quad = ((C_delta.double() @ dW) * (dW @ C_a.double())).sum()
    return 0.5 * float(tokens_per_unit) * float(quad)


# ----- editing a model in place ----------------------------------------------------------------------

def stored_weight(tm: TrackedMatrix) -> torch.nn.Parameter:
    """The parameter that holds ``tm``'s rows. PEFT-wrapped modules are refused: their effective
    weight is ``W + scale B A`` and an edit of the base alone is not what a reader expects."""
    if hasattr(tm.module, "base_layer"):
        raise ValueError(f"{tm.key} is wrapped by a LoRA adapter; merge it first (model.merge_and_unload()) "
                         "so that the edit applies to the weight the model uses")
    weight = getattr(tm.module, "weight", None)
    if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 2:
        raise ValueError(f"{tm.key}: module {type(tm.module).__name__} has no 2-D weight parameter to edit")
    return weight


def role_shape(tm: TrackedMatrix) -> tuple[int, int]:
    """``(out, in)`` of the role's matrix (its rows only, for a fused module)."""
    w = stored_weight(tm)
    out_dim, in_dim = (w.shape[1], w.shape[0]) if tm.transposed else (w.shape[0], w.shape[1])
    return (out_dim if tm.rows is None else len(tm.rows), in_dim)


@contextlib.contextmanager
def edited_weight(tm: TrackedMatrix, dW: Tensor) -> Iterator[None]:
    """Add ``dW`` (out, in) to the role's rows of the stored weight, in place, for the ``with`` body.

    Fused modules: only the role's rows move (GPT-2's ``Conv1D`` stores ``(in, out)``: its columns;
    GPT-NeoX: the head-interleaved rows). On exit the whole parameter is copied back from a clone
    taken before the edit, so it is restored bit for bit, also when the body raises.
    """
    param = stored_weight(tm)
    if tuple(dW.shape) != role_shape(tm):
        raise ValueError(f"{tm.key}: dW has shape {tuple(dW.shape)}, the role's (out, in) matrix is {role_shape(tm)}")
    saved = param.detach().clone()
    try:
        with torch.no_grad():
            view = param.t() if tm.transposed else param  # (out, in) view of the same storage
            delta = dW.to(device=param.device, dtype=param.dtype)
            if tm.rows is None:
                view.add_(delta)
            else:
                view.index_add_(0, tm.rows.to(param.device), delta)
        yield
    finally:
        with torch.no_grad():
            param.copy_(saved)


def _check(G: Tensor, x: Tensor, dim: int, name: str, what: str) -> tuple[Tensor, Tensor]:
    if G.dim() != 2:
        raise ValueError(f"G must be an (out, in) matrix, got shape {tuple(G.shape)}")
    if x.dim() != 1 or x.shape[0] != G.shape[dim]:
        raise ValueError(f"{name} must be a vector whose length matches {what} = {G.shape[dim]}, got {tuple(x.shape)}")
    x = x.to(device=G.device, dtype=torch.float64)
    norm = torch.linalg.vector_norm(x)
    if norm == 0:
        raise ValueError(f"{name} is the zero vector; a direction must be non-zero")
    return G.double(), x / norm
