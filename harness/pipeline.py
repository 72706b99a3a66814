"""Recipes as stage sequences: pretrain -> align (one run per objective) -> report; and sweeps.

Layouts (see docs/architecture.md):

* ``stages: [pretrain, report]`` -> ``RUN/`` is the pretraining run itself.
* any recipe with ``align`` -> ``RUN/pretrain/`` (when pretraining), ``RUN/align/{objective}/``,
  ``RUN/report/`` (the asymmetry report comparing objectives).
* ``sweep: [{override: value, ...}, ...]`` -> one pipeline per entry under ``RUN/{i:02d}/`` and a
  scale report in ``RUN/report/`` that collects every claim's figures across sizes.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

import yaml

from core.checkpoint import checkpoint_dir, is_complete, latest_checkpoint
from core.config import ConfigError, RunConfig, apply_override, from_dict, save_config, to_dict
from core.data import build_embedded_preferences, load_preference_pairs, load_texts
from core.processes import main_print, on_main
from core.rundir import prepare_run_dir
from core.tokenizer import load_tokenizer, tokenizer_from_config
from harness.asymmetry import write_asymmetry_report
from harness.report import write_run_report
from harness.scale import write_scale_report
from trainers.ce import pretrain
from trainers.losses import check_objectives
from trainers.preference import align
from trainers.session import RunResult
from trainers.trl_dpo import align_with_trl


def run_recipe(cfg: RunConfig, *, resume: str | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    if cfg.sweep:
        return run_sweep(cfg, overwrite=overwrite, progress=progress)
    if "align" not in cfg.stages:
        if "pretrain" not in cfg.stages:
            raise ConfigError("stages must include 'pretrain' or 'align' (a report alone: `harness report RUN_DIR`)")
        pretrain(cfg, cfg.run_dir, resume=_resume_path(cfg.run_dir, resume), overwrite=overwrite, progress=progress)
        if "report" in cfg.stages:
            on_main(write_report, cfg.run_dir)
        return cfg.run_dir
    return run_pipeline(cfg, cfg.run_dir, resume=resume, overwrite=overwrite, progress=progress)


def run_pipeline(cfg: RunConfig, run_dir: Path, *, resume: str | None = None, overwrite: bool = False,
                 progress: bool = True) -> Path:
    """Pretrain (or start from ``init_from``), align with every objective, report."""
    if "pretrain" not in cfg.stages and not cfg.init_from:
        raise ConfigError("an alignment-only recipe needs init_from: a checkpoint or local HF model directory")
    # validate the inputs every stage needs before the run directory exists
    validate_recipe(cfg)
    pretrain_tokenizer = tokenizer_from_config(cfg.tokenizer) if "pretrain" in cfg.stages else None
    pairs_all = load_pairs(cfg, pretrain_tokenizer)
    pretrain_dir = Path(run_dir) / "pretrain"
    if resume not in (None, "latest"):
        raise ConfigError("a pipeline resumes with --resume latest: finished stages are kept, unfinished ones "
                          "continue from their newest checkpoint")
    resume_path = latest_checkpoint(pretrain_dir) if resume and "pretrain" in cfg.stages else None
    on_main(prepare_run_dir, run_dir, cfg, overwrite=overwrite, resuming=bool(resume))

    final_pretrain = checkpoint_dir(pretrain_dir, cfg.train.steps)
    if "pretrain" not in cfg.stages:
        init_dir = Path(cfg.init_from)
    elif resume and is_complete(final_pretrain):
        main_print(f"[resume] pretraining already finished: {final_pretrain}")
        init_dir = final_pretrain
    else:
        init_dir = pretrain(cfg, pretrain_dir, resume=resume_path, progress=progress, overwrite=True).checkpoint
    tokenizer = alignment_tokenizer(cfg, init_dir)
    pairs, eval_pairs = split_pairs(pairs_all, cfg.data.eval_fraction or 0.1, cfg.seed)
    for objective in cfg.align.objectives:
        obj_dir = Path(run_dir) / "align" / objective.name
        obj_resume = None
        if resume:
            if is_complete(checkpoint_dir(obj_dir, cfg.align.train.steps)):
                main_print(f"[resume] objective {objective.name} already finished")
                continue
            obj_resume = latest_checkpoint(obj_dir) if objective.loss != "trl" else None
            if obj_resume is not None:
                main_print(f"[resume] objective {objective.name} from {obj_resume}")
        run_objective(cfg, objective, init_dir, obj_dir, tokenizer=tokenizer, pairs=pairs, eval_pairs=eval_pairs,
                      progress=progress, overwrite=obj_resume is None, resume=obj_resume)
    if "report" in cfg.stages:
        on_main(write_report, run_dir)
    return Path(run_dir)


def validate_recipe(cfg: RunConfig) -> None:
    """The checks that need the trainers: every alignment objective's settings, by the loss that
    uses them (so a bad ``lam`` fails before pretraining, not after)."""
    try:
        check_objectives(cfg.align.objectives, cfg.align.beta)
    except ValueError as err:
        raise ConfigError(f"recipe {cfg.name}: {err}") from err


def run_objective(cfg: RunConfig, objective, init_dir: Path, run_dir: Path, **kwargs) -> RunResult:
    """One alignment run: TRL's DPOTrainer for ``loss: trl``, our preference loop for the others
    (TRL objectives restart instead of resuming)."""
    if objective.loss == "trl":
        kwargs.pop("resume", None)
        return align_with_trl(cfg, objective, init_dir, run_dir, **kwargs)
    return align(cfg, objective, init_dir, run_dir, **kwargs)


def load_pairs(cfg: RunConfig, tokenizer=None) -> list[dict]:
    """The preference pairs: the embedded set built from the local corpus, or a local file."""
    if cfg.align.data == "embedded":
        texts = load_texts(cfg.data.source, text_field=cfg.data.text_field)
        return build_embedded_preferences(texts, n_pairs=cfg.align.n_pairs, seed=cfg.seed)
    pairs, stats = load_preference_pairs(cfg.align.data)
    main_print(f"[data] {cfg.align.data}: {stats.n_valid} of {stats.n_rows} rows used "
          f"({'conversational' if stats.conversational else 'plain'})")
    return pairs


def split_pairs(pairs: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(pairs) * eval_fraction)) if len(pairs) >= 10 else 0
    return [pairs[i] for i in order[n_eval:]], [pairs[i] for i in order[:n_eval]]


def alignment_tokenizer(cfg: RunConfig, init_dir: Path):
    """The tokenizer saved with the starting model, else the recipe's."""
    if any((Path(init_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return load_tokenizer(str(init_dir), cfg.tokenizer.vocab_size, Path(cfg.tokenizer.cache_dir).expanduser())
    return tokenizer_from_config(cfg.tokenizer)


def _resume_path(run_dir: Path, resume: str | None) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        found = latest_checkpoint(run_dir)
        if found is None:
            raise FileNotFoundError(f"--resume latest: no complete checkpoint under {run_dir}/checkpoints")
        return found
    return Path(resume)


def sweep_configs(cfg: RunConfig) -> list[tuple[str, RunConfig]]:
    """One validated config per sweep entry (the base recipe with the entry's dotted overrides)."""
    base = to_dict(cfg)
    base["sweep"] = []
    out = []
    for i, entry in enumerate(cfg.sweep):
        raw = copy.deepcopy(base)
        for key, value in entry.items():
            apply_override(raw, f"{key}={_yaml_scalar(value)}")
        label = f"{i:02d}"
        raw["name"] = label
        raw["output_dir"] = str(cfg.run_dir)
        out.append((label, from_dict(RunConfig, raw, f"sweep[{i}] of {cfg.name}")))
    return out


def _yaml_scalar(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def run_sweep(cfg: RunConfig, *, overwrite: bool = False, progress: bool = True) -> Path:
    runs = sweep_configs(cfg)  # validates every entry before anything runs
    on_main(prepare_run_dir, cfg.run_dir, cfg, overwrite=overwrite)
    for label, sub in runs:
        main_print(f"[sweep] run {label}: {cfg.sweep[int(label)]}")
        run_pipeline(sub, sub.run_dir, overwrite=True, progress=progress)
    on_main(save_config, cfg, cfg.run_dir / "config.yaml")
    on_main(write_report, cfg.run_dir)
    return cfg.run_dir


def write_report(run_dir: Path) -> Path:
    """The report that fits the directory: one run, an asymmetry pipeline, or a sweep."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist; produce one with `harness run RECIPE`")
    if (run_dir / "metrics.jsonl").is_file():
        return write_run_report(run_dir)
    if (run_dir / "align").is_dir():
        return write_asymmetry_report(run_dir)
    if any((p / "align").is_dir() for p in run_dir.iterdir() if p.is_dir()):
        return write_scale_report(run_dir)
    raise FileNotFoundError(f"{run_dir} holds no metrics.jsonl, align/ or sweep runs; produce one with "
                            "`harness run RECIPE`")
