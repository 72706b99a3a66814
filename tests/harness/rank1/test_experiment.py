"""The rank-1 experiment on a tiny model: every family recorded, the model restored, controls
reproducible from the seed, the prediction directions, and the report files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import make_model
from tests.harness.rank1.helpers import CPU, random_pairs, text_blocks
from tests.tiny import tiny_tokenizer
from weightgeom.core.config import Rank1Config
from weightgeom.core.data import tokenize_pairs
from weightgeom.harness.rank1.experiment import (
    FAMILIES,
    Forms,
    Rank1Result,
    build_directions,
    measure_direction,
    prediction_form,
    rank1_experiment,
    zscores,
)
from weightgeom.harness.rank1.measure import Statistics, evaluate, measure_statistics, prepare_heldout
from weightgeom.harness.rank1.report import rank1_section, write_rank1_report
from weightgeom.hooks.roles import resolve_tracked
from weightgeom.hooks.roles import unembedding as resolve_unembedding

# ----- the experiment -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_result():
    """One small experiment on a tiny llama (both sides, two layers), and the model's weights before it."""
    model = make_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tok = tiny_tokenizer()
    cfg = Rank1Config(roles=("q", "o"), n_top=1, n_random=4, n_matched=3, n_lower=2, eps=0.5)
    result = rank1_experiment(model, train_data=tokenize_pairs(random_pairs(12), tok, 16),
                              eval_data=tokenize_pairs(random_pairs(6, seed=1), tok, 16), text_blocks=text_blocks(),
                              config=cfg, seed=3)
    return model, before, result


