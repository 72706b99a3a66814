"""What a run writes, deletes and loads is confined to its own run directory and to data: the cases of a
bad-input fuzz (issue 19) that once deleted a parent folder, ran code from a checkpoint, trained a
random model in silence, promoted a half-written checkpoint, or failed with a bare traceback. Each
exits with a defined code and one line naming the key or path and the fix.

``CE`` is the fuzz's command: ``ce_tiny`` at toy size (hidden 32, 2 layers, vocab 512, seq 32).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from weightgeom.core.checkpoint import MANIFEST_FILE, STATE_FILE, checkpoint_dir, is_complete
from weightgeom.core.models import build_tiny_model
from weightgeom.core.rundir import RUN_MARKER
from weightgeom.core.sinks import read_metrics
from weightgeom.core.tokenizer import train_stdlib_tokenizer
from weightgeom.harness.cli import main

CE = ["ce_tiny", "--threads", "1", "--no-progress", "model.hidden_size=32", "model.num_layers=2",
      "tokenizer.vocab_size=512", "data.seq_len=32", "data.max_tokens=60000", "train.batch_size=4",
      "instruments.every_n=2", "instruments.log_spaced=false", "stages=[pretrain]"]


def ce(cache: Path, *extra: str) -> list[str]:
    return ["run", *CE, f"tokenizer.cache_dir={cache}", *extra]


def err_of(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    return err


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tokenizer_cache):
    """A finished 4-step run with checkpoints at steps 2 and 4 (kept pristine: tests copy it)."""
    out = tmp_path_factory.mktemp("finished")
    assert main(ce(tokenizer_cache, f"output_dir={out}", "name=run", "train.steps=4", "train.save_every=2",
                   "train.log_every=1")) == 0
    return out / "run"


def copy_run(finished: Path, out: Path) -> Path:
    shutil.copytree(finished, out / "run", symlinks=True)
    return out / "run"


# ----- 1. a run directory is always strictly inside output_dir, and --overwrite deletes only runs ----------

@pytest.mark.parametrize("name", ["..", ".", "../escape", "ABSOLUTE", "a/b", ""])
def test_a_name_that_leaves_output_dir_is_refused_and_nothing_is_deleted(tmp_path, tokenizer_cache, capsys, name):
    escape = tmp_path / "absolute_escape"
    name = str(escape) if name == "ABSOLUTE" else name
    parent = tmp_path / "parent"
    (parent / "sibling_project").mkdir(parents=True)
    (parent / "notes.txt").write_text("keep me")
    (parent / "sibling_project" / "code.py").write_text("x = 1")
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    code = main(ce(tokenizer_cache, f"output_dir={parent / 'out'}", f"name={name}", "train.steps=2", "--overwrite"))
    err = err_of(capsys)
    assert code == 2 and "key 'name'" in err, err
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == before
    assert not escape.exists()


def test_overwrite_replaces_a_run_but_never_a_directory_a_run_did_not_make(tmp_path, tokenizer_cache, capsys):
    foreign = tmp_path / "out" / "mine"
    foreign.mkdir(parents=True)
    (foreign / "thesis.tex").write_text("years of work")
    code = main(ce(tokenizer_cache, f"output_dir={tmp_path / 'out'}", "name=mine", "train.steps=2", "--overwrite"))
    err = err_of(capsys)
    assert code == 2 and "is not a weightgeom run directory" in err and "pass --overwrite" not in err
    assert (foreign / "thesis.tex").read_text() == "years of work"
    # a run directory (it holds the marker) is replaced with --overwrite
    assert main(ce(tokenizer_cache, f"output_dir={tmp_path / 'out'}", "name=run", "train.steps=2")) == 0
    assert (tmp_path / "out" / "run" / RUN_MARKER).is_file()
    (tmp_path / "out" / "run" / "stale.txt").write_text("from the first run")
    assert main(ce(tokenizer_cache, f"output_dir={tmp_path / 'out'}", "name=run", "train.steps=2",
                   "--overwrite")) == 0
    assert not (tmp_path / "out" / "run" / "stale.txt").exists()


# ----- 2. resuming never runs code from a checkpoint ------------------------------------------------------

class Payload:
    """Unpickling this creates a file (what a malicious checkpoint could do instead)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def plant_payload(checkpoint: Path, target: Path) -> None:
    state = torch.load(checkpoint / STATE_FILE, weights_only=False)  # our own test checkpoint: trusted
    state["extra"] = Payload(str(target))
    torch.save(state, checkpoint / STATE_FILE)  # torch.load(weights_only=False) would run the payload
    manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())
    manifest["files"][STATE_FILE] = (checkpoint / STATE_FILE).stat().st_size  # as a forger would
    (checkpoint / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize("how", ["path", "latest"])
def test_a_checkpoint_with_a_pickle_payload_is_refused_and_the_payload_never_runs(finished, tmp_path,
                                                                                   tokenizer_cache, capsys, how):
    run = copy_run(finished, tmp_path)
    shutil.rmtree(checkpoint_dir(run, 4))  # resume from step 2, which carries the payload
    target = tmp_path / "pwned"
    plant_payload(checkpoint_dir(run, 2), target)
    resume = str(checkpoint_dir(run, 2)) if how == "path" else "latest"
    code = main(ce(tokenizer_cache, f"output_dir={tmp_path}", "name=run", "train.steps=4", "train.save_every=2",
                   "train.log_every=1", "--resume", resume))
    err = err_of(capsys)
    assert code == 2 and "could run code; refused" in err, err
    assert not target.exists()


# ----- 3. weights that do not match config.json -------------------------------------------------------------

@pytest.fixture(scope="module")
def mismatched(tmp_path_factory, tokenizer_cache):
    """A Llama config.json beside GPT-2 weights, and a 64-wide config beside 32-wide weights."""
    d = tmp_path_factory.mktemp("mismatched")
    tok = train_stdlib_tokenizer(512, tokenizer_cache)
    llama = build_tiny_model("llama", vocab_size=len(tok), hidden_size=32)
    llama.save_pretrained(d / "llama")
    build_tiny_model("gpt2", vocab_size=len(tok), hidden_size=32).save_pretrained(d / "other_weights")
    shutil.copy(d / "llama" / "config.json", d / "other_weights" / "config.json")
    build_tiny_model("llama", vocab_size=len(tok), hidden_size=64).save_pretrained(d / "wide")
    build_tiny_model("llama", vocab_size=len(tok), hidden_size=32).save_pretrained(d / "wrong_shape")
    shutil.copy(d / "wide" / "config.json", d / "wrong_shape" / "config.json")
    for name in ("other_weights", "wrong_shape", "llama"):
        tok.save_pretrained(d / name)
    pairs = [{"prompt": "def f(x):\n", "chosen": "    return x\n", "rejected": "    x return\n"}] * 20
    (d / "prefs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return d


@pytest.mark.parametrize(("model", "expected"), [("other_weights", "lack 20 of the 21 parameters"),
                                                 ("wrong_shape", "have other shapes than its config.json")])
def test_weights_that_do_not_match_their_config_are_refused_before_the_run_directory(
        mismatched, tmp_path, tokenizer_cache, capsys, model, expected):
    code = main(["run", "dpo_local_model", f"init_from={mismatched / model}",
                 f"align.data={mismatched / 'prefs.jsonl'}", f"output_dir={tmp_path}", "name=aligned",
                 f"tokenizer.cache_dir={tokenizer_cache}", "--no-progress"])
    err = err_of(capsys)
    assert code == 2 and f"init_from: the weights in {mismatched / model}" in err and expected in err, err
    assert not (tmp_path / "aligned").exists()


def test_compare_refuses_weights_that_do_not_match_their_config(mismatched, tmp_path, capsys):
    code = main(["compare", str(mismatched / "llama"), str(mismatched / "other_weights"), "--out", str(tmp_path / "c")])
    err = err_of(capsys)
    assert code == 2 and "lack 20 of the 21 parameters" in err, err


# ----- 4, 7. a half-written checkpoint is never promoted; a cut metrics line does not block a resume --------

def test_a_tmp_without_manifest_is_removed_not_promoted_and_the_older_checkpoint_resumes(finished, tmp_path,
                                                                                          tokenizer_cache, capsys):
    run = copy_run(finished, tmp_path)
    final = checkpoint_dir(run, 4)
    half = final.with_name(final.name + ".tmp")
    final.rename(half)  # SIGKILL inside torch.save: the state file cut, the manifest never written
    (half / MANIFEST_FILE).unlink()
    state = half / STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    rows = (run / "metrics.jsonl").read_text().splitlines()
    kept = [r for r in rows if json.loads(r)["step"] <= 3]
    (run / "metrics.jsonl").write_text("\n".join(kept) + "\n" + rows[-1][: len(rows[-1]) // 2])  # cut last line
    code = main(ce(tokenizer_cache, f"output_dir={tmp_path}", "name=run", "train.steps=4", "train.save_every=2",
                   "train.log_every=1", "--resume", "latest"))
    err = err_of(capsys)
    assert code == 0, err[-3000:]
    assert "removed step_0000004.tmp" in err and "cut mid-write" in err
    assert not half.exists() and is_complete(final)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]


# ----- 5. disk full during a save ---------------------------------------------------------------------------

def test_a_full_disk_during_a_save_is_one_line_with_exit_4_and_leaves_no_tmp(tmp_path, tokenizer_cache, capsys,
                                                                            monkeypatch):
    real_save = torch.save

    def full(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 2:
            Path(f).write_bytes(b"\0" * 10)
            raise RuntimeError("[enforce fail at inline_container.cc:659] . unexpected pos 1024 vs 966")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    code = main(ce(tokenizer_cache, f"output_dir={tmp_path}", "name=run", "train.steps=4", "train.save_every=2"))
    err = err_of(capsys)
    assert code == 4, err[-3000:]
    line = next(line for line in err.splitlines() if line.startswith("harness: error:"))
    assert "checkpoints/step_0000002" in line and "could not write the checkpoint of step 2" in line
    assert "free space" in line and "--resume latest" in line
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp"))


# ----- 6, 12. output locations are checked before any work ---------------------------------------------------

@pytest.mark.parametrize("key", ["output_dir", "tokenizer.cache_dir"])
@pytest.mark.parametrize("where", ["is_a_file", "under_a_file"])
def test_an_output_location_that_cannot_be_a_directory_is_refused_first(tmp_path, tokenizer_cache, capsys, key,
                                                                        where):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    path = blocker if where == "is_a_file" else blocker / "sub"
    settings = {"output_dir": str(tmp_path / "runs"), "tokenizer.cache_dir": str(tokenizer_cache), key: str(path)}
    code = main(["run", *CE, *(f"{k}={v}" for k, v in settings.items()), "name=run"])
    err = err_of(capsys)
    assert code == 2 and err.startswith(f"harness: error: {key}: {path}"), err
    assert "[Errno" not in err


def test_compare_rank1_and_prepare_data_check_out_before_working(finished, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    ckpt = str(checkpoint_dir(finished, 4))
    for argv in (["compare", ckpt, ckpt, "--out", str(blocker)],
                 ["rank1", str(finished), "--out", str(blocker), "--no-progress"],
                 ["prepare-data", "stdlib", "--out", str(blocker / "corpus"), "--no-progress"]):
        code = main(argv)
        err = err_of(capsys)
        assert code == 2 and "--out" in err and str(blocker) in err and "[Errno" not in err, (argv, err)


# ----- 8. too few pairs for a batch: refused before the run directory ----------------------------------------

def test_fewer_pairs_than_a_batch_are_refused_before_the_run_directory(mismatched, tmp_path, tokenizer_cache, capsys):
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"prompt": f"q{i}:", "chosen": " yes", "rejected": " no"}) + "\n"
                           for i in range(4)))
    code = main(["run", "dpo_local_model", f"init_from={mismatched / 'llama'}", f"align.data={few}",
                 f"output_dir={tmp_path}", "name=aligned", f"tokenizer.cache_dir={tokenizer_cache}",
                 "align.train.batch_size=8", "--no-progress"])
    err = err_of(capsys)
    assert code == 2 and "cannot fill one batch of align.train.batch_size=8" in err and "TRL dropped" not in err
    assert not (tmp_path / "aligned").exists()


# ----- 9, 13. --resume: this run's checkpoint, its recipe, and messages that name --resume -------------------

def test_resume_checks_the_recipe_also_for_a_path_and_without_config(finished, tmp_path, tokenizer_cache, capsys):
    run = copy_run(finished, tmp_path)
    base = ce(tokenizer_cache, f"output_dir={tmp_path}", "name=run", "train.steps=4", "train.save_every=2",
              "train.log_every=1")
    wider = [a.replace("model.hidden_size=32", "model.hidden_size=64") for a in base]
    code = main([*wider, "--resume", str(checkpoint_dir(run, 2))])
    err = err_of(capsys)
    assert code == 2 and "--resume: the recipe differs" in err and "model.hidden_size: 32 -> 64" in err, err
    (run / "config.yaml").unlink()
    code = main([*base, "--resume", "latest"])
    err = err_of(capsys)
    assert code == 2 and "has no config.yaml" in err, err


def test_resume_errors_name_resume_and_say_what_to_pass(finished, tmp_path, tokenizer_cache, capsys):
    base = ce(tokenizer_cache, f"output_dir={finished.parent}", "name=run", "train.steps=4", "train.save_every=2",
              "train.log_every=1")
    code = main([*base, "--resume", str(tmp_path / "nonexistent")])
    err = err_of(capsys)
    assert code == 2 and "--resume" in err and "save_pretrained" not in err and "step_N" in err, err
    code = main([*base, "--resume", str(finished)])
    err = err_of(capsys)
    assert code == 2 and "that is a run directory" in err and "checkpoints/step_N" in err, err


# ----- 11. the first logged loss after a resume is the uninterrupted run's -----------------------------------

def test_the_loss_window_survives_a_resume(tmp_path, tokenizer_cache):
    # a checkpoint at step 2 inside the logging window of steps 1-3 (no geometry row flushes it early)
    args = ["train.steps=6", "train.save_every=2", "train.log_every=3", "train.eval_every=0", "instruments.every_n=100"]
    assert main(ce(tokenizer_cache, f"output_dir={tmp_path}", "name=whole", *args)) == 0
    assert main(ce(tokenizer_cache, f"output_dir={tmp_path}", "name=cut", *args)) == 0
    cut = tmp_path / "cut"
    for step in (4, 6):  # as if the run had stopped after its step-2 checkpoint
        shutil.rmtree(checkpoint_dir(cut, step))
    rows = [r for r in (cut / "metrics.jsonl").read_text().splitlines() if json.loads(r)["step"] <= 2]
    (cut / "metrics.jsonl").write_text("".join(r + "\n" for r in rows))
    assert main(ce(tokenizer_cache, f"output_dir={tmp_path}", "name=cut", *args, "--resume", "latest")) == 0
    whole = {r["step"]: r for r in read_metrics(tmp_path / "whole" / "metrics.jsonl") if "train/loss" in r}
    resumed = {r["step"]: r for r in read_metrics(cut / "metrics.jsonl") if "train/loss" in r}
    assert sorted(resumed) == sorted(whole) == [3, 6]
    for step in (3, 6):  # step 3's window holds steps 1 and 2, from before the resume
        assert resumed[step]["train/loss"] == pytest.approx(whole[step]["train/loss"], rel=1e-12), step


# ----- also seen: the continue command, --threads everywhere ------------------------------------------------

def test_the_continue_command_keeps_threads_and_no_progress():
    from weightgeom.harness.cli import _parse_args, resume_command  # noqa: PLC0415

    args = _parse_args(["run", "ce_tiny", "train.steps=9", "--threads", "1", "--no-progress", "--overwrite"])
    assert resume_command(args) == ["harness", "run", "ce_tiny", "train.steps=9", "--threads", "1", "--no-progress",
                                    "--resume", "latest"]
    for argv in (["compare", "A", "B", "--threads", "1"], ["rank1", "RUN", "--threads", "1"],
                 ["prepare-data", "stdlib", "--out", "x", "--threads", "1"]):
        assert _parse_args(argv).threads == 1
