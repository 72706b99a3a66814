"""``CompareOptions``: every setting of a static comparison in one object, which the Python API
(``compare(base, after, CompareOptions(k=4))``, ``compare_init``, ``compare_series``) and ``harness compare``
(from its flags) all fill.

Kept import-free (dataclasses and re only), so that ``harness --help`` does not load torch.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

UNEMBED_CHOICES = ("after", "base")  # whose W_U spans the prediction subspace; the live metrics use AFTER's
C_A_MODELS = ("base", "after")  # which checkpoint runs over the text to measure C_a
MASS_MODELS = ("after", "base")  # which checkpoint's C_delta the mechanism metric measures
INIT = "init"  # BASE = a random initialisation of AFTER's config (``harness compare init AFTER``)
# The losses whose per-token (CE) or per-pair (preference) delta the mechanism metric measures
_GRADED = re.compile(r"^g(\d+(?:\.\d*)?|\.\d+)$")
_MIXTURE = re.compile(r"^mix(\d+(?:\.\d*)?|\.\d+)$")
MASS_LOSS_HELP = ("ce (next-token cross-entropy on --text), dpo (sigmoid DPO = g1), likelihood (= g0), gG (the "
                  "graded loss at grade G, e.g. g0.5), mixL (L * CE(chosen) + (1 - L) * DPO, e.g. mix0.5)")


def mass_loss(name: str) -> tuple[str, float | None]:
    """``(kind, parameter)`` of a mechanism loss name: ``("ce", None)``, ``("graded", g)`` for ``dpo``,
    ``likelihood`` and ``gG``, ``("mixture", lam)`` for ``mixL``. ValueError naming ``--mass`` otherwise."""
    if name == "ce":
        return "ce", None
    if name == "dpo":
        return "graded", 1.0
    if name == "likelihood":
        return "graded", 0.0
    if (found := _GRADED.match(name)) is not None:
        return "graded", float(found.group(1))
    if (found := _MIXTURE.match(name)) is not None:
        lam = float(found.group(1))
        if lam > 1:
            raise ValueError(f"--mass {name}: a mixture's weight must be in [0, 1]")
        return "mixture", lam
    raise ValueError(f"--mass: unknown loss {name!r}; use {MASS_LOSS_HELP}")


@dataclass(frozen=True)
class CompareOptions:
    """What :func:`weightgeom.harness.compare.analysis.compare` (and ``compare_init``, ``compare_series``)
    measures and how, validated on construction (an error names the ``harness compare`` flag of the field,
    e.g. ``--k``).

    ``text``: the sample ``C_a`` (and the CE mechanism's ``C_delta``) is measured on: ``"stdlib"`` (the embedded
    corpus) or a local .txt/.jsonl/.json/.parquet file or directory (``text_field`` names the column).
    ``k``: subspace dimension (capped at ``dim - 1`` per matrix, as in the live metrics).
    ``k_curve``: the k of the RSF-vs-k (and mass-vs-k) curves.
    ``unembed``: ``"after"`` (the live metrics' choice: the unembedding at measurement time) or
    ``"base"``: whose ``W_U`` and final-norm gain span the prediction subspace; the other one's value
    is reported too (``rsf_out_pred_alt``).
    ``c_a``: an instrument snapshot (``*.safetensors`` with ``cov_in/L{i}/{g}/sum_outer`` and ``count``)
    to take ``C_a`` from instead of measuring it.
    ``c_a_model``: which checkpoint runs over the text to measure ``C_a``; None (default): BASE (the
    activations the delta was written against, before the delta changed them), except AFTER when BASE is a
    random initialisation (whose activations carry no learnt structure).
    ``n_tokens``, ``seq_len``, ``batch_size``, ``seed``: the token sample (non-padding tokens, chunk
    length capped at the model's positions, forward batch, sampling seed).
    ``zscores``: exact z-scores of each RSF against random k-subspaces (closed form, as the live metrics).
    ``tokenizer``: tokenizer directory (None: the one saved with the model that runs over the text).
    ``read_side``: measure ``C_a`` and the input side (False: the write side only, no text pass).
    ``layers``: only these layers' matrices (None: all).
    ``seeds``: the seeds of the random initialisations when BASE is ``init`` (one comparison per seed, and
    their spread).
    ``mass``: losses whose ``C_delta`` is measured on ``mass_model`` for the mechanism metric (the mass of
    ``C_delta`` in the prediction subspace; :data:`MASS_LOSS_HELP`): ``ce`` on ``mass_tokens`` tokens of
    ``text``, a preference loss on ``n_pairs`` pairs of ``pairs`` (``docstrings``, ``embedded`` or a file),
    cut to ``max_len`` tokens, with temperature ``beta``; the reference model of a preference loss is the
    measured model itself.
    """

    text: str = "stdlib"
    text_field: str = "text"
    k: int = 8
    k_curve: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    unembed: str = "after"
    c_a: str | Path | None = None
    c_a_model: str | None = None
    n_tokens: int = 32768
    seq_len: int = 256
    batch_size: int = 8
    zscores: bool = True
    seed: int = 0
    tokenizer: str | Path | None = None
    read_side: bool = True
    layers: tuple[int, ...] | None = None
    seeds: tuple[int, ...] = (0,)
    mass: tuple[str, ...] = ()
    mass_model: str = "after"
    mass_tokens: int = 8192
    pairs: str = "docstrings"
    n_pairs: int = 64
    max_len: int = 128
    beta: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "k_curve", tuple(int(v) for v in self.k_curve))  # a list from the CLI or a caller
        object.__setattr__(self, "seeds", tuple(int(v) for v in self.seeds))
        object.__setattr__(self, "mass", tuple(str(v) for v in self.mass))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted({int(v) for v in self.layers})))
        for flag, value in (("--n-tokens", self.n_tokens), ("--seq-len", self.seq_len),
                            ("--batch-size", self.batch_size), ("--mass-tokens", self.mass_tokens),
                            ("--n-pairs", self.n_pairs)):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.max_len < 2:
            raise ValueError(f"--max-len must be >= 2, got {self.max_len}")
        if self.k < 1:
            raise ValueError(f"--k must be >= 1, got {self.k}")
        if not self.k_curve or min(self.k_curve) < 1:
            raise ValueError(f"--k-curve needs one or more k >= 1, got {list(self.k_curve)}")
        if self.unembed not in UNEMBED_CHOICES:
            raise ValueError(f"--unembed must be one of {UNEMBED_CHOICES}, got {self.unembed!r}")
        if self.c_a_model is not None and self.c_a_model not in C_A_MODELS:
            raise ValueError(f"--c-a-model must be one of {C_A_MODELS}, got {self.c_a_model!r}")
        if self.mass_model not in MASS_MODELS:
            raise ValueError(f"--mass-model must be one of {MASS_MODELS}, got {self.mass_model!r}")
        if not self.seeds:
            raise ValueError("--seeds needs one or more seeds")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds repeats a seed: {list(self.seeds)}")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ValueError(f"--layers needs one or more layer indices >= 0, got {list(self.layers)}")
        if len(set(self.mass)) != len(self.mass):
            raise ValueError(f"--mass repeats a loss: {list(self.mass)}")
        for name in self.mass:
            mass_loss(name)
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"--beta must be a finite number > 0, got {self.beta}")

    def replace(self, **changes) -> CompareOptions:
        """A copy with ``changes`` (field names) applied and validated; an unknown name is a TypeError
        that lists the fields."""
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise TypeError(f"unknown compare option {unknown[0]!r}; CompareOptions has {names}")
        return dataclasses.replace(self, **changes)

    def c_a_checkpoint(self, base_is_init: bool) -> str:
        """Which checkpoint measures ``C_a``: ``c_a_model``, or by default BASE (AFTER when BASE is a random init)."""
        if self.c_a_model is not None:
            return self.c_a_model
        return "after" if base_is_init else "base"
