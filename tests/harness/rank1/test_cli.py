"""End to end: a tiny pipeline with a rank1 stage, then `harness rank1` on the run and on a checkpoint."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil

import pytest

from weightgeom.core.config import Rank1Config
from weightgeom.harness.cli import main
from weightgeom.harness.rank1.experiment import Rank1Result

# ----- end to end: a tiny pipeline run, then `harness rank1` -------------------------------------------------

STAGE = "rank1={layers: [1], roles: [q, o], n_top: 1, n_random: 3, n_matched: 2, n_lower: 2, text_blocks: 4}"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The asymmetry_smoke pipeline with one DPO-like objective (pretrain 30 steps, align 6 steps) and a small
    rank1 stage, whose output is kept in ``stage_rank1/`` beside the run (the command tests rewrite RUN/rank1)."""

    root = tmp_path_factory.mktemp("rank1_smoke")
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        assert main(["run", "asymmetry_smoke", f"output_dir={root}", "name=run", f"tokenizer.cache_dir={root / 'tok'}",
                     "align.objectives=[{name: g1.00, loss: graded, grade: 1.0}]",
                     "stages=[pretrain, align, rank1, report]", STAGE, "--no-progress"]) == 0
    (root / "console.txt").write_text(console.getvalue())
    shutil.copytree(root / "run" / "rank1", root / "stage_rank1")
    shutil.copy(root / "run" / "report" / "report.md", root / "stage_rank1" / "report.md")
    return root / "run"


SMALL = ["--layers", "1", "--roles", "q", "o", "--n-top", "1", "--n-random", "3", "--n-matched", "2", "--n-lower", "2",
         "--text-blocks", "4", "--no-progress"]


def test_flags_given_replace_the_defaults_and_zero_counts_as_given():
    from weightgeom.harness.rank1.cli import add_rank1_parser  # noqa: PLC0415
    from weightgeom.harness.rank1.inputs import config_from_args, run_settings  # noqa: PLC0415

    parser = argparse.ArgumentParser()
    add_rank1_parser(parser.add_subparsers(dest="command"))
    recipe = Rank1Config(roles=["q", "o"], layers=[1], n_lower=2, pred_centered=True, max_pairs=64)
    args = parser.parse_args(["rank1", "RUN", "--seed", "0", "--n-lower", "0", "--tol", "0", "--eps", "0.25",
                              "--max-pairs", "8"])
    assert config_from_args(args, recipe) == Rank1Config(roles=["q", "o"], layers=[1], n_lower=0, tol=0.0, eps=0.25,
                                                         pred_centered=True, max_pairs=8)
    assert run_settings(args, seed=5, beta=0.2) == (0, 0.2)
    assert config_from_args(parser.parse_args(["rank1", "RUN"]), recipe) == recipe
    assert run_settings(parser.parse_args(["rank1", "RUN", "--beta", "0.3"]), seed=5, beta=0.2) == (5, 0.3)
    assert config_from_args(parser.parse_args(["rank1", "RUN", "--pred-centered"]), Rank1Config()).pred_centered


@pytest.mark.slow
def test_rank1_stage_runs_in_the_pipeline_and_the_command_reproduces_it(smoke_run, tmp_path):
    stage = smoke_run.parent / "stage_rank1"
    result = Rank1Result.from_json((stage / "rank1.json").read_text())
    # the recipe's rank1 section, the run's seed and align.beta; G from the training pairs, measured on the held out
    assert (result.config["roles"], result.config["layers"], result.config["n_random"]) == (["q", "o"], [1], 3)
    assert result.config["seed"] == 0 and result.config["beta"] == 0.1
    assert result.config["n_train_pairs"] + result.config["n_eval_pairs"] == 48
    assert result.config["text_blocks"] == [4, 32]
    assert sorted((d["role"], d["source"]) for d in result.tested()) == [("o", "C_delta"), ("o", "pred"), ("q", "C_a")]
    assert "## Causal test: closed-form rank-1 interventions" in (stage / "report.md").read_text()
    assert (smoke_run.parent / "console.txt").read_text().count("[data]") == 1  # the stage reloads the corpus quietly

    # with no flags, the command takes the recipe's rank1 section: the same experiment, number for number
    assert main(["rank1", str(smoke_run), "--out", str(tmp_path / "cmd"), "--no-progress"]) == 0
    again = Rank1Result.from_json((tmp_path / "cmd" / "rank1.json").read_text())
    assert again.directions == result.directions and again.zscores == result.zscores
    # a flag replaces its setting and nothing else
    assert main(["rank1", str(smoke_run), "--out", str(tmp_path / "seed1"), "--seed", "1", "--no-progress"]) == 0
    other = Rank1Result.from_json((tmp_path / "seed1" / "rank1.json").read_text())
    assert (other.config["seed"], other.config["roles"], other.config["n_random"]) == (1, ["q", "o"], 3)
    assert other.zscores != result.zscores


