"""Checkpoints are complete before they become visible: the manifest is written last and checked on
resume, stale .tmp directories are cleaned (or finished), old checkpoints pruned, files readable."""

from __future__ import annotations

import json
import os
import stat

import torch

from tests.conftest import make_model
from weightgeom.core.checkpoint import (
    MANIFEST_FILE,
    STATE_FILE,
    checkpoint_dir,
    clean_stale,
    is_complete,
    latest_checkpoint,
    load_trainer_state,
    manifest_problem,
    prune_checkpoints,
    save_checkpoint,
)


def _save(run, step, model=None):
    model = model or make_model("llama")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return save_checkpoint(checkpoint_dir(run, step), model=model, tokenizer=None, optimizer=opt, scheduler=sched,
                           step=step, instruments={"cov_in/L0/attn_in/count": torch.tensor(3.0)})


def test_manifest_is_written_last_and_lists_every_file(tmp_path):
    path = _save(tmp_path, 4)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    on_disk = {p.name: p.stat().st_size for p in path.iterdir() if p.name != MANIFEST_FILE}
    assert manifest["files"] == on_disk and manifest["step"] == 4
    assert is_complete(path) and load_trainer_state(path)["step"] == 4
    (path / "model.safetensors").write_bytes(b"")  # damaged after the fact: no longer complete
    assert not is_complete(path) and "model.safetensors" in manifest_problem(path)
    assert latest_checkpoint(tmp_path) is None


def test_half_written_tmp_is_never_resumed_and_is_cleaned(tmp_path):
    """The reported failure: a SIGKILL during a save left step_N.tmp/ with a 0-byte trainer_state.pt,
    which `--resume latest` picked (the step_* glob matched it) and died with EOFError."""
    good = _save(tmp_path, 10)
    half = checkpoint_dir(tmp_path, 15).with_name("step_0000015.tmp")
    half.mkdir()
    (half / "config.json").write_text("{}")
    (half / STATE_FILE).write_bytes(b"")
    assert latest_checkpoint(tmp_path) == good
    notes = clean_stale(tmp_path)
    assert not half.exists() and any("removed step_0000015.tmp" in n for n in notes)
    # a directory named like a checkpoint but without a manifest (killed before it) is not complete either
    fake = checkpoint_dir(tmp_path, 20)
    fake.mkdir()
    (fake / STATE_FILE).write_bytes(b"")
    assert latest_checkpoint(tmp_path) == good


def test_a_save_killed_before_its_rename_is_finished(tmp_path):
    done = _save(tmp_path, 8)
    tmp = done.with_name(done.name + ".tmp")
    done.rename(tmp)  # manifest written, final rename missing
    assert latest_checkpoint(tmp_path) is None
    clean_stale(tmp_path)
    assert latest_checkpoint(tmp_path) == done


def test_resave_of_a_step_replaces_it_and_order_is_by_step(tmp_path):
    _save(tmp_path, 9)
    _save(tmp_path, 10)
    again = _save(tmp_path, 10)
    assert is_complete(again) and not again.with_name(again.name + ".old").exists()
    _save(tmp_path, 10_000_000)  # 8 digits: still ordered by step, not by name
    assert latest_checkpoint(tmp_path).name == "step_10000000"


def test_prune_keeps_the_newest(tmp_path):
    for step in (2, 4, 6, 8):
        _save(tmp_path, step)
    removed = prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in removed] == ["step_0000002", "step_0000004"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000006", "step_0000008"]
    assert prune_checkpoints(tmp_path, keep=0) == []


def test_checkpoint_files_get_the_umask_mode(tmp_path):
    """safetensors writes 0600 files; checkpoints are shared between users like any output."""
    old = os.umask(0o022)
    try:
        path = _save(tmp_path, 1)
    finally:
        os.umask(old)
    for file in path.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file.name
