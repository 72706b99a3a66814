"""What the metric quantities read at one scheduled computation, computed once and shared.

A :class:`Measurement` is built by the suite when its schedule fires. It holds

* the covariances summed over processes (one collective) and their leading eigenpairs
  (:class:`Spectrum`): a full ``eigh`` for matrices at most ``dense_max_dim`` wide (batched per width),
  the warm-started top-k solver of :mod:`weightgeom.hooks.eigensolver` above that, with the trace and
  Frobenius norm (for the spikiness shares) and a bound on the subspace error;
* the prediction subspace of the unembedding (the same two paths, matrix-free when the vocabulary is
  large: ``X -> M^T (M X)``);
* the per-matrix reductions the quantities ask for (:class:`Request`): for each tracked matrix, each
  view (cumulative delta, last update, last gradient) is read once (:mod:`weightgeom.hooks.views`),
  giving its energy, its energies along every requested basis, and ``tr(A²)`` for the z-scores.

Under several processes the work is split by cost (longest job first onto the least loaded process,
as kfac-pytorch and bergson assign eigendecompositions) and the results are summed over processes in
one collective per kind; every process then holds every number.

Quantities (``hooks/quantities``) declare their requests, then read the results and return
:class:`Values`: tensors on the instruments' device, brought to the host once per computation.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from weightgeom.hooks import eigensolver as eig
from weightgeom.hooks import geometry as geo
from weightgeom.hooks.covariance import CovarianceInstrument
from weightgeom.hooks.distributed import all_reduce_sums, rank, world_size
from weightgeom.hooks.roles import TrackedMatrix, has_unembedding, unembedding
from weightgeom.hooks.updates import UpdateInstrument
from weightgeom.hooks.views import gram_fro2

VIEW_NAMES = {"": "delta", "_update": "update", "_grad": "grad"}  # metric suffix -> UpdateInstrument view


class Values:
    """Metric values collected as tensors and synchronised with the host once."""

    def __init__(self) -> None:
        self._names: list[list[str]] = []
        self._blocks: list[Tensor] = []

    def add(self, names: list[str], values: Tensor) -> None:
        """``values`` (len(names),): one metric per name, on any device."""
        self._names.append(list(names))
        self._blocks.append(values.reshape(-1))

    def extend(self, other: Values) -> None:
        self._names += other._names
        self._blocks += other._blocks

    def to_dict(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self._blocks:
            device = self._blocks[0].device
            flat = torch.cat([b.to(device=device, dtype=torch.float64) for b in self._blocks]).tolist()
            out.update(zip((n for names in self._names for n in names), flat, strict=True))
        return out


@dataclass
class Spectrum:
    """Leading eigenpairs of one covariance: ``values`` (all n when ``full``, else the top ones),
    descending and clipped at 0; ``vectors`` (n, j) the top j; ``error`` the bound on sin of the largest
    angle of the top-k subspace; ``trace`` and ``fro2`` (``tr C``, ``‖C‖_F²``) of the whole matrix."""

    values: Tensor
    vectors: Tensor
    error: Tensor
    trace: Tensor
    fro2: Tensor
    full: bool


@dataclass(frozen=True)
class Request:
    """A quantity's need: the energies of ``tm``'s ``views`` along ``basis`` (``side`` "in": (n, j), "out":
    (m, j)) under the name ``name``; ``zscore``: also ``tr(A²)`` of the cumulative view; ``gain``: read
    ``diag(gain) M`` instead of ``M`` (a write matrix behind a post-norm)."""

    tm: TrackedMatrix
    name: str
    side: str
    basis: Tensor
    views: tuple[str, ...] = tuple(VIEW_NAMES)
    zscore: bool = False
    gain: Tensor | None = None


@dataclass
class Reduced:
    """One view's reductions: its energy ``‖M‖²`` and energies along each requested basis (by name)."""

    sq_norm: Tensor
    energies: dict[str, Tensor]


