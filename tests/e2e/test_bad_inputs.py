"""Fuzz-style: malformed recipes, overrides, corpora, preference files and model directories each give
a clean error naming the culprit, exit code 2, no traceback, and no run directory (so a retry under
the same name works). Every case fails before the tokenizer is trained or anything is written."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from weightgeom.core.models import build_tiny_model
from weightgeom.core.rundir import RUN_MARKER
from weightgeom.core.tokenizer import train_stdlib_tokenizer
from weightgeom.harness.cli import main

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def safetensors_bytes() -> bytes:
    """A readable (if meaningless) safetensors file: these cases are about the config, not the weights."""
    return save({"w": torch.zeros(2)})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tokenizer_cache):
    """A directory of good and bad inputs; ``{name: path}``."""
    d = tmp_path_factory.mktemp("inputs")
    p: dict[str, Path] = {"cache": tokenizer_cache}

    def write(name: str, text: str | bytes) -> Path:
        path = d / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
        p[name] = path
        return path

    def jsonl(name: str, rows: list) -> Path:
        return write(name, "".join(json.dumps(r) + "\n" for r in rows))

    write("corpus.txt", (STDLIB / "textwrap.py").read_text())
    # a valid local model with its tokenizer (alignment-only recipes start from it)
    tokenizer = train_stdlib_tokenizer(512, tokenizer_cache)
    good = d / "good_model"
    build_tiny_model("llama", vocab_size=len(tokenizer), hidden_size=32).save_pretrained(good)
    tokenizer.save_pretrained(good)
    p["good_model"] = good
    pair = {"prompt": "def f(x):\n", "chosen": "    return x\n", "rejected": "    x return\n"}
    jsonl("prefs_ok.jsonl", [pair] * 20)
    # recipes
    write("r_malformed.yaml", "train: {steps: 3\n")
    write("r_list.yaml", "- name: x\n")
    write("r_unknown_top.yaml", "nmae: x\n")
    write("r_unknown_nested.yaml", "train: {stepz: 3}\n")
    write("r_wrong_type.yaml", "train: {steps: many}\n")
    write("r_negative.yaml", "train: {steps: -5}\n")
    write("r_bad_choice.yaml", "train: {optimizer: adam}\n")
    write("r_heads.yaml", "model: {hidden_size: 30, num_heads: 4}\n")
    write("r_arch.yaml", "model: {arch: bert}\n")
    write("r_loss.yaml", "stages: [pretrain, align]\nalign: {objectives: [{name: x, loss: nope}]}\n")
    write("r_dupe.yaml",
          "stages: [pretrain, align]\nalign: {objectives: [{name: a, loss: dpo}, {name: a, loss: dpo}]}\n")
    write("r_other_key.yaml", "stages: [pretrain, align]\nalign: {objectives: [{name: a, loss: graded, lam: 0.3}]}\n")
    write("r_section.yaml", "train: 5\n")
    # corpora
    write("empty.txt", "  \n\n")
    (d / "no_text_dir").mkdir()
    (d / "no_text_dir" / "a.csv").write_text("x\n")
    p["no_text_dir"] = d / "no_text_dir"
    write("corpus.csv", "text\nhello\n")
    write("broken.jsonl", '{"text": "a"}\n{"text": "b"\n{"text": "c"}\n')
    jsonl("lists.jsonl", [["a", "b"]])
    jsonl("no_field.jsonl", [{"content": "x"}])
    jsonl("number_field.jsonl", [{"text": 3}])
    write("garbage.parquet", b"not a parquet file at all")
    write("latin1.jsonl", '{"text": "caf\xe9"}\n'.encode("latin-1"))
    write("tiny.txt", "a b")
    # preference files
    jsonl("prefs_missing_col.jsonl", [{"prompt": "a", "chosen": "b"}])
    jsonl("prefs_empty_field.jsonl", [pair, {**pair, "chosen": "  "}])
    jsonl("prefs_identical.jsonl", [{**pair, "rejected": pair["chosen"]}] * 3)
    write("prefs_broken.jsonl", json.dumps(pair) + "\n" + json.dumps(pair)[:-1] + "\n")
    jsonl("prefs_bad_message.jsonl", [{"prompt": [{"role": "user"}], "chosen": [{"role": "a", "content": "x"}],
                                       "rejected": [{"role": "a", "content": "y"}]}])
    write("prefs.txt", "prompt chosen rejected\n")
    jsonl("prefs_mixed.jsonl", [pair, {"prompt": "p", "chosen": [{"role": "a", "content": "x"}], "rejected": "r"}])
    # model directories
    for name in ("m_no_config", "m_no_weights", "m_bad_json", "m_bert", "m_unknown_type", "m_empty_weights",
                 "m_garbage_weights", "m_small_vocab", "tok_empty"):
        (d / name).mkdir()
        p[name] = d / name
    (d / "m_no_config" / "model.safetensors").write_bytes(b"")
    (d / "m_no_weights" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    (d / "m_bad_json" / "config.json").write_text("{not json")
    valid_weights = safetensors_bytes()
    (d / "m_bad_json" / "model.safetensors").write_bytes(valid_weights)
    (d / "m_bert" / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32,
                                                          "num_attention_heads": 4, "num_hidden_layers": 1,
                                                          "intermediate_size": 64, "vocab_size": 512}))
    (d / "m_bert" / "model.safetensors").write_bytes(valid_weights)
    (d / "m_unknown_type" / "config.json").write_text(json.dumps({"model_type": "flux_capacitor"}))
    (d / "m_unknown_type" / "model.safetensors").write_bytes(valid_weights)
    for name, weights in (("m_empty_weights", b""), ("m_garbage_weights", b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")):
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            (d / name / f).write_bytes((good / f).read_bytes())
        (d / name / "model.safetensors").write_bytes(weights)
    small = build_tiny_model("llama", vocab_size=300, hidden_size=32)
    small.save_pretrained(d / "m_small_vocab")
    (d / "tok_empty" / "README").write_text("no tokenizer here")
    torch.manual_seed(0)
    return p


# (case id, recipe, overrides, text the error must contain); "{name}" is replaced by inputs[name]
CASES = [
    # recipe files
    ("malformed_yaml", "{r_malformed.yaml}", [], "malformed YAML"),
    ("recipe_not_mapping", "{r_list.yaml}", [], "must be a mapping"),
    ("unknown_top_key", "{r_unknown_top.yaml}", [], "unknown key 'nmae' (did you mean 'name'?)"),
    ("unknown_nested_key", "{r_unknown_nested.yaml}", [], "r_unknown_nested.yaml: unknown key 'train.stepz'"),
    ("wrong_type", "{r_wrong_type.yaml}", [], "key 'train.steps' expects int"),
    ("negative_steps", "{r_negative.yaml}", [], "key 'train.steps' must be > 0"),
    ("bad_choice", "{r_bad_choice.yaml}", [], "key 'train.optimizer' must be one of"),
    ("heads_do_not_divide", "{r_heads.yaml}", [], "must be divisible by model.num_heads"),
    ("unknown_arch", "{r_arch.yaml}", [], "key 'model.arch' must be one of"),
    ("unknown_loss", "{r_loss.yaml}", [], "align.objectives[0].loss"),
    ("duplicate_objectives", "{r_dupe.yaml}", [], "names must be unique"),
    ("key_of_another_loss", "{r_other_key.yaml}", [], "unknown key 'align.objectives[0].lam'"),
    ("section_not_mapping", "{r_section.yaml}", [], "train must be a mapping"),
    ("no_such_recipe", "no_such_recipe", [], "not a bundled recipe"),
    # command-line overrides
    ("override_typo", "ce_tiny", ["train.stepz=3"], "command line (train.stepz=3)"),
    ("override_not_key_value", "ce_tiny", ["train.steps"], "must look like key.sub=value"),
    ("override_into_value", "ce_tiny", ["train.lr.x=1"], "which is not a section"),
    ("empty_objectives", "asymmetry_smoke", ["align.objectives=[]"], "align.objectives' is empty"),
    ("report_stage_only", "ce_tiny", ["stages=[report]"], "stages must include"),
    ("align_without_model", "asymmetry_smoke", ["stages=[align]"], "needs init_from"),
    ("k_too_large", "ce_tiny", ["instruments.k=1000"], "instruments.k=1000 is not below"),
    ("unknown_role", "ce_tiny", ["instruments.roles=[qq]"], "unknown roles ['qq']"),
    ("layer_out_of_range", "ce_tiny", ["instruments.layers=[7]"], "instruments.layers has 7"),
    ("removed_key", "ce_tiny", ["instruments.n_random=1"], "'instruments.n_random' is gone"),
    ("negative_beta", "asymmetry_smoke", ["align.beta=-1"], "beta"),
    ("mixture_lam", "asymmetry_smoke", ["align.objectives=[{name: m, loss: mixture, lam: 2}]"], "lam"),
    ("eval_fraction", "ce_tiny", ["data.eval_fraction=1.5"], "eval_fraction"),
    ("unknown_tracker", "ce_tiny", ["tracking.report_to=[jsonl, nosuchtracker]"], "'nosuchtracker' is not a tracker"),
    ("vocab_too_small", "ce_tiny", ["tokenizer.vocab_size=100"], "tokenizer.vocab_size' must be >= 258"),
    ("seq_len_zero", "ce_tiny", ["data.seq_len=0"], "data.seq_len' must be > 0"),
    ("resume_nothing", "ce_tiny", ["--resume", "latest"], "does not exist"),
    ("keep_negative", "ce_tiny", ["train.keep_checkpoints=-1"], "keep_checkpoints"),
    ("bad_nonfinite_policy", "ce_tiny", ["train.on_nonfinite=ignore"], "train.on_nonfinite"),
    # corpora
    ("corpus_missing", "ce_tiny", ["data.source={corpus.txt}.gone"], "corpus.txt.gone' does not exist"),
    ("corpus_dir_without_text", "ce_tiny", ["data.source={no_text_dir}"], "holds no"),
    ("corpus_extension", "ce_tiny", ["data.source={corpus.csv}"], "unknown extension '.csv'"),
    ("corpus_empty", "ce_tiny", ["data.source={empty.txt}"], "no non-empty text"),
    ("corpus_broken_jsonl", "ce_tiny", ["data.source={broken.jsonl}"], "broken.jsonl: line 2 is not valid JSON"),
    ("corpus_jsonl_lists", "ce_tiny", ["data.source={lists.jsonl}"], "lists.jsonl: line 1: expected a JSON object"),
    ("corpus_no_text_field", "ce_tiny", ["data.source={no_field.jsonl}"], "no column 'text'"),
    ("corpus_number_field", "ce_tiny", ["data.source={number_field.jsonl}"],
     "number_field.jsonl: line 1: column 'text' holds int"),
    ("corpus_garbage_parquet", "ce_tiny", ["data.source={garbage.parquet}"], "could not read as parquet"),
    ("corpus_not_utf8", "ce_tiny", ["data.source={latin1.jsonl}"], "latin1.jsonl: line 1 is not UTF-8"),
    ("corpus_one_document", "ce_tiny", ["data.source={tiny.txt}"], "has 1 document(s)"),
    # preference files
    ("prefs_missing_file", "dpo_local_model", ["align.data={prefs_ok.jsonl}.gone"], "align.data"),
    ("prefs_missing_column", "dpo_local_model", ["align.data={prefs_missing_col.jsonl}"],
     "missing column(s) ['rejected']"),
    ("prefs_empty_field", "dpo_local_model", ["align.data={prefs_empty_field.jsonl}"], "empty fields"),
    ("prefs_all_identical", "dpo_local_model", ["align.data={prefs_identical.jsonl}"], "no valid preference pair"),
    ("prefs_broken_line", "dpo_local_model", ["align.data={prefs_broken.jsonl}"],
     "prefs_broken.jsonl:2: not valid JSON"),
    ("prefs_bad_message", "dpo_local_model", ["align.data={prefs_bad_message.jsonl}"], "message 0"),
    ("prefs_extension", "dpo_local_model", ["align.data={prefs.txt}"], "unknown extension '.txt'"),
    ("prefs_mixed_formats", "dpo_local_model", ["align.data={prefs_mixed.jsonl}"], "row 1"),
    # model directories
    ("model_missing", "dpo_local_model", ["init_from={good_model}.gone"], "is not an existing directory"),
    ("model_no_config", "dpo_local_model", ["init_from={m_no_config}"], "has no config.json"),
    ("model_no_weights", "dpo_local_model", ["init_from={m_no_weights}"], "model dir without weights"),
    ("model_config_not_json", "dpo_local_model", ["init_from={m_bad_json}"], "config.json is not a JSON object"),
    ("model_unsupported_arch", "dpo_local_model", ["init_from={m_bert}"],
     "holds a 'bert' model, which has no role table"),
    ("model_unknown_type", "dpo_local_model", ["init_from={m_unknown_type}"], "holds a 'flux_capacitor' model"),
    ("model_empty_weights", "dpo_local_model", ["init_from={m_empty_weights}"], "model.safetensors"),
    ("model_garbage_weights", "dpo_local_model", ["init_from={m_garbage_weights}"], "model.safetensors"),
    ("model_vocab_too_small", "dpo_local_model", ["init_from={m_small_vocab}"], "vocabulary"),
    ("pretrain_from_missing_model", "ce_tiny", ["init_from={good_model}.gone"], "init_from"),
    ("model_source_no_weights", "ce_tiny", ["model.source={m_no_weights}"], "model.source"),
    ("tokenizer_dir_empty", "ce_tiny", ["tokenizer.source={tok_empty}"], "holds no tokenizer files"),
]


def _fill(text: str, inputs: dict) -> str:
    for name, path in inputs.items():
        text = text.replace("{" + name + "}", str(path))
    return text


def test_there_are_at_least_50_cases():
    assert len(CASES) >= 50 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_clean_before_the_run_directory(case, inputs, tmp_path, capsys):
    name, recipe, extra, expected = case
    out = tmp_path / "runs"
    common = [f"output_dir={out}", f"name={name}", f"tokenizer.cache_dir={inputs['cache']}", "tokenizer.vocab_size=512",
              "model.hidden_size=32", f"data.source={inputs['corpus.txt']}", "data.seq_len=32",
              f"init_from={inputs['good_model']}" if recipe == "dpo_local_model" else "seed=0",
              f"align.data={inputs['prefs_ok.jsonl']}" if recipe == "dpo_local_model" else "seed=0"]
    code = main(["run", _fill(recipe, inputs), *common, *[_fill(e, inputs) for e in extra], "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert err.startswith("harness: error: ") or "\nharness: error: " in err, err[-2000:]
    assert "Traceback" not in err
    assert expected in err, err[-2000:]
    assert not (out / name).exists(), "a run directory was created for bad input"


@pytest.mark.parametrize("marked", [True, False], ids=["run_dir", "foreign_dir"])
def test_an_existing_directory_is_neither_touched_nor_reused(inputs, tmp_path, capsys, marked):
    run = tmp_path / "taken"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    if marked:
        (run / RUN_MARKER).write_text("{}\n")
    code = main(["run", "ce_tiny", f"output_dir={tmp_path}", "name=taken", f"tokenizer.cache_dir={inputs['cache']}",
                 "tokenizer.vocab_size=512", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    if marked:  # a run: --overwrite would replace it, and the message says so
        assert "already holds a run: pass --overwrite" in err
    else:  # not a run: nothing suggests --overwrite, which would refuse it too
        assert "is not a weightgeom run directory" in err and "pass --overwrite" not in err
    assert sorted(p.name for p in run.iterdir()) == sorted(["metrics.jsonl"] + ([RUN_MARKER] if marked else []))
