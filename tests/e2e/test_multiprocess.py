"""Two CPU processes (torchrun, gloo) train a whole pipeline (CE pretraining, our preference loop and
TRL's DPOTrainer) to the same statistics, counts and final weights as one process on the same global
batches, and only one process writes the run directory. The same holds with the model sharded
(FSDP2, ``train.fsdp``), whose checkpoints hold whole tensors: a sharded run resumes in one process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from weightgeom.core.sinks import read_metrics

pytestmark = pytest.mark.slow

STAGES = ("pretrain", "align/g1.00", "align/dpo")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiprocess")
    args = [f"output_dir={tmp}", f"tokenizer.cache_dir={tmp / 'tok'}", "stages=[pretrain,align]", "train.steps=8",
            "train.log_every=4", "instruments.every_n=4", "align.train.steps=4", "align.train.batch_size=4",
            "align.train.log_every=2", "align.objectives=[{name: g1.00, loss: graded, grade: 1.0},"
            " {name: dpo, loss: trl}]", "--no-progress"]
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    commands = {"one": [sys.executable, "-m", "weightgeom"],
                "two": [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "weightgeom"]}
    for name, command in commands.items():
        done = subprocess.run([*command, "run", "asymmetry_smoke", f"name={name}", *args], capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
    # FSDP2 on 2 processes (our loops; TRL shards only through accelerate's FSDP config, on GPUs),
    # a checkpoint every 4 steps: the run that test_fsdp_resumes_in_one_process continues
    fsdp = [*args[:-2], "align.objectives=[{name: g1.00, loss: graded, grade: 1.0}]", "train.fsdp=true",
            "align.train.fsdp=true", "train.save_every=4", "--no-progress"]
    done = subprocess.run([*commands["two"], "run", "asymmetry_smoke", "name=fsdp", *fsdp], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "one", tmp / "two", tmp / "fsdp", fsdp


def final(run: Path, stage: str, file: str) -> dict[str, torch.Tensor]:
    (checkpoint,) = sorted((run / stage / "checkpoints").iterdir())[-1:]
    return load_file(str(checkpoint / file))


@pytest.mark.parametrize("stage", STAGES)
def test_two_processes_give_one_process_weights_and_statistics(runs, stage):
    one, two, _, _ = runs
    compare_runs(one, two, stage)


@pytest.mark.parametrize("stage", STAGES[:2])
def test_fsdp_gives_one_process_weights_and_statistics(runs, stage):
    one, two, fsdp, _ = runs
    assert json.loads((fsdp / stage / "run_info.json").read_text())["sharding"] == "fsdp"
    assert json.loads((two / stage / "run_info.json").read_text())["sharding"] == "ddp"
    compare_runs(one, fsdp, stage)


def compare_runs(one: Path, two: Path, stage: str) -> None:
    w1, w2 = final(one, stage, "model.safetensors"), final(two, stage, "model.safetensors")
    assert w1.keys() == w2.keys()
    for key in w1:
        # DDP averages the same gradients in another order (float32, ~1e-7 relative). Adam divides each
        # coordinate by its own gradient scale, so where a gradient sits at round-off level that noise
        # becomes an O(lr) step: a handful of coordinates move by up to ~lr x steps (measured: 1 of 16,384
        # lm_head entries by 2.4e-5), all others agree to float precision.
        diff = (w2[key] - w1[key]).abs()
        assert diff.max() < 5e-4 and diff.mean() < 1e-6, (stage, key, float(diff.max()), float(diff.mean()))
    s1, s2 = final(one, stage, "instruments.safetensors"), final(two, stage, "instruments.safetensors")
    counts = [k for k in s1 if k.endswith("/count")]
    assert counts and all(float(s1[k]) > 0 for k in counts)
    for key in counts:
        assert torch.equal(s2[key], s1[key]), f"{stage} {key}: every token counted once over both processes"
    for key in (k for k in s1 if k.endswith("/sum_outer")):
        scale = float(s1[key].abs().max())
        torch.testing.assert_close(s2[key], s1[key], rtol=1e-4, atol=max(1e-4, 1e-5 * scale), msg=f"{stage} {key}")


@pytest.mark.parametrize("stage", STAGES)
def test_only_the_main_process_writes(runs, stage):
    one, two, _, _ = runs
    rows_one, rows_two = read_metrics(one / stage / "metrics.jsonl"), read_metrics(two / stage / "metrics.jsonl")
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one]  # no row written twice
    assert len(list((two / stage / "tb").glob("events.out.tfevents.*"))) == 1
    last_one, last_two = (next(r for r in reversed(rows) if "rsf_in/all/q" in r) for rows in (rows_one, rows_two))
    for key in (k for k in last_one if k.startswith("rsf_")):  # global metrics, from all-reduced statistics
        assert last_two[key] == pytest.approx(last_one[key], rel=1e-3, abs=1e-4), key


def test_fsdp_resumes_in_one_process(runs, tmp_path):
    """A sharded run's checkpoint holds whole weights and optimizer state: one process continues it
    from step 4 to the same final weights as the two sharded processes reached."""
    _, _, fsdp, args = runs
    resumed = tmp_path / "fsdp"
    shutil.copytree(fsdp, resumed)
    shutil.rmtree(resumed / "pretrain" / "checkpoints" / "step_0000008")
    shutil.rmtree(resumed / "align")
    args = [a.replace(f"output_dir={fsdp.parent}", f"output_dir={tmp_path}") for a in args]
    done = subprocess.run([sys.executable, "-m", "weightgeom", "run", "asymmetry_smoke", "name=fsdp", *args,
                           "--resume", "latest"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    compare_runs(fsdp, resumed, "pretrain")