def test_experiment_restores_the_model_and_records_every_family(tiny_result):
    model, before, result = tiny_result
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.training  # make_model leaves it in train mode; the experiment puts it back
    tested = result.tested()
    assert sorted((d["layer"], d["role"], d["source"]) for d in tested) == [
        (0, "o", "C_delta"), (0, "o", "pred"), (0, "q", "C_a"), (1, "o", "C_delta"), (1, "o", "pred"), (1, "q", "C_a")]
    for t in tested:
        fams = {z["family"]: z for z in result.zscores if z["tested"] == t["id"]}
        assert set(fams) == set(FAMILIES)
        assert fams["haar"]["n"] == 4 and fams["matched"]["n"] == 3 and fams["lower"]["n"] == 2
        assert fams["layer"]["n"] == (0 if t["source"] == "pred" else 1)
        m = t["metrics"]
        assert "dpo_loss_curv" in m
        assert m["pred1_unit"] < 0 and m["pred1"] == pytest.approx(0.5 * m["pred1_unit"], rel=1e-9)
        assert m["pred2_kfac"] > 0 and m["kl"] >= 0
        band = next(x for x in result.matching if x["tested"] == t["id"])
        for d in result.directions:
            if d["tested"] == t["id"] and d["family"] == "matched":
                assert band["lo"] * (1 - 1e-9) <= d["quad"][t["source"]] <= band["hi"] * (1 + 1e-9)
    assert result.base["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)  # reference = base
    assert Rank1Result.from_json(result.to_json()).to_json() == result.to_json()


def test_control_directions_are_reproducible_from_the_seed():
    model = make_model("llama").eval()
    tok = tiny_tokenizer()
    data = tokenize_pairs(random_pairs(8), tok, 16)
    tracked = resolve_tracked(model, ("k", "down"))
    stats = measure_statistics(model, tracked, train_data=data, heldout_data=data, text_blocks=text_blocks(),
                               beta=0.1, batch_size=8, device=CPU)
    forms = Forms(stats, prediction_form(model))
    cfg = Rank1Config(roles=("k", "down"), n_top=2, n_random=5, n_matched=4, n_lower=3)
    for tm in (t for t in tracked if t.layer == 1):
        first, _ = build_directions(tm, forms, 2, cfg, seed=11)
        again, _ = build_directions(tm, Forms(stats, prediction_form(model)), 2, cfg, seed=11)
        other, _ = build_directions(tm, forms, 2, cfg, seed=12)
        assert [d.id for d in first] == [d.id for d in again]
        assert all(torch.equal(a.vector, b.vector) for a, b in zip(first, again))
        random_ids = [i for i, d in enumerate(first) if d.family in ("haar", "matched")]
        assert all(not torch.allclose(first[i].vector, other[i].vector) for i in random_ids)
        haar = torch.stack([d.vector for d in first if d.family == "haar"], 1)
        assert torch.allclose(haar.T @ haar, torch.eye(5, dtype=torch.float64), atol=1e-12)
        assert all(abs(float(d.vector.norm()) - 1) < 1e-12 for d in first)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("centered", [False, True])
def test_prediction_directions_are_the_right_singular_vectors_of_the_unembedding(arch, centered):
    """Dense SVD of W_U diag(g): vocab-centred on request; LayerNorm models (gpt2) without the ones direction."""
    model = make_model(arch)
    V, s = prediction_form(model, centered)
    W_U, gain, layernorm = resolve_unembedding(model)
    M = W_U.double() * gain.double()
    if centered:
        M = M - M.mean(0, keepdim=True)
    if layernorm:
        M = M - M.mean(1, keepdim=True)
    _, s_dense, Vh = torch.linalg.svd(M, full_matrices=False)
    assert torch.allclose(s[:4], s_dense[:4], rtol=1e-8)
    assert torch.allclose((V[:, :4] * Vh[:4].T).sum(0).abs(), torch.ones(4, dtype=torch.float64), atol=1e-6)


def test_report_files_and_section(tiny_result, tmp_path):
    _, _, result = tiny_result
    md = write_rank1_report(result, tmp_path / "rank1")
    text = md.read_text()
    assert "| layer | role | direction | dL/eps |" in text and "| 1 | o | pred#1 |" in text
    assert (tmp_path / "rank1" / "rank1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "rank1" / "rank1.json").read_text())
    assert len(saved["directions"]) == len(result.directions)
    lines = rank1_section(tmp_path)
    assert lines[0].startswith("## Causal test") and "![rank-1 edits](../rank1/rank1.png)" in lines
    assert rank1_section(tmp_path / "nothing_here") == []


# ----- stability of the matched controls ------------------------------------------------------------------

def _perturbed(stats: Statistics, rel: float, seed: int) -> Statistics:
    """Every statistic (G, the held-out gradients, C_a, C_delta) with each entry changed by ``rel``
    relative: independent Gaussian factors, symmetric for the covariances."""
    g = torch.Generator().manual_seed(seed)

    def move(X: torch.Tensor, symmetric: bool) -> torch.Tensor:
        xi = torch.randn(X.shape, generator=g, dtype=torch.float64)
        return X * (1 + rel * ((xi + xi.T) / math.sqrt(2) if symmetric else xi))

    return Statistics({k: move(v, False) for k, v in stats.G.items()},
                      {k: move(v, False) for k, v in stats.G_heldout.items()},
                      {k: move(v, False) for k, v in stats.G_ce.items()},
                      {k: move(v, True) for k, v in stats.C_a.items()},
                      {k: move(v, True) for k, v in stats.C_delta.items()}, stats.tokens, stats.n_pairs)


def _matched_zscores(model, tracked, stats: Statistics, held, base, cfg: Rank1Config) -> dict[str, dict]:
    """The z-scores of every tested direction against its matched family (the other families skipped)."""
    forms = Forms(stats, prediction_form(model))
    directions = []
    for tm in tracked:
        dirs, _ = build_directions(tm, forms, 2, cfg, seed=5)
        directions += [d for d in dirs if d.family in ("tested", "matched")]
    for d in directions:
        d.metrics = measure_direction(model, next(tm for tm in tracked if tm.key == f"L{d.layer}/{d.role}"), d, stats,
                                      held, base, cfg)
    return {z["tested"]: z for z in zscores([], directions) if z["family"] == "matched"}


def test_z_against_matched_controls_moves_less_than_its_standard_error_when_the_statistics_do():
    """Statistics perturbed by 1e-6 relative (as two runs that differ at float-noise level): every
    tested direction's z against its matched controls moves by less than its standard error, on dL/eps
    (the report's column) and the other pair metrics. The model runs in float64, and so do the pair
    log-probs, so that what could move z is the selection, not float32 rounding of the held-out losses
    (docs/rank1.md: in float32 a dL/eps near the evaluation noise moves by itself; CE and KL take their
    log-softmax in float32 whatever the model's dtype, so their z's are left out)."""
    model = make_model("llama").double().eval()
    tok = tiny_tokenizer()
    tracked = resolve_tracked(model, ("q", "k", "o", "down"))
    eval_data = tokenize_pairs(random_pairs(6, seed=1), tok, 16)
    stats = measure_statistics(model, tracked, train_data=tokenize_pairs(random_pairs(12), tok, 16),
                               heldout_data=eval_data, text_blocks=text_blocks(), beta=0.1, batch_size=8, device=CPU)
    held = prepare_heldout(model, eval_data, text_blocks(), beta=0.1, batch_size=8, device=CPU)
    base = evaluate(model, held)
    cfg = Rank1Config(roles=("q", "k", "o", "down"), n_matched=10)
    before = _matched_zscores(model, tracked, stats, held, base, cfg)
    assert len(before) == 12  # 2 layers x (q, k: C_a; o, down: pred, C_delta)
    for seed in (1, 2):
        after = _matched_zscores(model, tracked, _perturbed(stats, 1e-6, seed), held, base, cfg)
        for tested, entry in before.items():
            for metric in ("dpo_loss_unit", "dpo_loss", "margin_unit", "pred1_unit"):
                z, se = entry["z"][metric], entry["z_se"][metric]
                moved = abs(after[tested]["z"][metric] - z)
                assert moved <= se, (f"{tested} {metric}: z {z:.3f} moved by {moved:.3f}, "
                                     f"more than its standard error {se:.3f}")
