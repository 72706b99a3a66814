"""Run-health checks: the memorisation warning fires on the measured memorising pattern and not on a
healthy run; preference accuracy at chance uses the stated binomial band; non-finite values are
named; health.json is strict JSON."""

from __future__ import annotations

import json
import math

import torch

from tests.synthetic_runs import MEMORISING_EVAL, pretrain_rows
from weightgeom.harness.reports.health import (
    chance_band,
    check_phase,
    console_lines,
    health_block,
    health_json,
    memorisation,
    non_finite,
    preference_at_chance,
    snapshot_non_finite,
)


def test_memorisation_fires_on_the_measured_memorising_run():
    rows = pretrain_rows(memorising=True, geo={})
    warnings, notes = memorisation(rows, "pretrain (CE)", "train/loss", "eval/loss")
    assert not notes and len(warnings) == 1
    w = warnings[0]
    assert w.check == "memorisation"
    assert (w.values["eval_min_step"], w.values["eval_min"]) == (1000, 2.30)
    assert (w.values["eval_last_step"], w.values["eval_last"]) == (2500, 3.40)
    assert abs(w.values["train_last"] - 0.03) < 1e-9 and w.values["train_at_eval_min"] > 0.5
    # both series are printed from the minimum on, the held-out loss and the training loss at its steps
    assert [s for s, _ in w.values["eval_series"]] == [1000, 1500, 2000, 2500]
    assert [v for _, v in w.values["eval_series"]] == [MEMORISING_EVAL[s] for s in (1000, 1500, 2000, 2500)]
    for needle in ("2.3 (step 1000)", "3.4 at step 2500", "+47.8%", "0.03", "step 2000: 3.15"):
        assert needle in w.message, needle


def test_memorisation_is_silent_on_a_healthy_run_and_on_small_noise():
    rows = pretrain_rows(memorising=False, geo={})
    assert memorisation(rows, "p", "train/loss", "eval/loss") == ([], [])
    noisy = [dict(r) for r in rows]
    noisy[-1]["eval/loss"] = noisy[-6]["eval/loss"] * 1.04  # 4% above the minimum: inside the 5% margin
    assert memorisation(noisy, "p", "train/loss", "eval/loss") == ([], [])
    noisy[-1]["eval/loss"] = noisy[-6]["eval/loss"] * 1.06  # 6%: a rise beyond the margin
    assert len(memorisation(noisy, "p", "train/loss", "eval/loss")[0]) == 1


def test_memorisation_needs_the_training_loss_to_fall():
    rows = pretrain_rows(memorising=True, geo={})
    for r in rows:  # training loss climbing too: a diverging run, not memorisation
        if "train/loss" in r:
            r["train/loss"] = r["step"] / 1000
    assert memorisation(rows, "p", "train/loss", "eval/loss") == ([], [])


def test_memorisation_says_when_it_cannot_run():
    rows = [{"step": 1, "train/loss": 3.0}, {"step": 2, "train/loss": 2.0, "eval/loss": 2.5}]
    warnings, notes = memorisation(rows, "p", "train/loss", "eval/loss")
    assert warnings == [] and len(notes) == 1 and "1 point" in notes[0].message


def _pref_rows(accuracy: float, margin: float, n_rows: int = 5, eval_acc: float | None = None,
               eval_margin: float = 0.3) -> list[dict]:
    rows = [{"step": s, "pref/accuracy": accuracy, "pref/margin": margin, "pref/loss": 0.6}
            for s in range(1, n_rows + 1)]
    if eval_acc is not None:
        rows[-1].update({"eval/pref_accuracy": eval_acc, "eval/pref_margin": eval_margin})
    return rows


def test_chance_band_is_the_binomial_95_percent_band():
    assert abs(chance_band(100) - 0.098) < 1e-12
    assert abs(chance_band(20) - 1.96 * math.sqrt(0.25 / 20)) < 1e-12