@pytest.mark.slow
def test_rank1_command_on_a_pipeline_run_writes_json_table_plot_and_report_section(smoke_run):

    weights = smoke_run / "pretrain" / "checkpoints" / "step_0000030" / "model.safetensors"
    saved = weights.read_bytes()
    assert main(["rank1", str(smoke_run), *SMALL]) == 0
    out = smoke_run / "rank1"
    result = Rank1Result.from_json((out / "rank1.json").read_text())
    assert result.config["base_dir"].endswith("pretrain/checkpoints/step_0000030")
    assert result.config["n_train_pairs"] + result.config["n_eval_pairs"] == 48
    assert result.config["text_blocks"] == [4, 32]
    assert sorted((d["role"], d["source"]) for d in result.tested()) == [("o", "C_delta"), ("o", "pred"), ("q", "C_a")]
    table = (out / "rank1.md").read_text()
    assert "| 1 | q | C_a#1 |" in table and "## Matching and overlaps" in table
    assert (out / "rank1.png").read_bytes()[:4] == b"\x89PNG"
    report = (smoke_run / "report" / "report.md").read_text()
    assert "## Causal test: closed-form rank-1 interventions" in report and "| 1 | o | pred#1 |" in report

    # the same seed reproduces every number; the checkpoint on disk is untouched
    assert main(["rank1", str(smoke_run), *SMALL, "--out", str(smoke_run / "again")]) == 0
    again = Rank1Result.from_json((smoke_run / "again" / "rank1.json").read_text())
    assert again.directions == result.directions and again.zscores == result.zscores
    assert weights.read_bytes() == saved


@pytest.mark.slow
def test_rank1_command_on_a_checkpoint_needs_pairs_and_out(smoke_run, tmp_path, capsys):

    ckpt = smoke_run / "pretrain" / "checkpoints" / "step_0000030"
    assert main(["rank1", str(ckpt), *SMALL]) == 2
    assert "--pairs FILE" in capsys.readouterr().err
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": "def f(x):\n", "chosen": f"    return x + {i}\n",
                                           "rejected": f"    x + {i} return\n"}) for i in range(12)))
    text = tmp_path / "text.txt"
    text.write_text("import os\n\ndef main():\n    return os.getcwd()\n" * 40)
    assert main(["rank1", str(ckpt), *SMALL]) == 2
    assert main(["rank1", str(ckpt), "--pairs", str(pairs), "--text", str(text), "--seq-len", "16",
                 "--out", str(tmp_path / "out"), *SMALL]) == 0
    result = Rank1Result.from_json((tmp_path / "out" / "rank1.json").read_text())
    assert (result.config["n_train_pairs"], result.config["n_eval_pairs"]) == (10, 2)  # --eval-fraction 0.2
    assert result.config["text_blocks"] == [4, 16] and "held out only if" in result.config["text_source"]
    capsys.readouterr()
    assert main(["rank1", str(ckpt), "--pairs", str(pairs), "--out", str(tmp_path / "o2"), "--layers", "5",
                 "--text", str(text), "--seq-len", "16", "--no-progress"]) == 2
    assert "layers [5] do not exist: the model has layers 0..1" in capsys.readouterr().err
