"""Every bundled recipe validates; the smoke pipeline, a local-model recipe and a tiny sweep run
end to end through the CLI and produce their reports from saved files, reproducibly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from weightgeom import recipes
from weightgeom.core.config import load_config
from weightgeom.core.sinks import read_metrics
from weightgeom.harness.cli import main
from weightgeom.harness.pipeline import sweep_configs

RECIPES = list(recipes.bundled().values())


def test_recipes_are_bundled():
    assert {p.stem for p in RECIPES} >= {"asymmetry", "asymmetry_smoke", "asymmetry_scale", "ce_tiny",
                                         "dpo_lora", "dpo_local_model"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    for _, sub in sweep_configs(cfg):  # sweep entries are validated like recipes
        assert sub.model.hidden_size % sub.model.num_heads == 0
    assert main(["validate", str(path)]) == 0


def _smoke(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return ["run", "asymmetry_smoke", f"output_dir={tmp_path}", f"name={name}",
            f"tokenizer.cache_dir={tmp_path / 'tok'}", "align.train.save_every=3", "--no-progress", *extra]


@pytest.mark.slow
def test_smoke_pipeline_runs_end_to_end_and_reproduces(tmp_path):
    assert main(_smoke(tmp_path, "a")) == 0
    run = tmp_path / "a"
    objectives = [o.name for o in load_config(recipes.bundled()["asymmetry_smoke"]).align.objectives]
    assert sorted(p.name for p in (run / "align").iterdir()) == sorted(objectives)
    for name in objectives:
        rows = read_metrics(run / "align" / name / "metrics.jsonl")
        assert any("pref/accuracy" in r for r in rows), name
        assert any("rsf_in/all/q" in r for r in rows), name
        assert (run / "align" / name / "checkpoints" / "step_0000006" / "model.safetensors").is_file()
    report = (run / "report" / "report.md").read_text()
    for needle in ("## Run summary", "## Health:", "## Verdicts", "Read pathway", "specific to the read pathway",
                   "Write pathway", "Grade dependence", "| dpo | q |", "| g0.50 | down |", "Spikiness",
                   "| top-4 share |", "rsf_in_pretrain.png", "training.png", "| pretrain (CE) | 30 | 7,680 tokens"):
        assert needle in report, needle
    assert report.index("## Run summary") < report.index("## Health:") < report.index("## Verdicts")
    verdicts = json.loads((run / "report" / "verdicts.json").read_text())
    assert [v["id"] for v in verdicts] == ["read_concentrates", "read_specific", "write_isotropic", "ce_prediction",
                                           "grade_dependence", "ce_mechanism", "write_mechanism"]
    assert all(v["held"] in (True, False, None) and v["rule"].startswith("held if") for v in verdicts)
    health = json.loads((run / "report" / "health.json").read_text())
    assert set(health) == {"rules", "warnings", "notes"}

    # same seed, same numbers; and `harness report` re-renders the same report from saved files
    assert main(_smoke(tmp_path, "b")) == 0
    assert (tmp_path / "b" / "report" / "verdicts.json").read_text() == json.dumps(verdicts, indent=2)
    table = report.split("## The asymmetry table")[1]
    assert (tmp_path / "b" / "report" / "report.md").read_text().split("## The asymmetry table")[1] == table
    assert main(["report", str(run)]) == 0
    assert (run / "report" / "report.md").read_text() == report
    assert (run / "report" / "verdicts.json").read_text() == json.dumps(verdicts, indent=2)

    # an interrupted pipeline resumes: finished stages are kept, g1.00 continues from its step-3 checkpoint
    shutil.rmtree(run / "align" / "g1.00" / "checkpoints" / "step_0000006")
    before = {name: (run / "align" / name / "metrics.jsonl").stat().st_mtime_ns for name in objectives}
    assert main(_smoke(tmp_path, "a", "--resume", "latest")) == 0
    after = {name: (run / "align" / name / "metrics.jsonl").stat().st_mtime_ns for name in objectives}
    assert [n for n in objectives if after[n] != before[n]] == ["g1.00"]
    assert (run / "report" / "verdicts.json").read_text() == json.dumps(verdicts, indent=2)


@pytest.mark.slow
def test_local_model_recipe_runs_on_a_checkpoint_and_a_preference_file(tmp_path):
    assert main(_smoke(tmp_path, "base", "align.objectives=[]", "stages=[pretrain]")) == 0
    ckpt = tmp_path / "base" / "checkpoints" / "step_0000030"
    prefs = tmp_path / "prefs.jsonl"
    rows = [{"prompt": f"def f{i}(x):\n", "chosen": "    return x + 1\n", "rejected": "    x return 1 +\n"}
            for i in range(40)] + [{"prompt": "a", "chosen": "same", "rejected": "same"}]
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["run", "dpo_local_model", f"init_from={ckpt}", f"align.data={prefs}", f"output_dir={tmp_path}",
                 "name=local", "align.train.steps=4", "align.train.batch_size=4", "align.max_len=32",
                 "align.train.eval_every=2", "instruments.every_n=2", "--no-progress"]) == 0
    run = tmp_path / "local"
    assert sorted(p.name for p in (run / "align").iterdir()) == ["dpo", "g0.00", "g0.50"]
    report = (run / "report" / "report.md").read_text()
    assert "## Verdicts" in report and "CE: n/a" not in report
    # no CE phase, but a starting checkpoint: the pipeline measured its whole training delta against random
    # initialisations (RUN/init_delta/), and the CE claim and 'below CE's' rest on that; the mechanism claims,
    # which need a CE phase's C_delta, are NOT MEASURED
    verdicts = {v["id"]: v for v in json.loads((run / "report" / "verdicts.json").read_text())}
    assert (run / "init_delta" / "init.json").is_file()
    assert verdicts["ce_prediction"]["basis"].startswith("(ii) the whole pretraining delta")
    assert verdicts["ce_prediction"]["held"] is not None and verdicts["write_isotropic"]["held"] is not None
    mechanism = verdicts["ce_mechanism"]
    assert mechanism["held"] is None and "no CE pretraining phase" in mechanism["evidence"]
    assert f"| initialised from | {ckpt} |" in report
    assert yaml.safe_load((run / "config.yaml").read_text())["init_from"] == str(ckpt)
    stats = json.loads((run / "data.json").read_text())["preferences"]  # the dropped pair is counted on disk
    assert (stats["rows"], stats["used"], stats["identical_dropped"]) == (41, 40, 1)


@pytest.mark.slow
def test_tiny_sweep_writes_the_scale_report(tmp_path):
    recipe = yaml.safe_load((recipes.bundled()["asymmetry_smoke"]).read_text())
    recipe.update(name="sweep", output_dir=str(tmp_path), tokenizer={"vocab_size": 512, "cache_dir": str(tmp_path)})
    recipe["align"]["objectives"] = recipe["align"]["objectives"][1:]  # the graded family only
    recipe["sweep"] = [{"model.hidden_size": 32, "train.steps": 10}, {"model.hidden_size": 64, "train.steps": 20}]
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--no-progress"]) == 0
    report = (tmp_path / "sweep" / "report" / "report.md").read_text()
    assert "| 00 | 32 |" in report and "| 01 | 64 |" in report
    assert (tmp_path / "sweep" / "report" / "scale.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_recipe_errors_name_key_and_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("align: {objectives: [{name: x, loss: nope}]}\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "align.objectives[0].loss" in err and str(bad) in err
    assert main(["run", "no_such_recipe"]) == 2
    assert "asymmetry_smoke" in capsys.readouterr().err  # lists the bundled recipes


@pytest.mark.slow
def test_dpo_lora_recipe_measures_the_adapted_matrices(tmp_path):
    assert main(["run", "dpo_lora", f"output_dir={tmp_path}", f"tokenizer.cache_dir={tmp_path / 'tok'}",
                 "tokenizer.vocab_size=512", "model.hidden_size=32", "data.max_tokens=60000", "train.steps=20",
                 "align.n_pairs=48", "align.max_len=48", "align.train.steps=4", "align.train.batch_size=4",
                 "instruments.every_n=2", "--no-progress"]) == 0
    run = tmp_path / "dpo_lora" / "align" / "dpo"
    final = [r for r in read_metrics(run / "metrics.jsonl") if "rsf_in/L0/q" in r][-1]
    assert "rsf_out_pred/L1/o" in final  # LoRA on q, k, v, o: their effective deltas are measured
    assert not any(k.endswith(("/gate", "/up", "/down")) and k.startswith("rsf_") for k in final)  # frozen MLP
    assert any("eval/pref_accuracy" in r for r in read_metrics(run / "metrics.jsonl"))
    merged = run / "checkpoints" / "step_0000004"
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_model.safetensors").exists()