def test_training_accuracy_at_chance_uses_the_pooled_pairs():
    # 5 rows x 4 pairs = 20 pairs: the band's upper edge is 0.5 + 1.96 sqrt(0.25 / 20) = 0.719
    warnings, _ = preference_at_chance(_pref_rows(0.70, 0.1), "dpo", pairs_per_step=4, n_eval_pairs=None)
    assert len(warnings) == 1 and "0.7 over 20 pairs" in warnings[0].message and "0.719" in warnings[0].message
    assert preference_at_chance(_pref_rows(0.75, 0.1), "dpo", pairs_per_step=4, n_eval_pairs=None)[0] == []
    # more pairs per step: the same accuracy is no longer chance
    assert preference_at_chance(_pref_rows(0.70, 0.1), "dpo", pairs_per_step=16, n_eval_pairs=None)[0] == []
    # the margin alone: a learned-looking accuracy with a margin not above 0 warns
    warnings, _ = preference_at_chance(_pref_rows(0.95, 0.0), "dpo", pairs_per_step=4, n_eval_pairs=None)
    assert len(warnings) == 1 and "margin 0 " in warnings[0].message


def test_held_out_accuracy_at_chance_uses_the_recorded_pair_count():
    rows = _pref_rows(0.95, 0.5, eval_acc=0.58)
    warnings, notes = preference_at_chance(rows, "dpo", pairs_per_step=8, n_eval_pairs=100)
    assert len(warnings) == 1 and "held-out accuracy 0.58 over 100 pairs" in warnings[0].message
    assert not notes
    assert preference_at_chance(_pref_rows(0.95, 0.5, eval_acc=0.62), "dpo", 8, 100)[0] == []  # above 0.598
    warnings, notes = preference_at_chance(rows, "dpo", pairs_per_step=8, n_eval_pairs=None)
    assert warnings == [] and any("not recorded" in n.message for n in notes)  # no n: margin only


def test_non_finite_values_are_named_by_key_and_first_step():
    rows = [{"step": 1, "train/loss": 3.0, "rsf_in/L0/q": 2.0},
            {"step": 2, "train/loss": math.nan, "rsf_in/L0/q": math.inf},
            {"step": 3, "train/loss": math.nan, "eval/loss": math.nan}]
    (w,) = non_finite(rows, "pretrain")
    assert w.values["first_step"] == {"eval/loss": 3, "rsf_in/L0/q": 2, "train/loss": 2}
    assert "2 training metrics (train/loss from step 2, eval/loss from step 3)" in w.message
    assert "1 geometry metrics (rsf_in/L0/q from step 2)" in w.message
    assert non_finite(rows[:1], "pretrain") == []
    state = {"a": torch.ones(2), "b": torch.tensor([1.0, math.nan]), "c": torch.tensor([math.inf]),
             "n": torch.tensor(3)}
    assert snapshot_non_finite(state) == ["b", "c"]


def test_health_block_and_json_carry_the_numbers():
    rows = pretrain_rows(memorising=True, geo={})
    rows[3]["train/grad_norm"] = math.inf
    warnings, notes = check_phase(rows, "pretrain (CE)", alignment=False)
    assert [w.check for w in warnings] == ["non_finite", "memorisation"]
    block = "\n".join(health_block(warnings, notes))
    assert block.startswith("## Health: 2 warnings")
    assert "> **WARNING (memorisation, pretrain (CE))**" in block and "Rules: **memorisation**" in block
    data = json.loads(health_json(warnings, notes), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert data["warnings"][1]["values"]["eval_last"] == 3.40
    assert set(data["rules"]) == {"memorisation", "preference_at_chance", "non_finite"}
    assert "## Health: no warnings" in "\n".join(health_block([], []))


def test_console_lines_give_each_warning_its_headline(tmp_path):
    rows = pretrain_rows(memorising=True, geo={})
    warnings, notes = check_phase(rows, "pretrain", alignment=False)
    assert console_lines(tmp_path) == []  # no report yet
    (tmp_path / "health.json").write_text(health_json([], notes))
    assert console_lines(tmp_path) == []
    (tmp_path / "health.json").write_text(health_json(warnings, notes))
    lines = console_lines(tmp_path)
    assert len(lines) == 2 and lines[0].startswith("WARNING (memorisation, pretrain): eval/loss rose from its minimum")
    assert lines[0].endswith("(memorisation).") and "step" in lines[0]
    assert lines[1] == f"details: {tmp_path / 'report.md'} (Health)"
