"""The run summary at the top of every report: model, size, seed, k, versions, and what each phase saw.

Everything comes from saved files, each number with its source:

* ``config.yaml``: seed, instruments (k, schedule), batch sizes, sequence length;
* ``metrics.jsonl``: the last logged step of each phase, its final losses and accuracies;
* the newest ``checkpoints/step_N/``: ``config.json`` (architecture, sizes, ``transformers_version``,
  which Hugging Face writes there) and the header of ``model.safetensors`` (parameter count, without
  loading the weights);
* ``run_info.json`` when the trainers wrote one (``RUN/run_info.json`` for the whole run, or one per
  phase directory): ``versions``, ``n_params``, ``tokens_seen``, ``pairs_seen``, ``n_eval_pairs``,
  ``started``, ``finished``. docs/reports.md gives the format. What no file records is printed as
  "not recorded".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from weightgeom.harness.reports.health import is_finite

RUN_INFO = "run_info.json"
NOT_RECORDED = "not recorded"


@dataclass(frozen=True)
class PhaseFiles:
    """One phase as the summary needs it."""

    name: str
    path: Path  # its run directory
    rows: list[dict]
    alignment: bool


def _zscore_note(inst: dict) -> str:
    """How the run's z-scores were computed (runs before the closed form sampled n_random subspaces)."""
    if "n_random" in inst:
        return f"z-scores from {inst['n_random']} sampled random subspaces" if inst["n_random"] else "no z-scores"
    return "exact z-scores (closed form)" if inst.get("zscores", True) else "no z-scores"


def read_run_info(run_dir: Path) -> tuple[dict, str | None]:
    """``(run_info, problem)``: the parsed ``run_dir/run_info.json`` ({} when absent), and a sentence
    when the file exists but is not a JSON object (the report shows it instead of failing)."""
    path = Path(run_dir) / RUN_INFO
    if not path.is_file():
        return {}, None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return {}, f"{path} is not valid JSON ({err}); its fields are ignored"
    if not isinstance(info, dict):
        return {}, f"{path} holds a {type(info).__name__}, not a JSON object; its fields are ignored"
    return info, None


def newest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(p for p in (Path(run_dir) / "checkpoints").glob("step_*") if p.is_dir())
    return found[-1] if found else None


