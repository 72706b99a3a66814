"""`harness compare init AFTER`: BASE is a seeded random initialisation of AFTER's own config (the family's
``_init_weights`` with its ``initializer_range``). The same seed gives the same numbers, another seed other but
close numbers; the delta is AFTER minus exactly that initialisation; the report shows the spread over seeds."""

from __future__ import annotations

import json

import pytest
import torch

from tests.harness.compare.test_analysis import SAMPLE, save_model, text_file, tokenizer  # noqa: F401
from weightgeom.core.models import build_tiny_model, load_local_model, random_init
from weightgeom.harness.cli import main
from weightgeom.harness.compare.analysis import compare
from weightgeom.harness.compare.init import compare_init
from weightgeom.hooks.roles import resolve_tracked

OPTIONS = dict(k=4, k_curve=(1, 2, 8), zscores=True, **SAMPLE)


@pytest.fixture
def after_dir(tokenizer, tmp_path):  # noqa: F811
    """A tiny llama initialised with seed 123, then moved by seeded noise: a 'trained' checkpoint whose init is
    none of the seeds compared against."""
    model = build_tiny_model("llama", vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=4,
                             max_position_embeddings=64, seed=123)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return save_model(model, tokenizer, tmp_path / "after")


def test_random_init_is_the_familys_seeded_init():
    small = build_tiny_model("gpt2", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                             tie_word_embeddings=True)
    state = torch.random.get_rng_state()
    a, b, c = random_init(small.config, 0), random_init(small.config, 0), random_init(small.config, 1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    w = [m.transformer.h[0].attn.c_attn.weight for m in (a, b, c)]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])
    assert w[0].std().item() == pytest.approx(small.config.initializer_range, rel=0.1)
    # GPT-2's own rule: residual projections scaled by 1 / sqrt(2 n_layer)
    assert a.transformer.h[0].attn.c_proj.weight.std().item() == pytest.approx(0.02 / 2, rel=0.1)
    assert a.lm_head.weight is a.transformer.wte.weight  # tied embeddings stay tied


def test_same_seed_same_numbers_other_seed_close_numbers(after_dir, text_file, tmp_path):  # noqa: F811
    both = compare_init(after_dir, seeds=(0, 1), text=str(text_file), mass=("ce",), mass_tokens=200,
                        device="cpu", out_dir=tmp_path / "out", **OPTIONS)
    again = compare_init(after_dir, seeds=(1,), text=str(text_file), mass=("ce",), mass_tokens=200, device="cpu",
                         **OPTIONS)
    assert again.results[0].metrics() == both.results[1].metrics()  # seed 1 alone gives seed 1's numbers, exactly
    m0, m1 = (r.metrics() for r in both.results)
    assert m0.keys() == m1.keys()
    for key in ("rsf_out_pred/all/o", "rsf_out_pred/all/down", "rsf_in/all/q", "delta_norm/L0/q"):
        assert m0[key] != m1[key], key  # another init, another delta
    for key in ("rsf_out_pred/all/o", "rsf_out_pred/all/down", "rsf_in/all/q"):
        assert abs(m0[key] - m1[key]) < 0.5, key  # but the same kind of delta: no preferred direction here
    assert m0["delta_norm/L0/q"] == pytest.approx(m1["delta_norm/L0/q"], rel=0.1)
    assert m0["mass_pred/all/o/ce"] == m1["mass_pred/all/o/ce"]  # measured on AFTER once, for every seed

    # the delta is AFTER minus exactly random_init(AFTER's config, seed)
    after = load_local_model(after_dir)
    init = {tm.key: tm.weight() for tm in resolve_tracked(random_init(after.config, 1))}
    for tm in resolve_tracked(after):
        assert m1[f"delta_norm/{tm.key}"] == pytest.approx((tm.weight() - init[tm.key]).double().norm().item(),
                                                           rel=1e-6), tm.key
    # C_a is AFTER's (an init's activations carry nothing learnt), with AFTER's tokenizer
    assert both.results[0].c_a_source.startswith("AFTER model") and both.results[0].base_dir == "init (seed 0)"

    summary = both.summary()["rsf_out_pred/all/o"]
    assert summary["values"] == [m0["rsf_out_pred/all/o"], m1["rsf_out_pred/all/o"]]
    assert summary["sd"] == pytest.approx(abs(m0["rsf_out_pred/all/o"] - m1["rsf_out_pred/all/o"]) / 2 ** 0.5)
    saved = json.loads((tmp_path / "out" / "init.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["initializer_range"] == 0.02
    assert saved["summary"]["rsf_out_pred/all/o"] == summary  # JSON keeps floats exactly
    assert saved["curves"]["out"]["down"]["ks"] == [1, 2, 8]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "random initialisation of AFTER's own config" in report and "±" in report and "[seed 1]" in report
    for name in ("seed_0/report.md", "seed_1/compare.json", "rsf_k_curve_out.png", "mass_k_curve.png"):
        assert (tmp_path / "out" / name).is_file(), name


def test_init_on_the_command_line(after_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["compare", "init", str(after_dir), "--seeds", "0", "1", "--no-read-side", "--k", "4",
                 "--k-curve", "1,2", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "AFTER - random init of its config (seeds 0, 1" in printed and "| o |" in printed
    saved = json.loads((out / "init.json").read_text())
    assert "rsf_in/all/q" not in saved["summary"] and "rsf_out_pred/all/down" in saved["summary"]
    api = compare_init(after_dir, seeds=(0, 1), read_side=False, k=4, k_curve=(1, 2), device="cpu")
    assert saved["summary"]["rsf_out_pred/all/down"] == api.summary()["rsf_out_pred/all/down"]
    # --seeds belongs to init; 'init' is not a directory to compare()
    assert main(["compare", str(after_dir), str(after_dir), "--seeds", "1", "--out", str(tmp_path / "x")]) == 2
    assert "--seeds applies to 'harness compare init AFTER' only" in capsys.readouterr().err
    assert main(["compare", "init", str(after_dir), str(after_dir), "--out", str(tmp_path / "y")]) == 2
    assert "compare takes BASE AFTER, 'init AFTER' or 'series CK1 CK2 ...'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"compare_init\(AFTER, options\)"):
        compare("init", after_dir)


def test_the_init_itself_can_measure_with_afters_tokenizer(after_dir, text_file):  # noqa: F811
    """--c-a-model base / --mass-model base on an init: the initialisation runs over the text (it has no
    tokenizer of its own: AFTER's is used)."""
    init = compare_init(after_dir, seeds=(0,), text=str(text_file), c_a_model="base", mass=("ce",),
                        mass_model="base", mass_tokens=200, device="cpu", **OPTIONS)
    result = init.results[0]
    assert result.c_a_source.startswith("BASE model (init (seed 0)), forward only")
    assert result.mass["ce"].model == "base" and result.mass["ce"].source.startswith("BASE model")
    on_after = compare_init(after_dir, seeds=(0,), text=str(text_file), mass=("ce",), mass_tokens=200, device="cpu",
                            **OPTIONS).results[0]
    assert on_after.mass["ce"].mass != result.mass["ce"].mass  # AFTER's C_delta is another one
