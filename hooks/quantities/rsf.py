"""Relative RSF of each written matrix's views against a subspace, with z-scores and eigengaps.

Three quantities, one per subspace (docs/metrics.md):

- :class:`InputRSF`: input side against the top-k eigenvectors of the live ``C_a`` of the matrix's
  input group (``rsf_in``), and against the top-k frozen after the phase's first step (``rsf_in_frozen``);
- :class:`PredictionRSF`: output side against the prediction subspace of the unembedding
  (``rsf_out_pred``; write roles only; behind a post-norm, of ``diag(g_post) dW``);
- :class:`DeltaRSF`: output side against the top-k eigenvectors of the live ``C_delta`` (``rsf_out_delta``).

Each reports the cumulative delta, the last update and the last gradient (``keys.VIEWS``), the exact
z-score of the cumulative delta against random k-subspaces, and the eigengap of the subspace used.
Matrices of the same shape are measured together (one batched product per view).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from weightgeom.hooks import geometry as geo
from weightgeom.hooks import keys
from weightgeom.hooks.measurement import Measurement, Values, Written
from weightgeom.hooks.roles import WRITE_ROLES


def relative_rsf_family(m: Measurement, family: str, items: list[tuple[Written, Tensor, int]],
                        views: tuple[str, ...] = keys.VIEWS) -> Values:
    """``{family}{view}/L{i}/{r}`` (relative RSF) for each ``(written, basis, k)`` and view, and the
    cumulative view's z-score. ``basis`` is (n, k) for the input side (family ``rsf_in*``), (m, k) for
    the output side."""
    side = "in" if family.startswith("rsf_in") else "out"
    groups: dict[tuple, list[tuple[Written, Tensor]]] = defaultdict(list)
    for w, basis, k in items:
        groups[(w.shape, k)].append((w, basis))
    out = Values()
    for (shape, k), group in groups.items():
        dim = shape[1] if side == "in" else shape[0]
        bases = torch.stack([b.to(m.dtype) for _, b in group])
        for view in views:
            present = [i for i, (w, _) in enumerate(group) if w.views[view] is not None]
            if not present:
                continue
            M = torch.stack([group[i][0].views[view].to(m.dtype) for i in present])
            rsf = geo.rsf_batched(M, bases[present], side)
            names = [group[i][0].tm.key for i in present]
            out.add([keys.at(family + view, key) for key in names], rsf * (dim / k))
            if view == "" and m.zscores and family in keys.RSF_FAMILIES:
                z = geo.rsf_zscore_batched(rsf, M, k, side)
                out.add([keys.at(keys.RSF_FAMILIES[family], key) for key in names], z)
    return out


def gaps(family: str, items: list[tuple[Written, Tensor, int]]) -> Values:
    """``{family}/L{i}/{r}``: eigengap at k of each matrix's spectrum (``items``: written, evals, k)."""
    out = Values()
    by_k: dict[tuple, list] = defaultdict(list)
    for w, evals, k in items:
        by_k[(k, evals.shape[0])].append((w, evals))
    for (k, _), group in by_k.items():
        spectra = torch.stack([e for _, e in group])
        out.add([keys.at(family, w.tm.key) for w, _ in group], geo.eigengap_batched(spectra, k))
    return out


class InputRSF:
    """``rsf_in{,_update,_grad}``, ``z_in``, ``gap_in``, ``rsf_in_frozen`` for roles in ``input_roles``."""

    def compute(self, m: Measurement) -> Values:
        measured = [w for w in m.written if w.tm.role in m.input_roles and w.tm.group_key in m.eig_in]
        live, spectra, frozen = [], [], []
        for w in measured:
            evals, evecs = m.eig_in[w.tm.group_key]
            k = min(m.k, w.shape[1] - 1)
            live.append((w, evecs[:, :k], k))
            spectra.append((w, evals, k))
            basis = m.frozen.get(keys.at(keys.FROZEN_IN, w.tm.group_key))
            if basis is not None:
                frozen.append((w, basis, basis.shape[1]))
        out = relative_rsf_family(m, "rsf_in", live)
        out.extend(gaps("gap_in", spectra))
        out.extend(relative_rsf_family(m, "rsf_in_frozen", frozen, views=("",)))
        return out


class PredictionRSF:
    """``rsf_out_pred{,_update,_grad}``, ``z_out_pred`` for the write roles, and ``gap_pred``; nothing
    for a model without an unembedding (a reward model: the suite's ``skipped`` says so)."""

    def compute(self, m: Measurement) -> Values:
        if not m.has_prediction:
            return Values()
        items = []
        for w in m.written:
            if w.tm.role in WRITE_ROLES:
                k = min(m.k, w.shape[0] - 1)
                items.append((m.residual_write(w), m.prediction(k)[0], k))  # post-norm: diag(g_post) dW
        out = relative_rsf_family(m, "rsf_out_pred", items)
        if items:
            k = items[0][2]
            out.add(["gap_pred"], geo.eigengap_batched(m.prediction(k)[1].pow(2)[None], k))
        return out


class DeltaRSF:
    """``rsf_out_delta{,_update,_grad}``, ``z_out_delta``, ``gap_out_delta`` for roles with ``C_delta``."""

    def compute(self, m: Measurement) -> Values:
        live, spectra = [], []
        for w in m.written:
            if w.tm.key in m.eig_out:
                evals, evecs = m.eig_out[w.tm.key]
                k = min(m.k, w.shape[0] - 1)
                live.append((w, evecs[:, :k], k))
                spectra.append((w, evals, k))
        out = relative_rsf_family(m, "rsf_out_delta", live)
        out.extend(gaps("gap_out_delta", spectra))
        return out
