"""Golden numbers, in torchtune's style: the smoke pipeline at a fixed seed, a handful of its results
pinned to stored values.

Everything else in the suite compares runs with each other (live metrics against a brute-force
recomputation, a rerun against a resumed run), so a numeric drift that moves both sides passes; that is
how the main job's rank-1 z-matched column moved without any test noticing. Here the
``asymmetry_smoke`` recipe (seed 0) runs pretraining (30 steps), one alignment objective (``g1.00``,
6 steps) and a small rank-1 stage in one torch thread (tests/conftest.py), and six numbers must equal
the values stored below, each within a relative tolerance:

    pretrain eval/loss            the held-out CE after pretraining
    align pref/loss               the preference loss of the last alignment step
    align rsf_in/all/q            the final relative RSF_in of q (mean over layers)
    align rsf_out_pred/all/down   the final relative RSF_out of down against the prediction subspace
    rank-1 dL/eps                 the measured change of the held-out DPO loss per unit edit norm, for
                                  the top prediction direction of L1/o at eps (``dpo_loss / eps``)
    rank-1 first-order dL/eps     its first-order prediction ``<G, dW> / eps`` (``pred1_unit``)

Tolerances: float noise cannot cross them and a real change does. Measured on this recipe (largest
relative difference from the stored value, over the six numbers):

    a rerun; 2 threads instead of 1                     0 (bit for bit)
    instruments.metric_dtype float64 (metrics in fp64)  1.4e-6
    ATen and MKL on AVX2 kernels instead of AVX-512     2.4e-5 (rank-1 dL/eps; 3.5e-6 the others)
    ATen without SIMD, MKL on SSE4.2                    6.1e-6 (rank-1 dL/eps; 3.9e-6 the others)
      (ATEN_CPU_CAPABILITY=avx2 / default with MKL_ENABLE_INSTRUCTIONS=AVX2 / SSE4_2: the reduction
      orders another CPU would use, through all 36 training steps)

so 1e-4 (25x the largest spread of those numbers) and 1e-3 for the rank-1 dL/eps, a difference of
two float32 losses (42x its spread). A 1% change is 10 to 100 times a tolerance. Two numbers were
left out for being noisier: the same dL/eps measured at eps_small (``dpo_loss_unit``: the loss moves
by 2.5e-5, a few hundred float32 ulps, so kernels move it by up to 2%) and ``rsf_out_pred/all/o``
(1.2e-5, its prediction subspace's eigengap is small).

Inputs: the corpus and the tokenizer come from this interpreter's standard library, so the numbers
hold for the Python they were recorded with (3.11.7; torch 2.13.0+cpu, transformers 5.25.0); another
Python skips. On the recorded Python the prepared corpus must be the recorded one (its SHA-256): a
change of tokenization or sharding fails here first. A change that moves a number on purpose stores
the new value, and its commit says why.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import pytest

from weightgeom.core.sinks import read_metrics
from weightgeom.harness.cli import main

RECORDED_PYTHON = "3.11.7"
CORPUS_SHA256 = "ae10f29c86089a4a310bc9588667aa88e2d3373b0299329a0be51a9573ae879d"  # train + eval shard files
RANK1 = "rank1={layers: [1], roles: [q, o], n_top: 1, n_random: 2, n_matched: 2, n_lower: 0, text_blocks: 4}"
DIRECTION = "L1/o/out/pred#1"  # the top prediction-subspace direction of layer 1's o

# name: (stored value, relative tolerance)
GOLDEN = {
    "pretrain eval/loss": (5.5563841788999495, 1e-4),
    "align pref/loss": (0.6889529824256897, 1e-4),
    "align rsf_in/all/q": (3.08605694770813, 1e-4),
    "align rsf_out_pred/all/down": (1.0816652476787567, 1e-4),
    "rank-1 dL/eps": (0.03900408744812012, 1e-3),
    "rank-1 first-order dL/eps": (-0.0047234271639774, 1e-4),
}


def corpus_sha256(cache_dir: Path) -> str:
    (corpus,) = (cache_dir / "corpora").iterdir()  # a fresh cache holds the one corpus this run prepared
    return hashlib.sha256(b"".join(f.read_bytes() for f in sorted(corpus.glob("*.bin")))).hexdigest()


def read_golden_numbers(run: Path) -> dict[str, float]:
    """The pinned numbers of a finished run, by the names of :data:`GOLDEN`."""
    pretrain = read_metrics(run / "pretrain" / "metrics.jsonl")[-1]
    align = read_metrics(run / "align" / "g1.00" / "metrics.jsonl")[-1]
    rank1 = json.loads((run / "rank1" / "rank1.json").read_text())
    (direction,) = [d["metrics"] for d in rank1["directions"] if d["id"] == DIRECTION]
    return {"pretrain eval/loss": pretrain["eval/loss"], "align pref/loss": align["pref/loss"],
            "align rsf_in/all/q": align["rsf_in/all/q"], "align rsf_out_pred/all/down": align["rsf_out_pred/all/down"],
            "rank-1 dL/eps": direction["dpo_loss"] / rank1["config"]["eps"],
            "rank-1 first-order dL/eps": direction["pred1_unit"]}


def golden_mismatches(numbers: dict[str, float]) -> list[str]:
    """One line per number outside its tolerance of the stored value."""
    return [f"{name}: got {numbers[name]!r}, stored {value!r} (relative difference "
            f"{abs(numbers[name] - value) / abs(value):.2e}, tolerance {tol:g})"
            for name, (value, tol) in GOLDEN.items() if numbers[name] != pytest.approx(value, rel=tol, abs=0)]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict[str, float], str]:
    """(the golden numbers, the corpus SHA-256) of one smoke pipeline run."""
    if platform.python_version() != RECORDED_PYTHON:
        pytest.skip(f"the golden numbers hold for Python {RECORDED_PYTHON}'s standard library (the corpus and the "
                    f"tokenizer); this is Python {platform.python_version()}")
    out = tmp_path_factory.mktemp("golden")
    assert main(["run", "asymmetry_smoke", f"output_dir={out}", "name=run", f"tokenizer.cache_dir={out / 'cache'}",
                 "stages=[pretrain, align, rank1]", "align.objectives=[{name: g1.00, loss: graded, grade: 1.0}]",
                 RANK1, "--no-progress"]) == 0
    return read_golden_numbers(out / "run"), corpus_sha256(out / "cache")


def test_the_smoke_pipeline_gives_its_golden_numbers(smoke):
    numbers, corpus = smoke
    assert corpus == CORPUS_SHA256, ("the prepared corpus is not the recorded one: this interpreter's stdlib "
                                     "differs, or tokenization or sharding changed")
    mismatches = golden_mismatches(numbers)
    assert not mismatches, "numbers moved from their stored values:\n" + "\n".join(mismatches)


def test_a_one_percent_change_of_any_golden_number_fails(smoke):
    numbers, _ = smoke
    for name in GOLDEN:
        planted = golden_mismatches({**numbers, name: numbers[name] * 1.01})
        assert [line.split(":")[0] for line in planted] == [name], planted
