"""`harness compare series`: the checkpoints of a tiny run in step order; each cumulative row is exactly
``compare(first, checkpoint)`` and each incremental row exactly ``compare(previous, checkpoint)`` with the same
options; an ambiguous folder is refused, naming it. Also: a run snapshot's ``W0`` is found by its digest."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from weightgeom.core.models import load_local_model
from weightgeom.harness.cli import main
from weightgeom.harness.compare.analysis import compare
from weightgeom.harness.compare.options import CompareOptions
from weightgeom.harness.compare.series import compare_series, series_checkpoints, step_of
from weightgeom.hooks import keys
from weightgeom.hooks.reference import DIGEST_KEY, file_name
from weightgeom.hooks.roles import resolve_tracked

OPTIONS = CompareOptions(k=4, k_curve=(1, 2, 8), n_tokens=400, seq_len=32, batch_size=4, mass=("ce",),
                         mass_tokens=200)


def test_cumulative_rows_are_pairwise_compare_exactly(tiny_run, tmp_path):
    series = compare_series(tiny_run, OPTIONS, device="cpu", out_dir=tmp_path / "series")
    ckpts = [tiny_run / "checkpoints" / f"step_{s:07d}" for s in (2, 4, 6)]
    assert series.paths == [str(p) for p in ckpts] and series.steps == [2, 4, 6]
    assert [row.step for row in series.rows] == [4, 6]
    for row, previous in zip(series.rows, ckpts):
        after = ckpts[row.index]
        pairwise = compare(ckpts[0], after, OPTIONS, device="cpu").metrics()
        assert row.cumulative.metrics() == pairwise, row.path  # exactly: the same computation
        assert row.incremental.metrics() == compare(previous, after, OPTIONS, device="cpu").metrics(), row.path
    first, second = series.rows
    assert first.incremental is first.cumulative  # the second checkpoint: one delta
    assert second.incremental.metrics() != second.cumulative.metrics()
    assert set(series.first_mass) == {"ce"} and "mass_pred/all/down/ce" in first.cumulative.metrics()

    lines = [json.loads(line) for line in (tmp_path / "series" / "series.jsonl").read_text().splitlines()]
    assert [(r["step"], r["kind"]) for r in lines] == [(2, "first"), (4, "cumulative"), (4, "incremental"),
                                                       (6, "cumulative"), (6, "incremental")]
    assert lines[3]["metrics"] == pytest.approx(second.cumulative.metrics(), rel=1e-12)
    report = (tmp_path / "series" / "report.md").read_text()
    assert "## down" in report and "| step_0000006 | 6 |" in report and "mass ce" in report
    for role in ("q", "o", "down"):
        assert (tmp_path / "series" / f"series_{role}.png").is_file(), role


def test_order_of_a_folder_and_of_a_list(tiny_run, tmp_path):
    ckpts = series_checkpoints(tiny_run / "checkpoints")
    assert [p.name for p in ckpts] == ["step_0000002", "step_0000004", "step_0000006"]
    assert series_checkpoints(tiny_run) == ckpts  # a run folder: its checkpoints/
    given = [ckpts[2], ckpts[0], ckpts[1]]
    assert series_checkpoints(given) == given  # a list: the order given
    assert [step_of(n) for n in ("step_0000030", "checkpoint-500", "step1000", "stage1-step2000-tokens4B",
                                 "ckpt7", "epoch3", "run")] == [30, 500, 1000, 2000, 7, 3, None]
    folder = tmp_path / "ckpts"
    for name in ("checkpoint-10", "checkpoint-2"):
        shutil.copytree(ckpts[0], folder / name, ignore=shutil.ignore_patterns("*.pt", "instruments*"))
    (folder / "checkpoint-2.tmp").mkdir()  # an unfinished save is never a checkpoint
    assert [p.name for p in series_checkpoints(folder)] == ["checkpoint-2", "checkpoint-10"]  # by number
    shutil.copytree(folder / "checkpoint-2", folder / "final")
    with pytest.raises(ValueError, match=r"order of the checkpoints in .*ckpts is ambiguous: final holds no step"):
        series_checkpoints(folder)
    shutil.move(folder / "final", folder / "step_10")
    with pytest.raises(ValueError, match=r"ambiguous: checkpoint-10, step_10 give the same step"):
        series_checkpoints(folder)
    with pytest.raises(ValueError, match="is one checkpoint; a series needs two or more"):
        series_checkpoints(ckpts[0])
    with pytest.raises(ValueError, match="checkpoint 2 .* is the same as checkpoint 1"):
        series_checkpoints([ckpts[0], ckpts[0]])


def test_series_on_the_command_line(tiny_run, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["compare", "series", str(tiny_run / "checkpoints" / "step_0000004"),
                 str(tiny_run / "checkpoints" / "step_0000006"), "--k", "4", "--no-read-side", "--device", "cpu",
                 "--out", str(out)]) == 0
    assert "series of 2 checkpoints" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "series.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["cumulative", "incremental"] and "rsf_in/all/q" not in rows[0]["metrics"]
    assert main(["compare", "series", str(tiny_run / "checkpoints" / "step_0000004"), "--out", str(tmp_path / "x")]) \
        == 2
    assert "is one checkpoint; a series needs two or more" in capsys.readouterr().err


def test_a_snapshots_w0_is_found_by_its_digest(tiny_run, tmp_path):
    """Snapshots name their phase's W0 file by sha256 (``meta/w0_sha256``); compare reads it beside a run's
    ``instruments/step_N.safetensors`` or two levels above a checkpoint's ``instruments.safetensors``, to say
    when the C_a comes from a phase that did not start from BASE."""
    ckpts = [tiny_run / "checkpoints" / f"step_{s:07d}" for s in (2, 4, 6)]
    snapshot = tiny_run / "instruments" / "step_0000006.safetensors"
    state = load_file(str(snapshot))
    assert DIGEST_KEY in state and not any(keys.family(k) == keys.WEIGHTS and k.endswith("/W0") for k in state)
    w0_file = tiny_run / "instruments" / file_name(bytes(state[DIGEST_KEY].tolist()))
    assert w0_file.is_file()
    fast = dict(k=4, zscores=False, device="cpu")
    # the phase started from the random init, not from step 2: said, for both places a snapshot lives
    for path in (snapshot, ckpts[2] / "instruments.safetensors"):
        notes = compare(ckpts[0], ckpts[2], c_a=path, **fast).notes
        assert any("W0 differ from BASE" in n and w0_file.name in n for n in notes), (path, notes)
    # BASE = the W0 the phase started from: no such note
    model = load_local_model(ckpts[0])
    w0 = load_file(str(w0_file))
    for tm in resolve_tracked(model):
        tm.module.weight.data.copy_(w0[keys.state_key(keys.WEIGHTS, tm.key, "W0")])
    model.save_pretrained(tmp_path / "start")
    notes = compare(tmp_path / "start", ckpts[2], c_a=snapshot, **fast).notes
    assert not any("W0" in n for n in notes), notes
    # a snapshot copied away from its W0 file: said, not failed
    alone = tmp_path / "alone" / "snapshot.safetensors"
    alone.parent.mkdir()
    shutil.copy(snapshot, alone)
    result = compare(ckpts[0], ckpts[2], c_a=alone, **fast)
    assert any(f"W0 are in {w0_file.name}, which is not beside it" in n for n in result.notes), result.notes
    assert result.metrics()["rsf_in/L0/q"] > 0  # the C_a is used all the same
    # an older snapshot holding the W0 tensors themselves still works
    legacy = {k: v for k, v in state.items() if k != DIGEST_KEY}
    legacy.update({k: v for k, v in w0.items()})
    save_file(legacy, str(tmp_path / "legacy.safetensors"))
    notes = compare(ckpts[0], ckpts[2], c_a=tmp_path / "legacy.safetensors", **fast).notes
    assert any("W0 differ from BASE" in n and "held in the snapshot" in n for n in notes), notes
