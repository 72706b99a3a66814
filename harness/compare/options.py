"""``CompareOptions``: every setting of a static comparison in one object, which the Python API
(``compare(base, after, CompareOptions(k=4))``) and ``harness compare`` (from its flags) both fill.

Kept import-free (dataclasses only), so that ``harness --help`` does not load torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

UNEMBED_CHOICES = ("after", "base")  # whose W_U spans the prediction subspace; the live metrics use AFTER's
C_A_MODELS = ("base", "after")  # which checkpoint runs over the text to measure C_a


@dataclass(frozen=True)
class CompareOptions:
    """What :func:`weightgeom.harness.compare.analysis.compare` measures and how, validated on
    construction (an error names the ``harness compare`` flag of the field, e.g. ``--k``).

    ``text``: the sample ``C_a`` is measured on: ``"stdlib"`` (the embedded corpus) or a local
    .txt/.jsonl/.json/.parquet file or directory (``text_field`` names the column).
    ``k``: subspace dimension (capped at ``dim - 1`` per matrix, as in the live metrics).
    ``k_curve``: the k of the RSF-vs-k curves.
    ``unembed``: ``"after"`` (the live metrics' choice: the unembedding at measurement time) or
    ``"base"``: whose ``W_U`` and final-norm gain span the prediction subspace; the other one's value
    is reported too (``rsf_out_pred_alt``).
    ``c_a``: an instrument snapshot (``*.safetensors`` with ``cov_in/L{i}/{g}/sum_outer`` and ``count``)
    to take ``C_a`` from instead of measuring it.
    ``c_a_model``: which checkpoint runs over the text to measure ``C_a`` (BASE: the activations the
    delta was written against, before the delta changed them).
    ``n_tokens``, ``seq_len``, ``batch_size``, ``seed``: the token sample (non-padding tokens, chunk
    length capped at the model's positions, forward batch, sampling seed).
    ``zscores``: exact z-scores of each RSF against random k-subspaces (closed form, as the live metrics).
    ``tokenizer``: tokenizer directory (None: the one saved in BASE).
    """

    text: str = "stdlib"
    text_field: str = "text"
    k: int = 8
    k_curve: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    unembed: str = "after"
    c_a: str | Path | None = None
    c_a_model: str = "base"
    n_tokens: int = 32768
    seq_len: int = 256
    batch_size: int = 8
    zscores: bool = True
    seed: int = 0
    tokenizer: str | Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "k_curve", tuple(int(v) for v in self.k_curve))  # a list from the CLI or a caller
        for flag, value in (("--n-tokens", self.n_tokens), ("--seq-len", self.seq_len),
                            ("--batch-size", self.batch_size)):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.k < 1:
            raise ValueError(f"--k must be >= 1, got {self.k}")
        if not self.k_curve or min(self.k_curve) < 1:
            raise ValueError(f"--k-curve needs one or more k >= 1, got {list(self.k_curve)}")
        if self.unembed not in UNEMBED_CHOICES:
            raise ValueError(f"--unembed must be one of {UNEMBED_CHOICES}, got {self.unembed!r}")
        if self.c_a_model not in C_A_MODELS:
            raise ValueError(f"--c-a-model must be one of {C_A_MODELS}, got {self.c_a_model!r}")

    def replace(self, **changes) -> CompareOptions:
        """A copy with ``changes`` (field names) applied and validated; an unknown name is a TypeError
        that lists the fields."""
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise TypeError(f"unknown compare option {unknown[0]!r}; CompareOptions has {names}")
        return dataclasses.replace(self, **changes)
