"""The conveniences: --version, recipes, keys, thread defaults, resume safety, disk use."""

from __future__ import annotations

import os
import stat
import sysconfig
from pathlib import Path

import pytest
import yaml

from weightgeom import recipes
from weightgeom.core.config import load_config, save_config
from weightgeom.harness.cli import default_threads, main
from weightgeom.trainers.ce import pretrain


def test_version_recipes_and_keys(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("harness 0.")
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == sorted(recipes.bundled())
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines)  # each with its description
    assert main(["keys"]) == 0
    keys = capsys.readouterr().out
    for key in ("train.lr  (float, default 0.003)", "train.keep_checkpoints", "train.on_nonfinite",
                "instruments.k  (int, default 8)", "align.train.steps", "align.objectives[].lam", "tracking.report_to"):
        assert key in keys, key
    assert "a NaN/inf loss or gradient stops the run" in keys  # the field's comment
    assert main(["keys", "train.save"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("train.save_every")


def test_thread_default_divides_the_cores_and_yields_to_omp_num_threads():
    assert default_threads({}, cores=2) == (2, "2 cores / 1 local process(es)")
    assert default_threads({"LOCAL_WORLD_SIZE": "2"}, cores=2)[0] == 1  # torchrun, 2 processes on 2 cores
    assert default_threads({"LOCAL_WORLD_SIZE": "4"}, cores=2)[0] == 1  # never 0
    assert default_threads({}, cores=64)[0] == 8  # capped
    assert default_threads({"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "2"}, cores=64) == (3, "OMP_NUM_THREADS")


def test_resume_with_a_changed_recipe_is_refused(tmp_path, capsys):
    """Resuming with a larger train.steps restarted the LR schedule and rewrote config.yaml."""
    args = [f"output_dir={tmp_path}", "name=r", "train.steps=12", "model.hidden_size=32", "tokenizer.vocab_size=512"]
    run = tmp_path / "r"
    run.mkdir()
    save_config(load_config(recipes.bundled()["ce_tiny"], args), run / "config.yaml")
    saved = (run / "config.yaml").read_text()
    changed = [*args[:2], "train.steps=20", *args[3:], "train.lr=1e-3"]
    assert main(["run", "ce_tiny", *changed, "--resume", "latest", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "train.steps: 12 -> 20" in err and "train.lr: 0.003 -> 0.001" in err and "init_from=" in err
    assert (run / "config.yaml").read_text() == saved


@pytest.mark.slow
def test_disk_keep_last_checkpoints_one_snapshot_copy_and_readable_files(tmp_path, tokenizer_cache):
    corpus = tmp_path / "corpus"  # two documents: the held-out split is by document
    corpus.mkdir()
    for name in ("textwrap.py", "bisect.py", "colorsys.py", "shlex.py"):
        (corpus / f"{name}.txt").write_text((Path(sysconfig.get_paths()["stdlib"]) / name).read_text())
    cfg = load_config(recipes.bundled()["ce_tiny"], [
        f"output_dir={tmp_path}", f"tokenizer.cache_dir={tokenizer_cache}", "tokenizer.vocab_size=512",
        f"data.source={corpus}", "model.hidden_size=32", "data.seq_len=32", "train.batch_size=4", "train.steps=6",
        "train.save_every=2", "train.keep_checkpoints=2", "train.eval_every=0", "instruments.zscores=false"])
    old = os.umask(0o022)
    try:
        result = pretrain(cfg, progress=False)
    finally:
        os.umask(old)
    run = result.run_dir
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000004", "step_0000006"]
    snapshot = run / "instruments" / "step_0000006.safetensors"
    inside = result.checkpoint / "instruments.safetensors"
    assert snapshot.stat().st_ino == inside.stat().st_ino  # one copy on disk, two names
    for file in [snapshot, *result.checkpoint.iterdir()]:
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file.name
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["keep_checkpoints"] == 2
