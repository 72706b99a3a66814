"""How well each subspace the RSFs use is pinned down: ``subspace_err_in/L{i}/{group}`` (top-k of
``C_a``), ``subspace_err_out/L{i}/{role}`` (top-k of ``C_delta``) and ``subspace_err_pred`` (the
prediction subspace).

Each is an a-posteriori bound on ``sin`` of the largest principal angle between the subspace used and
the exact top-k eigenspace of the measured matrix (residual over gap, :mod:`weightgeom.hooks.eigensolver`),
and bounds how far any RSF against it can be off: ``|RSF - RSF_exact| <= err``. Near 0: pinned. Near or
above 1: the eigengap at k is too small for any solver in this precision to say which k directions are
the top ones (a tiny ``gap_*`` says the same thing in other units): read the RSF against it as
unstable. Reported no lower than :data:`FLOOR`: below it the bound is round-off (float32 eigenvectors
carry residuals of about 1e-7 of the largest eigenvalue), which differs from run to run and means the
same thing, "pinned"."""

from __future__ import annotations

from weightgeom.hooks import keys
from weightgeom.hooks.measurement import Measurement, Request, Values
from weightgeom.hooks.quantities.rsf import out_dim
from weightgeom.hooks.roles import WRITE_ROLES

FLOOR = 1e-4


class SubspaceError:
    def requests(self, m: Measurement) -> list[Request]:
        return []

    def compute(self, m: Measurement) -> Values:
        out = Values()
        for family, spectra in (("subspace_err_in", m.eig_in), ("subspace_err_out", m.eig_out)):
            for key, s in spectra.items():
                out.add([keys.at(family, key)], s.error.clamp_min(FLOOR).reshape(1))
        writers = [tm for tm in m.tracked if tm.role in WRITE_ROLES]
        if m.has_prediction and writers:
            k = min(m.k, out_dim(writers[0]) - 1)  # as PredictionRSF caps it: the same cached subspace
            out.add(["subspace_err_pred"], m.prediction_spectrum(k)[2].clamp_min(FLOOR).reshape(1))
        return out
