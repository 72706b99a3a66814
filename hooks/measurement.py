"""What the metric quantities read at one scheduled computation, computed once and shared.

A :class:`Measurement` is built by the suite when its schedule fires. It holds

* each covariance's leading eigenpairs (:class:`Spectrum`), from its sums summed over processes (one
  collective per covariance, one covariance at a time): a full ``eigh`` for matrices at most
  ``dense_max_dim`` wide (batched per width), the warm-started top-k solver of
  :mod:`weightgeom.hooks.eigensolver` above that (and ``eigvalsh`` for every eigenvalue at full-spectrum
  computations), with the trace and Frobenius norm (for the spikiness shares) and a bound on the
  subspace error;
* the prediction subspace of the unembedding (the same two paths; above ``dense_max_dim`` through the
  Gram or matrix-free, ``X -> M^T (M X)``, never copying ``W_U``);
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
from weightgeom.hooks.geometry import covariance_from_sums
from weightgeom.hooks.gram import symmetric
from weightgeom.hooks.roles import TrackedMatrix, arch_spec_for, has_unembedding, local, unembedding, unwrap_model
from weightgeom.hooks.updates import UpdateInstrument
from weightgeom.hooks.views import hutchpp_finish, hutchpp_probes, is_exact

VIEW_NAMES = {"": "delta", "_update": "update", "_grad": "grad"}  # metric suffix -> UpdateInstrument view
DENSE_BATCH_BYTES = 1 << 28  # narrow covariances decomposed together up to 256 MB per batch
GRAM_MAX_DIM = 2048  # a wider unembedding's top-k is solved matrix-free, without forming M^T M


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
    wider ones the top-k solver and Hutch++. ``full_spectrum``: wide covariances get every eigenvalue
    too this time (their effective rank). ``curve_k``: the input-side requests reach the top-``curve_k``
    ``C_a`` eigenvectors (the suite keeps those energies for the reports' k-curves).
    ``live_grads``: the gradient view reads ``.grad`` (inside the optimizer's post-step hook).
    ``warm``: the suite's warm starts for the top-k solver (updated here). ``release_views``: drop each
    matrix's update copy as soon as its reductions are taken (the updates are read first), so the peak
    of a due step holds one weight-sized copy besides ``W0`` for the shortest time.
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
    release_views: bool = False

    def __post_init__(self) -> None:
        self._prediction: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self.reduced: dict[tuple[str, str, str], Reduced] = {}  # (matrix key, gain id, view) -> reductions
        self.tr_a2: dict[tuple[str, str], Tensor] = {}  # (matrix key, gain id) -> tr(A²) of the cumulative view
        self.solves: list[str] = []  # the spectra this process computed (the work split's record)
        self.written: set[str] = set()  # matrices with a nonzero cumulative delta (set by reduce)

    # ----- covariance spectra -----------------------------------------------------------------------
    @cached_property
    def eig_in(self) -> dict[str, Spectrum]:
        """``{group key "L{i}/{g}": Spectrum}`` of every measured ``C_a``."""
        return self._spectra("in", {key: s[0].shape[0] for key, s in self.cov.sums_in.items()})

    @cached_property
    def eig_out(self) -> dict[str, Spectrum]:
        """``{role key "L{i}/{r}": Spectrum}`` of every measured ``C_delta``."""
        return self._spectra("out", {key: s[0].shape[0] for key, s in self.cov.sums_out.items()})

    def spectra(self) -> None:
        """Compute every covariance's spectrum now (they are cached): before an optimizer step, whose
        update does not change them."""
        _ = self.eig_in, self.eig_out

    def need(self, n: int) -> int:
        """Eigenvectors kept per covariance of width n: k + 1 (the gap), or the curve's."""
        return min(n, max(self.k, self.curve_k) + 1)

    def _spectra(self, kind: str, widths: dict[str, int]) -> dict[str, Spectrum]:
        """Every covariance of ``kind``, each by one process. Narrow ones (``dense_max_dim``): a full ``eigh``,
        batched per width in chunks of about :data:`DENSE_BATCH_BYTES`. Wide ones: the top-k solver
        (:meth:`_top`: one fp32 symmetric copy of the sums, no float64 one), plus at full-spectrum
        computations every eigenvalue (``eigvalsh``, for the effective rank)."""
        owner = plan({key: _eig_cost(n, n <= self.dense_max_dim) for key, n in widths.items()})
        out: dict[str, Spectrum] = {}
        pending: dict[int, list[tuple[str, Tensor]]] = defaultdict(list)
        for key, n in widths.items():
            outer, count = self.cov.global_sums(kind, key)  # a collective: every process takes every covariance
            if owner[key] != rank():
                continue
            self.solves.append(f"{kind}:{key}")
            if n > self.dense_max_dim:
                out[key] = self._top(f"{kind}:{key}", outer, count)
                continue
            pending[n].append((key, covariance_from_sums(symmetric(outer), None, count).to(self.dtype)))
            if len(pending[n]) * n * n * 8 >= DENSE_BATCH_BYTES:
                out.update(self._full(pending.pop(n)))
        for batch in pending.values():
            out.update(self._full(batch))
        device = next((s[0].device for s in (*self.cov.sums_in.values(), *self.cov.sums_out.values())),
                      torch.device("cpu"))
        return exchange(out, {key: self._spectrum_shape(n) for key, n in widths.items()}, device, self.dtype)

    def _spectrum_shape(self, n: int) -> tuple[int, int, int]:
        """(values, vector rows, vector columns) exchanged for a covariance of width n."""
        full = n <= self.dense_max_dim or self.full_spectrum
        return (n if full else self.need(n), n, self.need(n))

    def _full(self, batch: list[tuple[str, Tensor]]) -> dict[str, Spectrum]:
        names = [name for name, _ in batch]
        C = torch.stack([M for _, M in batch])
        batch.clear()
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

    def _top(self, name: str, outer: Tensor, count: Tensor) -> Spectrum:
        """A wide covariance ``outer / count``: top eigenpairs by the solver, whose products read one fp32
        symmetric copy of the sums (``n^2`` floats, the largest thing this adds; the Lanczos bookkeeping is
        float64), and every eigenvalue too at a full-spectrum computation (``eigvalsh``: no eigenvectors)."""
        n = outer.shape[0]
        scale = 1.0 / float(count) if float(count) > 0 else 0.0
        S = symmetric(outer)

        def apply(X: Tensor) -> Tensor:
            return (S @ X.to(S.dtype)).double() * scale

        result = eig.top_eigenpairs(apply, n, max(1, min(max(self.k, self.curve_k), n - 1)), device=outer.device,
                                    warm=self.warm.get(name), seed=self.seed)
        self.warm[name] = result.vectors
        j, k = self.need(n), min(self.k, n - 1)
        Y = result.vectors[:, : k + 1]
        error = eig._ritz_error(apply(Y), Y, result.values[: k + 1], k)
        trace = torch.diagonal(S).double().sum() * scale
        fro2 = torch.linalg.vector_norm(S).double().square() * scale**2  # an fp32 pass: no float64 copy of S
        values = result.values[:j]
        if self.full_spectrum:  # every eigenvalue, without eigenvectors: the effective rank
            values = torch.linalg.eigvalsh(S.to(self.dtype)).flip(0).clamp_min(0.0) * scale
        return Spectrum(values.to(self.dtype), result.vectors[:, :j].to(self.dtype), error.to(self.dtype),
                        trace.to(self.dtype), fro2.to(self.dtype), self.full_spectrum)

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
        """:meth:`prediction` and the bound on its subspace error (computed for the suite's k; NaN for
        another k). One decomposition per measurement serves every k (the largest any quantity needs,
        ``max(k, curve_k)``); it is reused across measurements while the unembedding and the final norm
        are unchanged (their version counters: a frozen head, LoRA)."""
        if k not in self._prediction:
            values, vectors, at_k = self._prediction_solution()
            error = at_k if k == min(self.k, vectors.shape[0] - 1) else torch.full_like(at_k, float("nan"))
            self._prediction[k] = (vectors[:, :k], values.clamp_min(0.0).sqrt(), error)
        return self._prediction[k]

    def _prediction_solution(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(eigenvalues of M^T M (descending), its top eigenvectors, the bound at the suite's k)``."""
        version = _versions(self.model, self.arch)
        cached = self.warm.get("pred:solution")
        if (version is not None and cached is not None and cached[0] == version and cached[1].dtype == self.dtype
                and cached[2].shape[1] >= self.need(cached[2].shape[0])):
            return cached[1], cached[2], cached[3]
        W_U, gain, layernorm = unembedding(self.model, self.arch, copy=False)
        d = W_U.shape[1]
        k, j = min(self.k, d - 1), self.need(d)
        if d <= self.dense_max_dim:  # the (d, d) Gram, exactly as geometry.prediction_subspace
            M = _prediction_matrix(W_U, gain, layernorm, self.dtype)
            full = eig.full_eigenpairs(M.T @ M, k)
            values, vectors, error = full.values, full.vectors[:, :j], full.error
        else:
            values, vectors, error = self._top_prediction(_PredictionOperator(W_U, gain, layernorm), k, j)
        self.warm["pred:solution"] = (version, values, vectors, error)
        return values, vectors, error

    def _top_prediction(self, op: _PredictionOperator, k: int, j: int) -> tuple[Tensor, Tensor, Tensor]:
        """Top-j eigenpairs of ``M^T M``: matrix-free (``2 vocab d`` per column) above :data:`GRAM_MAX_DIM`,
        else through the Gram (``vocab d^2`` once, then ``d^2`` per column); ``M`` is never materialised.
        One process solves; the others receive it (under several processes)."""
        d = op.d
        owner = plan({"pred": float(op.W.numel())})["pred"]
        found = {}
        if owner == rank():
            self.solves.append("pred")
            apply = op.gram_apply if d > GRAM_MAX_DIM else op.gram_matrix().__matmul__
            result = eig.top_eigenpairs(apply, d, max(k, j - 1), device=op.W.device, warm=self.warm.get("pred"),
                                        seed=self.seed)
            self.warm["pred"] = result.vectors
            Y = result.vectors[:, : k + 1]
            error = eig._ritz_error(apply(Y), Y, result.values[: k + 1], k)
            found["pred"] = Spectrum(result.values[:j].to(self.dtype), result.vectors[:, :j].to(self.dtype),
                                     error.to(self.dtype), result.values.sum().to(self.dtype),
                                     result.values.square().sum().to(self.dtype), False)
        s = exchange(found, {"pred": (j, d, j)}, op.W.device, self.dtype)["pred"]
        return s.values, s.vectors, s.error

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
        for view in ("_update", "", "_grad"):  # the updates first: their copies can go before the rest is read
            for tm in order:
                reqs = [r for r in by_tm[tm.key] if view in r.views]
                if not reqs:
                    continue
                mine = owner[tm.key] == rank()
                matrix = self.upd.view(tm, VIEW_NAMES[view], self.dtype, live_grads=self.live_grads) \
                    if mine or tm.sharded else None  # a sharded view is gathered on every process
                for gid, gain in {_gain_id(r.gain): r.gain for r in reqs}.items():
                    these = [r for r in reqs if _gain_id(r.gain) == gid]
                    slot = (tm.key, gid, view)
                    zscore = view == "" and any(r.zscore for r in these)
                    layout.append((slot, [(r.name, r.basis.shape[1]) for r in these], zscore))
                    if mine and matrix is not None:
                        local[slot] = self._reduce_one(matrix if gain is None else matrix.scale_rows(gain),
                                                       these, zscore)
                del matrix
                if view == "_update" and self.release_views:
                    self.upd.drop_update(tm)
        self._collect(layout, local)

    def _reduce_one(self, view, reqs: list[Request], zscore: bool) -> Tensor:
        """``[present, ‖M‖², tr(A²), energies...]`` of one view, flat, in the metric dtype (one read of the
        view for the energies, and Hutch++'s three for a wide view's z-score)."""
        estimate = zscore and not is_exact(view, self.dense_max_dim)
        S, G = hutchpp_probes(view, seed=self.seed) if estimate else (None, None)
        sq, energies, BS = view.reductions([(r.side, r.basis) for r in reqs], probe=S)
        parts = [torch.ones((), dtype=self.dtype, device=sq.device), sq.to(self.dtype)]
        if zscore:
            g2 = hutchpp_finish(view, BS, G) if estimate else view.gram_fro2()
            parts.append(geo._safe_ratio(g2.to(self.dtype), sq.to(self.dtype).square()))
        else:
            parts.append(torch.zeros((), dtype=self.dtype, device=sq.device))
        parts += [e.to(self.dtype) for e in energies]
        return torch.cat([p.reshape(-1) for p in parts])

    def _collect(self, layout, local: dict) -> None:
        """Sum the per-process results over processes, then read which views exist and which matrices
        were written in one host read."""
        device = next(iter(local.values())).device if local else _weights_device(self.tracked)
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


def _versions(model, arch) -> tuple[int, ...] | None:
    """The version counters of the unembedding and final-norm weights (bumped by every in-place update),
    or None when they cannot be trusted (sharded weights update their local shards)."""
    spec, base = arch_spec_for(model, arch), unwrap_model(model)
    tensors = []
    for path in (spec.unembed, spec.final_norm):
        module = base.get_submodule(path) if path else None
        weight = getattr(getattr(module, "base_layer", module), "weight", None)
        if weight is not None:
            if not isinstance(weight, torch.Tensor) or type(weight) is not torch.nn.Parameter:
                return None
            tensors.append(weight)
    return tuple(t._version for t in tensors) + tuple(id(t) for t in tensors)


def _weights_device(tracked: list[TrackedMatrix]) -> torch.device:
    return local(getattr(tracked[0].module, "base_layer", tracked[0].module).weight).device


class _PredictionOperator:
    """``M = W_U diag(g) (I - 1 1^T / d)`` (the centring for LayerNorm only) applied without forming it:
    ``M^T M X = P g * (W_U^T (W_U (g * P X)))`` with ``P`` the centring, float64 in and out, fp32 products
    with the live ``W_U`` (no vocab x d copy)."""

    def __init__(self, W: Tensor, gain: Tensor | None, layernorm: bool) -> None:
        self.W, self.gain, self.layernorm, self.d = W, gain, layernorm, W.shape[1]

    def _center(self, X: Tensor) -> Tensor:
        return X - X.mean(0, keepdim=True) if self.layernorm else X

    def _scale(self, X: Tensor) -> Tensor:
        return X if self.gain is None else X * self.gain.to(X)[:, None]

    def gram_apply(self, X: Tensor) -> Tensor:
        Y = self._scale(self._center(X)).to(self.W.dtype)
        Z = self.W.T @ (self.W @ Y)
        return self._center(self._scale(Z.double()))

    def gram_matrix(self) -> Tensor:
        """``M^T M`` (d, d) float64."""
        G = (self.W.T @ self.W).double()
        G = self._scale(self._scale(G).T).T
        if self.layernorm:
            G = G - G.mean(0, keepdim=True)
            G = G - G.mean(1, keepdim=True)
        return eig.symmetrize(G)


def _prediction_matrix(W_U: Tensor, gain: Tensor | None, layernorm: bool, dtype: torch.dtype) -> Tensor:
    """``W_U diag(g)`` (vocab, d) in ``dtype``, with LayerNorm's all-ones direction projected out."""
    M = W_U.detach().to(dtype)
    if gain is not None:
        M = M * gain.detach().to(dtype)
    if layernorm:
        M = M - M.mean(dim=1, keepdim=True)
    return M