def count_parameters(checkpoint: Path) -> int | None:
    """Number of parameters stored in ``checkpoint``'s ``model.safetensors`` (or its shards), read
    from the file headers only. None when the checkpoint holds no such file."""
    checkpoint = Path(checkpoint)
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (checkpoint / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return None
    total = 0
    for name in files:
        with safe_open(str(checkpoint / name), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                n = 1
                for dim in f.get_slice(key).get_shape():
                    n *= dim
                total += n
    return total


def _model_config(checkpoint: Path | None) -> dict:
    path = checkpoint / "config.json" if checkpoint else None
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def _first(mapping: dict, *names: str):
    return next((mapping[n] for n in names if mapping.get(n) is not None), None)


def describe_model(hf: dict, cfg_model: dict) -> str:
    """Architecture and sizes: from the checkpoint's config.json when there is one, else the recipe's model."""
    if hf:
        parts = [str(hf.get("model_type", "?"))]
        for label, names in (("hidden", ("hidden_size", "n_embd", "d_model")),
                             ("layers", ("num_hidden_layers", "n_layer")),
                             ("heads", ("num_attention_heads", "n_head")),
                             ("d_ff", ("intermediate_size", "n_inner")),
                             ("vocab", ("vocab_size",))):
            value = _first(hf, *names)
            if value is not None:
                parts.append(f"{label} {value}")
        return ", ".join(parts)
    if cfg_model:
        return (f"{cfg_model.get('arch', '?')}, hidden {cfg_model.get('hidden_size', '?')}, layers "
                f"{cfg_model.get('num_layers', '?')}, heads {cfg_model.get('num_heads', '?')}")
    return NOT_RECORDED


def _versions(info: dict, hf: dict, hf_source: str | None) -> tuple[str, str]:
    versions = info.get("versions")
    if isinstance(versions, dict) and versions:
        return ", ".join(f"{k} {v}" for k, v in versions.items()), RUN_INFO
    if hf.get("transformers_version"):
        return (f"transformers {hf['transformers_version']}; torch, trl, peft, accelerate, this harness: "
                f"{NOT_RECORDED}", f"{hf_source} ({RUN_INFO} absent)")
    return NOT_RECORDED, f"{RUN_INFO} absent"


def _last(rows: list[dict], key: str) -> tuple[int, float] | None:
    for r in reversed(rows):
        if is_finite(r.get(key)):
            return int(r["step"]), float(r[key])
    return None


def _fmt_last(found: tuple[int, float] | None) -> str:
    return f"{found[1]:.3g} (step {found[0]})" if found else "-"


def pairs_per_step(cfg: dict) -> int | None:
    """Preference pairs per optimizer step of the alignment phases (``align.train``), None if unknown."""
    t = (cfg.get("align") or {}).get("train") or {}
    if not t.get("batch_size"):
        return None
    return int(t["batch_size"]) * int(t.get("grad_accum") or 1)


def _seen(cfg: dict, phase: PhaseFiles, info: dict, steps: int) -> str:
    if phase.alignment:
        if is_finite(info.get("pairs_seen")):
            return f"{int(info['pairs_seen']):,} pairs ({RUN_INFO})"
        per = pairs_per_step(cfg)
        return f"{steps * per:,} pairs ({steps} steps x {per} per step)" if per else NOT_RECORDED
    if is_finite(info.get("tokens_seen")):
        return f"{int(info['tokens_seen']):,} tokens ({RUN_INFO})"
    t, seq = cfg.get("train") or {}, (cfg.get("data") or {}).get("seq_len")
    if t.get("batch_size") and seq:
        per = int(t["batch_size"]) * int(t.get("grad_accum") or 1)
        return f"{steps * per * int(seq):,} tokens ({steps} steps x {per} blocks x {seq})"
    return NOT_RECORDED


def summary_section(run_dir: Path, cfg: dict, phases: list[PhaseFiles]) -> list[str]:
    """Markdown lines: a table of run facts with their sources, and one row per phase."""
    run_dir = Path(run_dir)
    info, problem = read_run_info(run_dir)
    infos = {p.name: read_run_info(p.path) for p in phases}
    if not info:  # a single-phase run keeps its run_info beside its metrics
        info = next((i for i, _ in infos.values() if i), {})
    problems = [msg for msg in [problem] + [p for _, p in infos.values()] if msg]
    base = next((p for p in phases if not p.alignment), phases[0] if phases else None)
    checkpoint = newest_checkpoint(base.path) if base else None
    hf = _model_config(checkpoint)
    hf_source = str((checkpoint / "config.json").relative_to(run_dir)) if hf and checkpoint else None
    if is_finite(info.get("n_params")):
        n_params, n_source = f"{int(info['n_params']):,}", RUN_INFO
    else:
        counted = count_parameters(checkpoint) if checkpoint else None
        n_params = f"{counted:,}" if counted is not None else NOT_RECORDED
        n_source = (f"counted from {(checkpoint / 'model.safetensors').relative_to(run_dir)}"
                    if counted is not None else f"{RUN_INFO} absent, no checkpoint")
    inst = cfg.get("instruments") or {}
    versions, v_source = _versions(info, hf, hf_source)
    facts = [
        ["model", describe_model(hf, cfg.get("model") or {}), hf_source or "config.yaml"],
        ["parameters", n_params, n_source],
        ["initialised from", cfg.get("init_from") or ("scratch (CE pretraining)" if any(not p.alignment for p in phases)
                                                      else "the pipeline's pretrained checkpoint"), "config.yaml"],
        ["seed", cfg.get("seed", NOT_RECORDED), "config.yaml"],
        ["k (instruments)", f"{inst.get('k', '?')}; metrics every {inst.get('every_n', '?')} steps"
                            f"{' (log-spaced early)' if inst.get('log_spaced') else ''}; "
                            f"{_zscore_note(inst)}", "config.yaml"],
        ["versions", versions, v_source],
        ["started / finished", f"{info.get('started', NOT_RECORDED)} / {info.get('finished', NOT_RECORDED)}",
         RUN_INFO],
    ]
    lines = ["## Run summary", "", "| | value | source |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in facts]
    lines += ["", "| phase | steps | seen | last loss | last held-out loss | last accuracy | last held-out accuracy |",
              "|---|---|---|---|---|---|---|"]
    for p in phases:
        steps = int(p.rows[-1]["step"]) if p.rows else 0
        pinfo = infos[p.name][0]
        loss_key, eval_key = ("pref/loss", "eval/pref_loss") if p.alignment else ("train/loss", "eval/loss")
        lines.append(f"| {p.name} | {steps} | {_seen(cfg, p, pinfo, steps)} | {_fmt_last(_last(p.rows, loss_key))} | "
                     f"{_fmt_last(_last(p.rows, eval_key))} | {_fmt_last(_last(p.rows, 'pref/accuracy'))} | "
                     f"{_fmt_last(_last(p.rows, 'eval/pref_accuracy'))} |")
    lines.append("")
    lines += [f"- {msg}" for msg in problems] + ([""] if problems else [])
    return lines


def n_eval_pairs(run_dir: Path, phase_dir: Path) -> int | None:
    """Held-out preference pairs of an alignment phase, as recorded in ``run_info.json`` (the phase's
    own, else the run's); None when no file records it."""
    for path in (phase_dir, run_dir):
        value = read_run_info(path)[0].get("n_eval_pairs")
        if is_finite(value) and value > 0:
            return int(value)
    return None
