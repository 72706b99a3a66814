"""A weight delta as the metrics read it: the few reductions an RSF and its z-score need, computed
without holding a dense copy where none is needed.

Every metric of a delta ``M`` (m x n, out x in) is built from

    ‖M‖_F²                                the energy
    ‖M u_i‖² for the columns u_i of U     input-side energies along a basis (n, k)
    ‖v_i^T M‖² for the columns v_i of V   output-side energies along a basis (m, k)
    ‖M^T M‖_F²                            for the z-score's ``tr(A²) = ‖M^T M‖_F² / ‖M‖_F⁴``

and three shapes of ``M`` provide them:

* :class:`Dense`: a tensor (a gradient, a gathered shard, anything small);
* :class:`RowBlocks`: rows produced block by block (``W - W0`` with ``W0`` on another device or on
  disk): every reduction above is a sum over row blocks (the output side sums ``V_b^T M_b`` into a
  (k, n) matrix), so only one block of at most :data:`BLOCK_ELEMENTS` entries exists at a time;
* :class:`LowRank`: ``M = L R`` (a LoRA delta ``s (B A - B0 A0)`` has rank at most 2r): every
  reduction is a product of thin factors, ``O((m + n) r k)``, and no m x n matrix is ever formed.

``tr(A²)`` is exact (:meth:`gram_fro2`) when the smaller side is at most ``exact_max_dim``, else
estimated by Hutch++ (:func:`hutchpp_gram_fro2`): cost ``O(m n s)`` for ``s`` matrix products instead
of ``O(m n min(m, n))``, relative error stated there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

BLOCK_ELEMENTS = 1 << 24  # 16M entries (64 MB in fp32) per row block
HUTCHPP_PROBES = 48  # matrix products of Hutch++ (a third find the top subspace, a third estimate the rest)


class MatrixView:
    """The reductions of one (m, n) matrix in ``dtype`` on ``device`` (see the module docstring)."""

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def sq_norm(self) -> Tensor: ...
    def in_energies(self, U: Tensor) -> Tensor: ...
    def out_energies(self, V: Tensor) -> Tensor: ...
    def matmul(self, X: Tensor) -> Tensor: ...  # M X, X (n, s)
    def rmatmul(self, Y: Tensor) -> Tensor: ...  # M^T Y, Y (m, s)
    def gram_fro2(self) -> Tensor: ...  # ‖M^T M‖_F², exact
    def scale_rows(self, g: Tensor) -> MatrixView: ...  # diag(g) M

    def gram_apply(self, X: Tensor) -> Tensor:
        """``M^T M X`` for X (n, s)."""
        return self.rmatmul(self.matmul(X))

    def reductions(self, bases: list[tuple[str, Tensor]], probe: Tensor | None = None
                   ) -> tuple[Tensor, list[Tensor], Tensor | None]:
        """``(‖M‖², [energies along each basis], M^T M probe)`` with each basis ``(side, (dim, j))`` and an
        optional (n, s) ``probe`` (Hutch++'s first product rides along)."""
        ins, outs = _sides(bases)
        e_in = self.in_energies(torch.cat(ins, 1)) if ins else None
        e_out = self.out_energies(torch.cat(outs, 1)) if outs else None
        return self.sq_norm(), _per_basis(bases, e_in, e_out), None if probe is None else self.gram_apply(probe)


@dataclass
class Dense(MatrixView):
    """A whole matrix ``M`` (m, n), used in ``dtype``."""

    M: Tensor
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        self.M = self.M.to(self.dtype)
        self.shape, self.device = tuple(self.M.shape), self.M.device

    def sq_norm(self) -> Tensor:
        return torch.linalg.vector_norm(self.M).square()  # no temporary of M's size

    def in_energies(self, U: Tensor) -> Tensor:
        return (self.M @ U.to(self.M)).square().sum(0)

    def out_energies(self, V: Tensor) -> Tensor:
        return (V.to(self.M).T @ self.M).square().sum(1)

    def matmul(self, X: Tensor) -> Tensor:
        return self.M @ X.to(self.M)

    def rmatmul(self, Y: Tensor) -> Tensor:
        return self.M.T @ Y.to(self.M)

    def gram_fro2(self) -> Tensor:
        m, n = self.shape
        G = self.M @ self.M.T if m <= n else self.M.T @ self.M
        return G.square().sum()

    def scale_rows(self, g: Tensor) -> Dense:
        return Dense(self.M * g.to(self.M)[:, None], self.dtype)


@dataclass
class RowBlocks(MatrixView):
    """``M`` (m, n) whose rows ``[r0, r1)`` come from ``rows(r0, r1)`` (in ``dtype`` on ``device``); each
    reduction reads every block once and keeps none. ``gain``: a row scaling applied to each block."""

    rows: Callable[[int, int], Tensor]
    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    gain: Tensor | None = None

    def blocks(self) -> Iterator[tuple[int, int, Tensor]]:
        m, n = self.shape
        step = max(1, BLOCK_ELEMENTS // max(1, n))
        for r0 in range(0, m, step):
            r1 = min(m, r0 + step)
            block = self.rows(r0, r1).to(device=self.device, dtype=self.dtype)
            if self.gain is not None:
                block = block * self.gain[r0:r1, None].to(block)
            yield r0, r1, block

    def sq_norm(self) -> Tensor:
        return sum(torch.linalg.vector_norm(b).square() for _, _, b in self.blocks())

    def in_energies(self, U: Tensor) -> Tensor:
        U = U.to(device=self.device, dtype=self.dtype)
        return sum((b @ U).square().sum(0) for _, _, b in self.blocks())

    def out_energies(self, V: Tensor) -> Tensor:
        V = V.to(device=self.device, dtype=self.dtype)
        return sum(V[r0:r1].T @ b for r0, r1, b in self.blocks()).square().sum(1)

    def matmul(self, X: Tensor) -> Tensor:
        X = X.to(device=self.device, dtype=self.dtype)
        return torch.cat([b @ X for _, _, b in self.blocks()])

    def rmatmul(self, Y: Tensor) -> Tensor:
        Y = Y.to(device=self.device, dtype=self.dtype)
        return sum(b.T @ Y[r0:r1] for r0, r1, b in self.blocks())

    def reductions(self, bases: list[tuple[str, Tensor]], probe: Tensor | None = None
                   ) -> tuple[Tensor, list[Tensor], Tensor | None]:
        """Every reduction in one pass over the row blocks (each block is formed once): the input-side
        bases in one product per block, the output-side ones in another, the probe's ``M_b^T (M_b P)``."""
        in_bases, out_bases = _sides(bases)
        ins = torch.cat(in_bases or [torch.zeros(self.shape[1], 0)], 1)
        outs = torch.cat(out_bases or [torch.zeros(self.shape[0], 0)], 1)
        ins, outs = (t.to(device=self.device, dtype=self.dtype) for t in (ins, outs))
        P = None if probe is None else probe.to(device=self.device, dtype=self.dtype)
        sq = torch.zeros((), dtype=self.dtype, device=self.device)
        e_in = torch.zeros(ins.shape[1], dtype=self.dtype, device=self.device)
        proj_out = torch.zeros(outs.shape[1], self.shape[1], dtype=self.dtype, device=self.device)
        gram_probe = None if P is None else torch.zeros_like(P)
        for r0, r1, b in self.blocks():
            sq += torch.linalg.vector_norm(b).square()
            if ins.shape[1]:
                e_in += (b @ ins).square().sum(0)
            if outs.shape[1]:
                proj_out += outs[r0:r1].T @ b
            if P is not None:
                gram_probe += b.T @ (b @ P)
        return sq, _per_basis(bases, e_in, proj_out.square().sum(1)), gram_probe

    def gram_apply(self, X: Tensor) -> Tensor:
        """``M^T M X = sum_b M_b^T (M_b X)``: one pass."""
        X = X.to(device=self.device, dtype=self.dtype)
        return sum(b.T @ (b @ X) for _, _, b in self.blocks())

    def gram_fro2(self) -> Tensor:
        # sum_b M_b^T M_b is (n, n): fine where the exact path is used (the smaller side <= exact_max_dim
        # is then n, or m small enough to stack the rows); otherwise Hutch++ is used instead.
        m, n = self.shape
        if m <= n:
            M = torch.cat([b for _, _, b in self.blocks()])
            return (M @ M.T).square().sum()
        return sum(b.T @ b for _, _, b in self.blocks()).square().sum()

    def scale_rows(self, g: Tensor) -> RowBlocks:
        gain = g if self.gain is None else self.gain * g
        return RowBlocks(self.rows, self.shape, self.dtype, self.device, gain)


@dataclass
class LowRank(MatrixView):
    """``M = L R`` with ``L`` (m, r) and ``R`` (r, n): every reduction through r x r and thin products."""

    L: Tensor
    R: Tensor
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        self.L, self.R = self.L.to(self.dtype), self.R.to(device=self.L.device, dtype=self.dtype)
        self.shape, self.device = (self.L.shape[0], self.R.shape[1]), self.L.device

    def sq_norm(self) -> Tensor:
        return ((self.L.T @ self.L) * (self.R @ self.R.T)).sum()  # tr(L^T L R R^T)

    def in_energies(self, U: Tensor) -> Tensor:
        return (self.L @ (self.R @ U.to(self.R))).square().sum(0)

    def out_energies(self, V: Tensor) -> Tensor:
        return ((V.to(self.L).T @ self.L) @ self.R).square().sum(1)

    def matmul(self, X: Tensor) -> Tensor:
        return self.L @ (self.R @ X.to(self.R))

    def rmatmul(self, Y: Tensor) -> Tensor:
        return self.R.T @ (self.L.T @ Y.to(self.L))

    def gram_fro2(self) -> Tensor:
        P = (self.L.T @ self.L) @ (self.R @ self.R.T)  # ‖R^T L^T L R‖_F² = tr((L^T L R R^T)²)
        return (P * P.T).sum()

    def scale_rows(self, g: Tensor) -> LowRank:
        return LowRank(self.L * g.to(self.L)[:, None], self.R, self.dtype)


@dataclass
class Zero(MatrixView):
    """A matrix known to be zero (a weight frozen for the phase): every reduction is 0, nothing is read."""

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def _zeros(self, *size: int) -> Tensor:
        return torch.zeros(size, dtype=self.dtype, device=self.device)

    def sq_norm(self) -> Tensor:
        return self._zeros()

    def in_energies(self, U: Tensor) -> Tensor:
        return self._zeros(U.shape[1])

    def out_energies(self, V: Tensor) -> Tensor:
        return self._zeros(V.shape[1])

    def matmul(self, X: Tensor) -> Tensor:
        return self._zeros(self.shape[0], X.shape[1])

    def rmatmul(self, Y: Tensor) -> Tensor:
        return self._zeros(self.shape[1], Y.shape[1])

    def gram_fro2(self) -> Tensor:
        return self._zeros()

    def scale_rows(self, g: Tensor) -> Zero:
        return self


def gram_fro2(view: MatrixView, exact_max_dim: int, seed: int = 0) -> Tensor:
    """``‖M^T M‖_F²``: exact when ``min(m, n) <= exact_max_dim`` or the view is low-rank, else Hutch++."""
    if is_exact(view, exact_max_dim):
        return view.gram_fro2()
    return hutchpp_gram_fro2(view, seed=seed)


def is_exact(view: MatrixView, exact_max_dim: int) -> bool:
    """Whether :func:`gram_fro2` takes the exact path for ``view``."""
    return isinstance(view, (LowRank, Zero)) or min(view.shape) <= exact_max_dim


def hutchpp_probes(view: MatrixView, probes: int = HUTCHPP_PROBES, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Hutch++'s two seeded Gaussian blocks ``(S, G)``, each (n, probes / 3), for :func:`hutchpp_finish`."""
    s = max(1, probes // 3)
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(view.shape[1], s, generator=g, dtype=torch.float64)
    G = torch.randn(view.shape[1], s, generator=g, dtype=torch.float64)
    return S.to(device=view.device, dtype=view.dtype), G.to(device=view.device, dtype=view.dtype)


def hutchpp_finish(view: MatrixView, BS: Tensor, G: Tensor) -> Tensor:
    """Hutch++ from ``BS = M^T M S`` (the first product, which may ride along another read of M): one more
    read of M applies ``B`` to ``[Q, Z]`` at once."""
    Q = torch.linalg.qr(BS).Q
    Z = G - Q @ (Q.T @ G)
    out = view.gram_apply(torch.cat([Q, Z], 1))
    return out[:, : Q.shape[1]].square().sum() + out[:, Q.shape[1]:].square().sum() / G.shape[1]


def hutchpp_gram_fro2(view: MatrixView, probes: int = HUTCHPP_PROBES, seed: int = 0) -> Tensor:
    """Hutch++ (Meyer, Musco, Musco and Woodruff, 2021) estimate of ``‖B‖_F² = tr(B²)`` for the Gram
    ``B = M^T M``, from ``probes`` products ``M^T (M x)`` in two reads of ``M``.

    ``B²`` is PSD; with ``Q`` an orthonormal basis of ``B S`` (``probes / 3`` Gaussian columns ``S``):
    ``tr(B²) = ‖B Q‖_F² + tr((I - QQ^T) B² (I - QQ^T))``; the first term is exact, the second is
    estimated by Hutchinson with ``probes / 3`` Gaussian vectors projected off ``Q``. The top of the
    spectrum (where a delta's ``tr(B²)`` mostly lives) is captured exactly; the relative error then
    falls like ``1 / probes`` (not ``1 / sqrt(probes)``): tests/hooks/test_views.py measures it on
    synthetic deltas, tests/e2e/test_real_model.py on real ones. Seeded: the same matrix gives the same
    estimate on every rank and resume.
    """
    S, G = hutchpp_probes(view, probes, seed)
    return hutchpp_finish(view, view.gram_apply(S), G)


def _sides(bases: list[tuple[str, Tensor]]) -> tuple[list[Tensor], list[Tensor]]:
    """The input-side and the output-side bases, each in order."""
    return [B for side, B in bases if side == "in"], [B for side, B in bases if side == "out"]


def _per_basis(bases: list[tuple[str, Tensor]], e_in: Tensor | None, e_out: Tensor | None) -> list[Tensor]:
    """The energies along each side's concatenated bases, cut back into one vector per basis in the
    order of ``bases``."""
    ins, outs = _sides(bases)
    split_in, split_out = _split(e_in, ins), _split(e_out, outs)
    return [split_in.pop(0) if side == "in" else split_out.pop(0) for side, _ in bases]


def _split(energies: Tensor | None, bases: list[Tensor]) -> list[Tensor]:
    """``energies`` of concatenated bases back into one vector per basis."""
    out, at = [], 0
    for B in bases:
        out.append(energies[at:at + B.shape[1]])
        at += B.shape[1]
    return out