@dataclass
class Measurement:
    """Shared inputs of the quantities at ``step``.

    ``k``: the suite's subspace dimension (capped at a matrix's dim - 1). ``zscores``: whether the RSF
    families report z-scores. ``dtype``: the dtype of the metric math (``metric_dtype``).
    ``dense_max_dim``: widths up to this take the exact dense methods (full ``eigh``, exact ``tr(A²)``);
    wider ones the top-k solver and Hutch++. ``full_spectrum``: wide covariances get a full ``eigh``
    too this time (their effective rank). ``curve_k``: also keep each input-side matrix's energies
    along its top-``curve_k`` ``C_a`` eigenvectors (:attr:`curves`, for the reports' k-curves).
    ``live_grads``: the gradient view reads ``.grad`` (inside the optimizer's post-step hook).
    ``warm``: the suite's warm starts for the top-k solver (updated here).
    """

    step: int
    k: int
    zscores: bool
    dtype: torch.dtype
    cov: CovarianceInstrument
    upd: UpdateInstrument
    tracked: list[TrackedMatrix]
    input_roles: tuple[str, ...]
    frozen: dict[str, Tensor]
    model: torch.nn.Module
    arch: object = None
    dense_max_dim: int = 1024
    full_spectrum: bool = True
    curve_k: int = 0
    live_grads: bool = False
    warm: dict[str, Tensor] = field(default_factory=dict)
    seed: int = 0
    state: dict[str, Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.state = self.cov.global_state()  # a collective: every rank builds a Measurement
        self._prediction: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self.reduced: dict[tuple[str, str, str], Reduced] = {}  # (matrix key, gain id, view) -> reductions
        self.tr_a2: dict[tuple[str, str], Tensor] = {}  # (matrix key, gain id) -> tr(A²) of the cumulative view
        self.curves: dict[str, tuple[Tensor, Tensor]] = {}  # matrix key -> (energies (curve_k,), ‖dW‖²)
        self.solves: list[str] = []  # the spectra this process computed (the work split's record)
        self.written: set[str] = set()  # matrices with a nonzero cumulative delta (set by reduce)

    # ----- covariance spectra -----------------------------------------------------------------------
    @cached_property
    def eig_in(self) -> dict[str, Spectrum]:
        """``{group key "L{i}/{g}": Spectrum}`` of every measured ``C_a``."""
        return self._spectra("in", {key: self.cov.covariance_in(key, state=self.state) for key in self.cov.sums_in})

    @cached_property
    def eig_out(self) -> dict[str, Spectrum]:
        """``{role key "L{i}/{r}": Spectrum}`` of every measured ``C_delta``."""
        return self._spectra("out", {key: self.cov.covariance_out(key, state=self.state) for key in self.cov.sums_out})

    def need(self, n: int) -> int:
        """Eigenvectors kept per covariance of width n: k + 1 (the gap), or the curve's."""
        return min(n, max(self.k, self.curve_k) + 1)

    def _spectra(self, kind: str, matrices: dict[str, Tensor]) -> dict[str, Spectrum]:
        owner = plan({key: _eig_cost(C.shape[0], self._is_full(C.shape[0])) for key, C in matrices.items()})
        out: dict[str, Spectrum] = {}
        dense: dict[int, list[str]] = defaultdict(list)
        for key, C in matrices.items():
            if owner[key] != rank():
                continue
            self.solves.append(f"{kind}:{key}")
            if self._is_full(C.shape[0]):
                dense[C.shape[0]].append(key)
            else:
                out[key] = self._top(f"{kind}:{key}", C)
        for names in dense.values():  # one batched eigendecomposition per width
            out.update(self._full(names, [matrices[n] for n in names]))
        return exchange(out, {key: self._spectrum_shape(C.shape[0]) for key, C in matrices.items()},
                        _device(matrices), self.dtype)

    def _is_full(self, n: int) -> bool:
        return n <= self.dense_max_dim or self.full_spectrum

    def _spectrum_shape(self, n: int) -> tuple[int, int, int]:
        """(values, vector rows, vector columns) exchanged for a covariance of width n."""
        return (n if self._is_full(n) else self.need(n), n, self.need(n))

    def _full(self, names: list[str], matrices: list[Tensor]) -> dict[str, Spectrum]:
        C = torch.stack([M.to(self.dtype) for M in matrices])
        evals, evecs = torch.linalg.eigh(eig.symmetrize(C))
        evals, evecs = evals.flip(-1), evecs.flip(-1)
        out = {}
        for i, name in enumerate(names):
            n = C.shape[-1]
            k = min(self.k, n - 1)
            j = self.need(n)
            Y = evecs[i, :, : k + 1]
            error = eig._ritz_error(eig.symmetrize(C[i]) @ Y, Y, evals[i, : k + 1], k)
            values = evals[i].clamp_min(0.0)
            out[name] = Spectrum(values, evecs[i, :, :j], error, values.sum(), values.square().sum(), True)
        return out

    def _top(self, name: str, C: Tensor) -> Spectrum:
        n = C.shape[0]
        C64 = eig.symmetrize(C.double())
        result = eig.top_eigenpairs(lambda X: C64 @ X, n, max(1, min(max(self.k, self.curve_k), n - 1)),
                                    device=C.device, warm=self.warm.get(name), seed=self.seed)
        self.warm[name] = result.vectors
        j, k = self.need(n), min(self.k, n - 1)
        Y = result.vectors[:, : k + 1]
        error = eig._ritz_error(C64 @ Y, Y, result.values[: k + 1], k)
        return Spectrum(result.values[:j].to(self.dtype), result.vectors[:, :j].to(self.dtype), error.to(self.dtype),
                        torch.diagonal(C64).sum().to(self.dtype), C64.square().sum().to(self.dtype), False)

    # ----- prediction subspace -----------------------------------------------------------------------
    @cached_property
    def has_prediction(self) -> bool:
        """Whether the model has an unembedding (a reward model has none: no prediction subspace)."""
        return has_unembedding(self.model, self.arch)

    def prediction(self, k: int) -> tuple[Tensor, Tensor]:
        """Top-k prediction subspace ``V`` (d, k) of the model's unembedding at this step, and the
        leading singular values of ``W_U diag(g)`` (all d of them on the dense path, at least k + 1)."""
        V, svals, _ = self.prediction_spectrum(k)
        return V, svals

    def prediction_spectrum(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`prediction` and the bound on its subspace error."""
        if k not in self._prediction:
            W_U, gain, layernorm = unembedding(self.model, self.arch)
            d = W_U.shape[1]
            if d <= self.dense_max_dim:  # the (d, d) Gram, exactly as geometry.prediction_subspace
                M = _prediction_matrix(W_U, gain, layernorm, self.dtype)
                full = eig.full_eigenpairs(M.T @ M, min(k, d - 1))
                self._prediction[k] = (full.vectors[:, :k], full.values.sqrt(), full.error)
            else:
                self._prediction[k] = self._top_prediction(W_U, gain, layernorm, k)
        return self._prediction[k]

    def _top_prediction(self, W_U: Tensor, gain: Tensor | None, layernorm: bool, k: int) -> tuple[Tensor, ...]:
        """Matrix-free: ``X -> M^T (M X)`` costs ``2 vocab d`` per column (forming ``M^T M`` would be
        ``vocab d^2``). One process solves; the others receive (under several processes)."""
        d = W_U.shape[1]
        owner = plan({"pred": float(W_U.numel())})["pred"]
        found = {}
        if owner == rank():
            self.solves.append("pred")
            M = _prediction_matrix(W_U, gain, layernorm, torch.float32)
            result = eig.top_eigenpairs(lambda X: (M.T @ (M @ X.float())).double(), d, min(k, d - 1),
                                        device=W_U.device, warm=self.warm.get("pred"), seed=self.seed)
            self.warm["pred"] = result.vectors
            j = min(d, k + 1)
            found["pred"] = Spectrum(result.values[:j].to(self.dtype), result.vectors[:, :j].to(self.dtype),
                                     result.error.to(self.dtype), result.values.sum().to(self.dtype),
                                     result.values.square().sum().to(self.dtype), False)
        s = exchange(found, {"pred": (min(d, k + 1), d, min(d, k + 1))}, W_U.device, self.dtype)["pred"]
        return s.vectors[:, :k], s.values.clamp_min(0.0).sqrt(), s.error

    # ----- per-matrix reductions ---------------------------------------------------------------------
    def reduce(self, requests: list[Request]) -> None:
        """Compute every request: each (matrix, gain, view) is read once. Split over processes by the
        matrices' sizes; results summed over processes (one collective). Call once per measurement."""
        by_tm: dict[str, list[Request]] = defaultdict(list)
        order: list[TrackedMatrix] = []
        for r in requests:
            if r.tm.key not in by_tm:
                order.append(r.tm)
            by_tm[r.tm.key].append(r)
        owner = plan({tm.key: float(_numel(tm)) for tm in order})
        layout: list[tuple[tuple[str, str, str], list[tuple[str, int]], bool]] = []
        local: dict[tuple[str, str, str], Tensor] = {}
        for tm in order:
            reqs = by_tm[tm.key]
            mine = owner[tm.key] == rank()
            variants: dict[str, Tensor | None] = {_gain_id(r.gain): r.gain for r in reqs}
            for view in VIEW_NAMES:
                wanted = [r for r in reqs if view in r.views]
                if not wanted:
                    continue
                matrix = self.upd.view(tm, VIEW_NAMES[view], self.dtype, live_grads=self.live_grads) \
                    if mine or tm.sharded else None  # a sharded view is gathered on every process
                for gid, gain in variants.items():
                    these = [r for r in wanted if _gain_id(r.gain) == gid]
                    if not these:
                        continue
                    slot = (tm.key, gid, view)
                    zscore = view == "" and any(r.zscore for r in these)
                    layout.append((slot, [(r.name, r.basis.shape[1]) for r in these], zscore))
                    if mine and matrix is not None:
                        local[slot] = self._reduce_one(matrix if gain is None else matrix.scale_rows(gain),
                                                       these, zscore)
        self._collect(layout, local)

    def _reduce_one(self, view, reqs: list[Request], zscore: bool) -> Tensor:
        """``[present, ‖M‖², tr(A²), energies...]`` of one view, flat, in the metric dtype."""
        sq = view.sq_norm()
        parts = [torch.ones((), dtype=self.dtype, device=sq.device), sq.to(self.dtype)]
        if zscore:
            g2 = gram_fro2(view, self.dense_max_dim, seed=self.seed)
            parts.append(geo._safe_ratio(g2.to(self.dtype), sq.to(self.dtype).square()))
        else:
            parts.append(torch.zeros((), dtype=self.dtype, device=sq.device))
        for r in reqs:
            basis = r.basis.to(device=sq.device, dtype=self.dtype)
            energies = view.in_energies(basis) if r.side == "in" else view.out_energies(basis)
            parts.append(energies.to(self.dtype))
        return torch.cat([p.reshape(-1) for p in parts])

    def _collect(self, layout, local: dict) -> None:
        """Sum the per-process results over processes, then read which views exist and which matrices
        were written in one host read."""
        device = next(iter(local.values())).device if local else _device(self.state)
        flat = []
        for slot, bases, _ in layout:
            size = 3 + sum(j for _, j in bases)
            flat.append(local[slot].to(device) if slot in local else torch.zeros(size, dtype=self.dtype,
                                                                                device=device))
        if not flat:
            self.written = set()
            return
        total = torch.cat(flat)
        if world_size() > 1:
            total = all_reduce_sums({"r": total})["r"]
        at, heads = 0, []
        for (key, gid, view), bases, zscore in layout:
            present, sq, tr_a2 = total[at], total[at + 1], total[at + 2]
            heads.append(torch.stack([present, sq]))
            at += 3
            energies = {}
            for name, j in bases:
                energies[name] = total[at:at + j]
                at += j
            self.reduced[(key, gid, view)] = Reduced(sq, energies)
            if zscore:
                self.tr_a2[(key, gid)] = tr_a2
        flags = torch.stack(heads).tolist()  # the one host read before the values
        self.written = set()
        for ((key, gid, view), _, _), (present, sq) in zip(layout, flags):
            if present < 0.5:
                del self.reduced[(key, gid, view)]
            elif view == "" and sq > 0:
                self.written.add(key)

    def result(self, tm: TrackedMatrix, view: str, gain: Tensor | None = None) -> Reduced | None:
        """The reductions of ``tm``'s ``view`` (read as ``diag(gain) M`` when ``gain`` is given); None when
        that view does not exist (no gradient under LoRA, no update before a captured step)."""
        return self.reduced.get((tm.key, _gain_id(gain), view))


def plan(costs: dict[str, float]) -> dict[str, int]:
    """``{item: process}``: longest job first onto the least loaded process (deterministic: ties by
    name), so a distributed run spends about ``total / processes`` per process, none repeated."""
    world = world_size()
    if world == 1:
        return dict.fromkeys(costs, 0)
    load = [0.0] * world
    owner = {}
    for key in sorted(costs, key=lambda k: (-costs[k], k)):
        r = min(range(world), key=lambda i: (load[i], i))
        owner[key] = r
        load[r] += costs[key]
    return owner


def exchange(found: dict[str, Spectrum], shapes: dict[str, tuple[int, int, int]], device: torch.device,
             dtype: torch.dtype) -> dict[str, Spectrum]:
    """Every process's spectra on every process: one sum over processes of zero-padded tensors (each
    spectrum was computed by exactly one process). Identity under a single process."""
    if world_size() == 1:
        return found
    flat = []
    for key in sorted(shapes):
        nv, rows, cols = shapes[key]
        s = found.get(key)
        if s is None:
            flat.append(torch.zeros(nv + rows * cols + 4, dtype=dtype, device=device))
        else:
            flat.append(torch.cat([s.values[:nv].to(device, dtype), s.vectors[:, :cols].reshape(-1).to(device, dtype),
                                   torch.stack([s.error, s.trace, s.fro2, torch.tensor(float(s.full))]).to(device,
                                                                                                          dtype)]))
    total = all_reduce_sums({"spectra": torch.cat(flat)})["spectra"] if flat else torch.zeros(0)
    out, at = {}, 0
    for key in sorted(shapes):
        nv, rows, cols = shapes[key]
        values = total[at:at + nv]
        vectors = total[at + nv:at + nv + rows * cols].reshape(rows, cols)
        error, trace, fro2, full = total[at + nv + rows * cols:at + nv + rows * cols + 4]
        at += nv + rows * cols + 4
        out[key] = Spectrum(values, vectors, error, trace, fro2, bool(full > 0.5))
    return out


def _eig_cost(n: int, full: bool) -> float:
    return float(n) ** 3 if full else float(n) ** 2 * 40 * 24  # about 40 block products of width 24


def _numel(tm: TrackedMatrix) -> int:
    w = getattr(tm.module, "base_layer", tm.module).weight
    return w.numel()


def _gain_id(gain: Tensor | None) -> str:
    return "" if gain is None else "post"


def _device(tensors) -> torch.device:
    values = tensors.values() if isinstance(tensors, dict) else tensors
    return next((t.device for t in values if isinstance(t, Tensor)), torch.device("cpu"))


def _prediction_matrix(W_U: Tensor, gain: Tensor | None, layernorm: bool, dtype: torch.dtype) -> Tensor:
    """``W_U diag(g)`` (vocab, d) in ``dtype``, with LayerNorm's all-ones direction projected out."""
    M = W_U.detach().to(dtype)
    if gain is not None:
        M = M * gain.detach().to(dtype)
    if layernorm:
        M = M - M.mean(dim=1, keepdim=True)
    return M
