"""Relative RSF of each written matrix's views against a subspace, with z-scores and eigengaps.

Three quantities, one per subspace (docs/metrics.md):

- :class:`InputRSF`: input side against the top-k eigenvectors of the live ``C_a`` of the matrix's
  input group (``rsf_in``), and against the top-k frozen after the phase's first step (``rsf_in_frozen``);
- :class:`PredictionRSF`: output side against the prediction subspace of the unembedding
  (``rsf_out_pred``; write roles only; behind a post-norm, of ``diag(g_post) dW``);
- :class:`DeltaRSF`: output side against the top-k eigenvectors of the live ``C_delta`` (``rsf_out_delta``).

Each reports the cumulative delta, the last update and the last gradient (``keys.VIEWS``), the exact
z-score of the cumulative delta against random k-subspaces, and the eigengap of the subspace used.
A quantity first declares what it needs of each matrix (:meth:`requests`: a basis and the views), the
measurement reads every matrix once for all quantities, then :meth:`compute` turns the energies into
metrics: ``RSF = sum of the first k energies / ‖M‖²``.
"""

from __future__ import annotations

from torch import Tensor

from weightgeom.hooks import geometry as geo
from weightgeom.hooks import keys
from weightgeom.hooks.measurement import Measurement, Reduced, Request, Values
from weightgeom.hooks.roles import WRITE_ROLES, TrackedMatrix


def rsf_metrics(m: Measurement, family: str, tm: TrackedMatrix, name: str, k: int, dim: int,
                views: tuple[str, ...] = keys.VIEWS, gain: Tensor | None = None) -> Values:
    """``{family}{view}/L{i}/{r}`` (relative RSF) of ``tm``'s views against the basis requested under
    ``name`` (its first ``k`` directions), and the cumulative view's z-score when the family has one."""
    out = Values()
    for view in views:
        r = m.result(tm, view, gain)
        if r is None:
            continue
        rsf = _rsf(r, name, k)
        out.add([keys.at(family + view, tm.key)], rsf * (dim / k))
        if view == "" and m.zscores and family in keys.RSF_FAMILIES:
            tr_a2 = m.tr_a2[(tm.key, "" if gain is None else "post")]
            out.add([keys.at(keys.RSF_FAMILIES[family], tm.key)], geo.rsf_zscore_from_trace(rsf, tr_a2, k, dim))
    return out


def _rsf(r: Reduced, name: str, k: int) -> Tensor:
    return geo._safe_ratio(r.energies[name][:k].sum(), r.sq_norm)


class InputRSF:
    """``rsf_in{,_update,_grad}``, ``z_in``, ``gap_in``, ``rsf_in_frozen`` for roles in ``input_roles``."""

    def _measured(self, m: Measurement) -> list[TrackedMatrix]:
        return [tm for tm in m.tracked if tm.role in m.input_roles and tm.group_key in m.eig_in]

    def requests(self, m: Measurement) -> list[Request]:
        out = []
        for tm in self._measured(m):
            vectors = m.eig_in[tm.group_key].vectors
            j = min(max(m.k, m.curve_k), vectors.shape[0] - 1)  # the curve's energies come along
            out.append(Request(tm, "in", "in", vectors[:, :j], zscore=m.zscores))
            frozen = m.frozen.get(keys.at(keys.FROZEN_IN, tm.group_key))
            if frozen is not None:
                out.append(Request(tm, "in_frozen", "in", frozen, views=("",)))
        return out

    def compute(self, m: Measurement) -> Values:
        out = Values()
        for tm in self._measured(m):
            if tm.key not in m.written:
                continue
            spectrum = m.eig_in[tm.group_key]
            n = spectrum.vectors.shape[0]
            k = min(m.k, n - 1)
            out.extend(rsf_metrics(m, "rsf_in", tm, "in", k, n))
            out.add([keys.at("gap_in", tm.key)], geo.eigengap_batched(spectrum.values[None], k))
            frozen = m.frozen.get(keys.at(keys.FROZEN_IN, tm.group_key))
            if frozen is not None:
                out.extend(rsf_metrics(m, "rsf_in_frozen", tm, "in_frozen", frozen.shape[1], n, views=("",)))
        return out


class PredictionRSF:
    """``rsf_out_pred{,_update,_grad}``, ``z_out_pred`` for the write roles, and ``gap_pred``; nothing
    for a model without an unembedding (a reward model: the suite's ``skipped`` says so)."""

    def _items(self, m: Measurement) -> list[tuple[TrackedMatrix, int, Tensor | None]]:
        if not m.has_prediction:
            return []
        out = []
        for tm in m.tracked:
            if tm.role in WRITE_ROLES:
                dim = out_dim(tm)
                out.append((tm, min(m.k, dim - 1), tm.post_norm_gain()))  # post-norm: diag(g_post) dW
        return out

    def requests(self, m: Measurement) -> list[Request]:
        return [Request(tm, "pred", "out", m.prediction(k)[0], zscore=m.zscores, gain=gain)
                for tm, k, gain in self._items(m)]

    def compute(self, m: Measurement) -> Values:
        out = Values()
        items = [item for item in self._items(m) if item[0].key in m.written]
        for tm, k, gain in items:
            out.extend(rsf_metrics(m, "rsf_out_pred", tm, "pred", k, out_dim(tm), gain=gain))
        if items:
            k = items[0][1]
            out.add(["gap_pred"], geo.eigengap_batched(m.prediction(k)[1].pow(2)[None], k))
        return out


class DeltaRSF:
    """``rsf_out_delta{,_update,_grad}``, ``z_out_delta``, ``gap_out_delta`` for roles with ``C_delta``."""

    def requests(self, m: Measurement) -> list[Request]:
        out = []
        for tm in m.tracked:
            if tm.key in m.eig_out:
                vectors = m.eig_out[tm.key].vectors
                out.append(Request(tm, "delta", "out", vectors[:, :min(m.k, vectors.shape[0] - 1)], zscore=m.zscores))
        return out

    def compute(self, m: Measurement) -> Values:
        out = Values()
        for tm in m.tracked:
            if tm.key in m.eig_out and tm.key in m.written:
                spectrum = m.eig_out[tm.key]
                dim = spectrum.vectors.shape[0]
                k = min(m.k, dim - 1)
                out.extend(rsf_metrics(m, "rsf_out_delta", tm, "delta", k, dim))
                out.add([keys.at("gap_out_delta", tm.key)], geo.eigengap_batched(spectrum.values[None], k))
        return out


def out_dim(tm: TrackedMatrix) -> int:
    """The output dimension m of ``tm``'s (out, in) matrix."""
    if tm.rows is not None:
        return len(tm.rows)
    w = getattr(tm.module, "base_layer", tm.module).weight
    return w.shape[1] if tm.transposed else w.shape[0]
