"""Runs killed mid-flight resume to exactly the run that was never interrupted (subprocesses).

* SIGKILL while a checkpoint is being written (the trainer state half on disk): `--resume latest`
  ignores the partial `.tmp` directory, removes it, continues from the previous checkpoint and ends
  with the same weights, statistics and metric rows.
* SIGTERM: the step in flight finishes, a checkpoint is saved at that step, the exit code is 143
  with a message saying what to run; `--resume latest` continues exactly from that step.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO
from weightgeom.core.checkpoint import checkpoint_dir, is_complete
from weightgeom.core.sinks import read_metrics, read_tensorboard_scalars

pytestmark = pytest.mark.slow
STEPS = 12
TIMING = ("train/tokens_per_s",)  # wall-clock numbers differ between any two runs

# A run whose torch.save of the trainer state at step $KILL_AT_SAVE writes 0 bytes, then SIGKILLs itself.
KILL_DURING_SAVE = """
import os, signal, sys, torch
real_save = torch.save
def save(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("step") == int(os.environ["KILL_AT_SAVE"]):
        open(f, "wb").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
from weightgeom.harness.cli import main
sys.exit(main(sys.argv[1:]))
"""
# A run that receives a real SIGTERM while it logs step $TERM_AT_STEP (deterministic, unlike a timer).
TERM_AT_STEP = """
import os, signal, sys
import weightgeom.core.rundir
real_log = weightgeom.core.rundir.RunDirectory.log
def log(self, row, step):
    if step == int(os.environ["TERM_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGTERM)
    return real_log(self, row, step)
weightgeom.core.rundir.RunDirectory.log = log
from weightgeom.harness.cli import main
sys.exit(main(sys.argv[1:]))
"""


def small_corpus(directory: Path) -> Path:
    """~100 KB of local text (a few stdlib modules): tokenizing the whole stdlib would dominate."""
    import sysconfig  # noqa: PLC0415

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    path = directory / "corpus"  # two documents: the held-out split is by document
    path.mkdir(exist_ok=True)
    for name in ("textwrap.py", "bisect.py", "colorsys.py", "shlex.py"):
        (path / f"{name}.txt").write_text((stdlib / name).read_text())
    return path


def cli_args(out: Path, cache: Path, name: str) -> list[str]:
    return ["run", "ce_tiny", f"output_dir={out}", f"name={name}", f"tokenizer.cache_dir={cache}",
            f"data.source={small_corpus(out)}",
            "tokenizer.vocab_size=512", "model.hidden_size=32", "data.seq_len=32", "data.max_tokens=20000",
            f"train.steps={STEPS}", "train.batch_size=4", "train.save_every=4", "train.log_every=1",
            "train.eval_every=6", "instruments.every_n=3", "instruments.zscores=false", "instruments.log_spaced=false",
            "stages=[pretrain]", "--threads", "1", "--no-progress"]


def run(code: str | None, args: list[str], **env) -> subprocess.CompletedProcess:
    prefix = [sys.executable, "-c", code] if code else [sys.executable, "-m", "weightgeom"]
    import os  # noqa: PLC0415

    return subprocess.run([*prefix, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **{k: str(v) for k, v in env.items()}})


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tokenizer_cache):
    out = tmp_path_factory.mktemp("runs")
    done = run(None, cli_args(out, tokenizer_cache, "reference"))
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "reference"


def assert_same_run(a: Path, b: Path) -> None:
    final = checkpoint_dir(a, STEPS).name
    for name in ("model.safetensors", "instruments.safetensors"):
        ta, tb = load_file(str(a / "checkpoints" / final / name)), load_file(str(b / "checkpoints" / final / name))
        assert ta.keys() == tb.keys(), name
        for key in ta:
            assert torch.equal(ta[key], tb[key]), f"{name}: {key}"
    snap = f"instruments/{final}.safetensors"
    assert (a / snap).read_bytes() == (b / snap).read_bytes()
    rows_a, rows_b = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a]  # each step once, in order
    for ra, rb in zip(rows_a, rows_b):
        for key, value in ra.items():
            if key not in TIMING and not (isinstance(value, float) and math.isnan(value)):
                assert rb[key] == value, (ra["step"], key)
    tb = read_tensorboard_scalars(b / "tb")
    assert [s for s, _ in tb["train/loss"]] == list(range(1, STEPS + 1))  # no step twice after the resume


def test_sigkill_during_a_checkpoint_save_resumes_to_the_same_run(tmp_path, tokenizer_cache, reference):
    args = cli_args(tmp_path, tokenizer_cache, "killed")
    killed = run(KILL_DURING_SAVE, args, KILL_AT_SAVE=8)
    assert killed.returncode == -9, killed.stderr[-3000:]
    ckpts = tmp_path / "killed" / "checkpoints"
    half = ckpts / "step_0000008.tmp"
    assert (half / "trainer_state.pt").stat().st_size == 0 and (half / "model.safetensors").is_file()
    assert not (ckpts / "step_0000008").exists()

    resumed = run(None, [*args, "--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "removed step_0000008.tmp" in resumed.stderr
    # --no-progress: no bars from transformers either (it loads the checkpoint and writes new ones)
    assert "Loading weights" not in resumed.stderr and "Writing model shards" not in resumed.stderr
    assert not half.exists() and is_complete(ckpts / "step_0000008")
    assert_same_run(reference, tmp_path / "killed")


def test_sigterm_saves_a_checkpoint_and_resumes_exactly(tmp_path, tokenizer_cache, reference):
    args = cli_args(tmp_path, tokenizer_cache, "termed")
    termed = run(TERM_AT_STEP, args, TERM_AT_STEP=5)
    assert termed.returncode == 143, termed.stderr[-3000:]
    assert "stopped by SIGTERM after step 5" in termed.stderr and "checkpoint saved" in termed.stderr
    assert "--resume latest" in termed.stderr
    assert "Traceback" not in termed.stderr
    saved = checkpoint_dir(tmp_path / "termed", 5)
    assert is_complete(saved)  # not a periodic step (save_every=4): written because of the signal
    assert max(r["step"] for r in read_metrics(tmp_path / "termed" / "metrics.jsonl")) == 5

    resumed = run(None, [*args, "--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(reference, tmp_path / "termed")

    # resuming a finished run trains nothing and writes nothing
    before = sorted((p.as_posix(), p.stat().st_mtime_ns) for p in (tmp_path / "termed").rglob("*"))
    again = run(None, [*args, "--resume", "latest"])
    assert again.returncode == 0 and "already finished" in again.stderr
    assert sorted((p.as_posix(), p.stat().st_mtime_ns) for p in (tmp_path / "termed").rglob("*")) == before


# SIGTERM while the corpus is read, before any training phase has started.
TERM_WHILE_LOADING = """
import os, signal, sys
import weightgeom.trainers.ce
real_load = weightgeom.trainers.ce.load_corpus
def load(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return real_load(*args, **kwargs)
weightgeom.trainers.ce.load_corpus = load
from weightgeom.harness.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_outside_a_training_phase_exits_with_a_message(tmp_path, tokenizer_cache):
    done = run(TERM_WHILE_LOADING, cli_args(tmp_path, tokenizer_cache, "early"))
    assert done.returncode == 143, done.stderr[-3000:]
    assert "stopped by SIGTERM outside a training phase" in done.stderr and "Traceback" not in done.stderr
    assert "run the command again" in done.stderr
