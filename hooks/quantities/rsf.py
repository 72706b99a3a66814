"""Relative RSF of each written matrix's views against a subspace, with z-scores and eigengaps.

Three quantities, one per subspace (DESIGN.md section 2):

- :class:`InputRSF`: input side against the top-k eigenvectors of the live ``C_a`` of the matrix's
  input group (``rsf_in``), and against the top-k frozen after the phase's first step (``rsf_in_frozen``);
- :class:`PredictionRSF`: output side against the prediction subspace of the unembedding
  (``rsf_out_pred``; write roles only);
- :class:`DeltaRSF`: output side against the top-k eigenvectors of the live ``C_delta`` (``rsf_out_delta``).

Each reports the cumulative delta, the last update and the last gradient (``VIEWS``), the z-score of
the cumulative delta against random k-subspaces, and the eigengap of the subspace used.
"""

from __future__ import annotations

from torch import Tensor

from hooks import geometry as geo
from hooks import keys
from hooks.measurement import Measurement, Written
from hooks.roles import WRITE_ROLES


def views_rsf(out: dict, family: str, w: Written, basis: Tensor, k: int, n_random: int, seed: int) -> None:
    """``{family}{view}/L{i}/{r}`` for each view, and the cumulative view's z-score; ``basis`` is
    (n, k) for the input side (family ``rsf_in``), (m, k) for the output side."""
    side = "in" if family == "rsf_in" else "out"
    fn = geo.rsf_in if side == "in" else geo.rsf_out
    dim = w.shape[1] if side == "in" else w.shape[0]
    for view, M in w.views.items():
        if M is None:
            continue
        value = fn(M, basis)
        out[f"{family}{view}/{w.tm.key}"] = geo.relative_rsf(value, k, dim)
        if view == "" and n_random:
            out[f"{keys.RSF_FAMILIES[family]}/{w.tm.key}"] = geo.zscore_vs_random(
                M, value, k, side, n_samples=n_random, seed=seed)


class InputRSF:
    """``rsf_in{,_update,_grad}``, ``z_in``, ``gap_in``, ``rsf_in_frozen`` for roles in ``input_roles``."""

    def compute(self, m: Measurement) -> dict[str, float]:
        out: dict[str, float] = {}
        for w in m.written:
            tm = w.tm
            if tm.role not in m.input_roles or tm.group_key not in m.eig_in:
                continue
            n = w.shape[1]
            evals, evecs = m.eig_in[tm.group_key]
            k = min(m.k, n - 1)
            views_rsf(out, "rsf_in", w, evecs[:, :k], k, m.n_random, m.seed)
            out[f"gap_in/{tm.key}"] = geo.eigengap(evals, k)
            frozen = m.frozen.get(f"frozen_in/{tm.group_key}")
            if frozen is not None:
                out[f"rsf_in_frozen/{tm.key}"] = geo.relative_rsf(geo.rsf_in(w.views[""], frozen), frozen.shape[1], n)
        return out


class PredictionRSF:
    """``rsf_out_pred{,_update,_grad}``, ``z_out_pred`` for the write roles, and ``gap_pred``."""

    def compute(self, m: Measurement) -> dict[str, float]:
        out: dict[str, float] = {}
        for w in m.written:
            if w.tm.role not in WRITE_ROLES:
                continue
            k = min(m.k, w.shape[0] - 1)
            V, svals = m.prediction(k)
            out["gap_pred"] = geo.eigengap(svals.pow(2), k)
            views_rsf(out, "rsf_out_pred", w, V, k, m.n_random, m.seed)
        return out


class DeltaRSF:
    """``rsf_out_delta{,_update,_grad}``, ``z_out_delta``, ``gap_out_delta`` for roles with ``C_delta``."""

    def compute(self, m: Measurement) -> dict[str, float]:
        out: dict[str, float] = {}
        for w in m.written:
            if w.tm.key not in m.eig_out:
                continue
            evals, evecs = m.eig_out[w.tm.key]
            k = min(m.k, w.shape[0] - 1)
            views_rsf(out, "rsf_out_delta", w, evecs[:, :k], k, m.n_random, m.seed)
            out[f"gap_out_delta/{w.tm.key}"] = geo.eigengap(evals, k)
        return out
