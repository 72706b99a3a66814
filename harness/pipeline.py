"""Recipes as stage sequences: pretrain -> align (one run per objective) -> report; and sweeps.

Layouts (see docs/architecture.md):

* ``stages: [pretrain, report]`` -> ``RUN/`` is the pretraining run itself.
* any recipe with ``align`` -> ``RUN/pretrain/`` (when pretraining), ``RUN/align/{objective}/``,
  ``RUN/report/`` (the asymmetry report comparing objectives), and, when the run starts from a real checkpoint
  (``init_from`` or ``model.source``) and reports, ``RUN/init_delta/``: that checkpoint's whole pretraining delta
  against random initialisations of its config (``harness compare init``, seeds 0, 1, 2, write side only), the
  evidence the report's CE claim rests on.
* ``sweep: [{override: value, ...}, ...]`` -> one pipeline per entry under ``RUN/{i:02d}/`` and a
  scale report in ``RUN/report/`` that collects every claim's figures across sizes.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import yaml

from weightgeom.core.checkpoint import (
    checkpoint_dir,
    checkpoint_step,
    clean_stale,
    is_complete,
    latest_checkpoint,
    manifest_problem,
)
from weightgeom.core.config import ConfigError, RunConfig, apply_override, from_dict, save_config, to_dict
from weightgeom.core.data import identical_after_truncation
from weightgeom.core.preflight import preflight
from weightgeom.core.processes import main_print, on_main
from weightgeom.core.rundir import check_resume_config, existing_run_problem, prepare_run_dir
from weightgeom.core.stage_inputs import load_pairs, split_pairs, stage_tokenizer, starting_model
from weightgeom.harness.compare.init import compare_init
from weightgeom.harness.compare.options import CompareOptions
from weightgeom.harness.rank1.report import rank1_section
from weightgeom.harness.rank1.stage import RANK1_DIR, run_rank1_stage
from weightgeom.harness.reports.asymmetry import write_asymmetry_report
from weightgeom.harness.reports.evidence import INIT_DELTA, INIT_SEEDS
from weightgeom.harness.reports.run_report import write_run_report
from weightgeom.harness.reports.scale import write_scale_report
from weightgeom.trainers.ce import pretrain
from weightgeom.trainers.losses import check_objectives
from weightgeom.trainers.preference import align
from weightgeom.trainers.session import RunResult
from weightgeom.trainers.trl_dpo import align_with_trl


def run_recipe(cfg: RunConfig, *, resume: str | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Run a recipe: a sweep, a pipeline (with ``align``) or a single pretraining run (+ report).
    Every check that can fail runs before the run directory is created (:func:`check_recipe`)."""
    if cfg.sweep:
        return run_sweep(cfg, overwrite=overwrite, progress=progress)
    check_recipe(cfg, resume=resume, overwrite=overwrite)
    if not {"align", "rank1"} & set(cfg.stages):
        if "pretrain" not in cfg.stages:
            raise ConfigError("stages must include 'pretrain' or 'align' (a report alone: `harness report RUN_DIR`)")
        resume_path = _resume_path(cfg.run_dir, resume)
        if resume_path is not None and checkpoint_step(resume_path) == cfg.train.steps:
            print(f"[resume] {cfg.run_dir} already finished (step {cfg.train.steps} of {cfg.train.steps}); nothing to "
                  "train", file=sys.stderr)
            if "report" in cfg.stages and not (cfg.run_dir / "report" / "report.md").is_file():
                write_report(cfg.run_dir)
            return cfg.run_dir
        pretrain(cfg, cfg.run_dir, resume=resume_path, overwrite=overwrite, progress=progress)
        if "report" in cfg.stages:
            on_main(write_report, cfg.run_dir)
        return cfg.run_dir
    return run_pipeline(cfg, cfg.run_dir, resume=resume, overwrite=overwrite, progress=progress)


def check_recipe(cfg: RunConfig, *, resume: str | None = None, overwrite: bool = False) -> None:
    """Everything that can be checked before training: inputs and model (core.preflight), the
    objectives' settings, and whether the run directory may be written: a new run needs a free name
    (or --overwrite on a run directory); ``--resume`` needs this run's own checkpoint and its recipe.
    Warnings go to stderr."""
    for warning in preflight(cfg):
        print(f"[check] warning: {warning}", file=sys.stderr)
    validate_recipe(cfg)
    run_dir = cfg.run_dir
    if resume is None:
        problem = existing_run_problem(run_dir, overwrite=overwrite)
        if problem is not None:
            raise FileExistsError(problem)
    elif resume == "latest":
        if not run_dir.is_dir():
            raise FileNotFoundError(f"--resume latest: {run_dir} does not exist; start the run without --resume")
        check_resume_config(run_dir, cfg)
    else:
        check_resume_path(Path(resume), cfg)


def check_resume_path(path: Path, cfg: RunConfig) -> None:
    """``--resume PATH``: a complete checkpoint of this very run (``RUN/checkpoints/step_N``), whose
    recipe is this one; a pipeline resumes with ``latest`` only."""
    if {"align", "rank1"} & set(cfg.stages):
        raise ConfigError("--resume: a pipeline resumes with --resume latest (finished stages are kept, unfinished "
                          f"ones continue from their newest checkpoint), not with a path ({path})")
    if not path.exists():
        raise FileNotFoundError(f"--resume {path}: no such directory; pass a checkpoint of this run "
                                f"({cfg.run_dir}/checkpoints/step_N) or --resume latest")
    if checkpoint_step(path) is None and ((path / "checkpoints").is_dir() or (path / "config.yaml").is_file()):
        raise ConfigError(f"--resume {path}: that is a run directory; --resume takes one of its checkpoints "
                          f"({path}/checkpoints/step_N), or 'latest' with that run's name= and output_dir=")
    if not is_complete(path):
        why = manifest_problem(path) or "its name is not step_N"
        raise ConfigError(f"--resume {path}: not a complete checkpoint ({why}); pass one listed under "
                          f"{cfg.run_dir}/checkpoints/, or --resume latest")
    owner = path.resolve().parent.parent
    if owner != cfg.run_dir.resolve():
        raise ConfigError(f"--resume {path}: a checkpoint of the run {owner}, not of this one ({cfg.run_dir}); resume "
                          f"that run (its name= and output_dir=), or start a new run from it with init_from={path}")
    check_resume_config(owner, cfg)


def run_pipeline(cfg: RunConfig, run_dir: Path, *, resume: str | None = None, overwrite: bool = False,
                 progress: bool = True) -> Path:
    """Pretrain (from scratch, or continued from ``init_from``), or start from ``init_from``; align with
    every objective from that one checkpoint; the rank-1 test; report."""
    if "pretrain" not in cfg.stages and not cfg.init_from:
        raise ConfigError("an alignment-only recipe needs init_from: a checkpoint or local HF model directory")
    if resume not in (None, "latest"):
        raise ConfigError("a pipeline resumes with --resume latest: finished stages are kept, unfinished ones "
                          "continue from their newest checkpoint")
    # validate the inputs every stage needs before the run directory exists
    validate_recipe(cfg)
    start = starting_model(cfg)  # init_from (a .gguf file or short name dequantized once), or None
    # the tokenizer every stage uses: the one saved with the starting model, else the recipe's (trained
    # and cached now, so its errors precede the run directory); it renders conversational pairs
    pair_tokenizer = stage_tokenizer(cfg, start)
    pairs_all, pair_stats = load_pairs(cfg, pair_tokenizer)
    pairs_all = usable_pairs(cfg, pairs_all, pair_stats, pair_tokenizer)
    pretrain_dir = Path(run_dir) / "pretrain"
    resume_path = None
    if resume and "pretrain" in cfg.stages:
        on_main(clean_stale, pretrain_dir)
        resume_path = latest_checkpoint(pretrain_dir)
    on_main(create_pipeline_dir, run_dir, cfg, pair_stats, overwrite=overwrite, resuming=bool(resume))

    final_pretrain = checkpoint_dir(pretrain_dir, cfg.train.steps)
    if "pretrain" not in cfg.stages:
        init_dir = start
    elif resume and is_complete(final_pretrain):
        main_print(f"[resume] pretraining already finished: {final_pretrain}")
        init_dir = final_pretrain
    else:
        init_dir = pretrain(cfg, pretrain_dir, resume=resume_path, progress=progress, overwrite=True).checkpoint
    tokenizer = stage_tokenizer(cfg, init_dir)
    pairs, eval_pairs = split_pairs(pairs_all, cfg.align.eval_fraction, cfg.seed)
    for objective in cfg.align.objectives if "align" in cfg.stages else []:
        obj_dir = Path(run_dir) / "align" / objective.name
        obj_resume = None
        if resume:
            on_main(clean_stale, obj_dir)
            if is_complete(checkpoint_dir(obj_dir, cfg.align.train.steps)):
                main_print(f"[resume] objective {objective.name} already finished")
                continue
            obj_resume = latest_checkpoint(obj_dir) if objective.resumes else None
            if obj_resume is not None:
                main_print(f"[resume] objective {objective.name} from {obj_resume}")
        run_objective(cfg, objective, init_dir, obj_dir, tokenizer=tokenizer, pairs=pairs, eval_pairs=eval_pairs,
                      progress=progress, overwrite=obj_resume is None, resume=obj_resume)
    if "rank1" in cfg.stages:
        if resume and (Path(run_dir) / RANK1_DIR / "rank1.json").is_file():
            main_print("[resume] rank1 already finished")
        else:  # one process: the edits are measured on the main one while the others wait
            on_main(run_rank1_stage, cfg, run_dir, init_dir, tokenizer=tokenizer, pairs=pairs, eval_pairs=eval_pairs,
                    progress=progress)
    if "report" in cfg.stages and start is not None:
        on_main(write_init_delta, cfg, run_dir, start, resume=bool(resume))
    if "report" in cfg.stages:
        on_main(write_report, run_dir)
    return Path(run_dir)


def write_init_delta(cfg: RunConfig, run_dir: Path, start: Path, *, resume: bool = False) -> Path:
    """``RUN/init_delta/``: the starting checkpoint against random initialisations of its own config (seeds
    :data:`INIT_SEEDS`), the write side only (no text pass), with the run's ``k``, ``k_curve`` and tracked layers;
    kept on resume. Cost: one fp32 initialisation per seed (one alive at a time) beside the checkpoint, and the
    geometry of the write matrices (on SmolLM2-135M, 2-core CPU: docs/real_model.md)."""
    out = Path(run_dir) / INIT_DELTA
    if resume and (out / "init.json").is_file():
        main_print(f"[resume] {INIT_DELTA} already written: {out}")
        return out
    inst = cfg.instruments
    options = CompareOptions(k=inst.k, k_curve=tuple(inst.k_curve), read_side=False, seeds=INIT_SEEDS,
                             layers=tuple(inst.layers) if inst.layers else None)
    began = time.perf_counter()
    compare_init(start, options, out_dir=out)
    main_print(f"[{INIT_DELTA}] {start} against random initialisations of its config (seeds "
               f"{', '.join(map(str, INIT_SEEDS))}): {out / 'report.md'} ({time.perf_counter() - began:.0f} s)")
    return out


def usable_pairs(cfg: RunConfig, pairs: list[dict], stats: dict, tokenizer) -> list[dict]:
    """``pairs`` without those identical once cut to ``align.max_len`` (counted in ``stats`` as
    ``identical_after_truncation``), checked to fill one global batch after the held-out split; both
    before the run directory exists, so a bad file costs a second and no directory."""
    same = set(identical_after_truncation(pairs, tokenizer, cfg.align.max_len)) if pairs else set()
    stats["identical_after_truncation"] = len(same)
    if same:
        main_print(f"[data] dropped {len(same)} of {len(pairs)} pairs whose chosen and rejected are the same tokens "
                   f"once cut to align.max_len={cfg.align.max_len} (no preference left: raise align.max_len to keep "
                   "them)", file=sys.stderr)
        pairs = [p for i, p in enumerate(pairs) if i not in same]
    stats["used"] = len(pairs)
    if not pairs:
        raise ConfigError(f"align.data ({stats['source']}): no pair is left once chosen and rejected are cut to "
                          f"align.max_len={cfg.align.max_len}: raise align.max_len")
    train, held = split_pairs(pairs, cfg.align.eval_fraction, cfg.seed)
    batch = cfg.align.train.batch_size
    if "align" in cfg.stages and len(train) < batch:
        raise ConfigError(f"align.data ({stats['source']}): {len(train)} training pairs ({len(pairs)} usable, "
                          f"{len(held)} held out by align.eval_fraction={cfg.align.eval_fraction}) cannot fill one "
                          f"batch of align.train.batch_size={batch}: add pairs, lower align.train.batch_size or "
                          "align.eval_fraction")
    return pairs


def create_pipeline_dir(run_dir: Path, cfg: RunConfig, pair_stats: dict, *, overwrite: bool, resuming: bool) -> None:
    """The pipeline's directory: the resolved config and what was read from the preference data."""
    prepare_run_dir(run_dir, cfg, overwrite=overwrite, resuming=resuming)
    (Path(run_dir) / DATA_STATS).write_text(json.dumps({"preferences": pair_stats}, indent=2) + "\n")


def validate_recipe(cfg: RunConfig) -> None:
    """The checks that need the trainers: every alignment objective's settings, by the loss that
    uses them (so a bad ``lam`` fails before pretraining, not after)."""
    try:
        check_objectives(cfg.align.objectives, cfg.align.beta)  # also align.beta, which the rank1 stage uses
    except ValueError as err:
        raise ConfigError(f"recipe {cfg.name}: {err}") from err


# The alignment loops, keyed by the objective's ``trainer`` (core.config: each objective names its own).
ALIGNERS = {"preference": align, "trl": align_with_trl}


def run_objective(cfg: RunConfig, objective, init_dir: Path, run_dir: Path, **kwargs) -> RunResult:
    """One alignment run, by the trainer the objective names (one that does not resume restarts)."""
    if not objective.resumes:
        kwargs.pop("resume", None)
    return ALIGNERS[objective.trainer](cfg, objective, init_dir, run_dir, **kwargs)


DATA_STATS = "data.json"  # RUN/data.json: what the preference data held and what was dropped


def _resume_path(run_dir: Path, resume: str | None) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        for note in clean_stale(run_dir):
            print(f"[resume] {note}", file=sys.stderr)
        found = latest_checkpoint(run_dir)
        if found is None:
            raise FileNotFoundError(f"--resume latest: no complete checkpoint under {run_dir}/checkpoints (the run "
                                    "stopped before its first one; train.save_every sets how often they are "
                                    "written): start it again with --overwrite")
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
    for label, sub in runs:
        for warning in preflight(sub):
            main_print(f"[check] warning: sweep run {label}: {warning}", file=sys.stderr)
        validate_recipe(sub)
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
        # the rank-1 section is there once the rank1 stage or `harness rank1 RUN` wrote RUN/rank1/rank1.json
        return write_asymmetry_report(run_dir, sections=rank1_section(run_dir))
    if any((p / "align").is_dir() for p in run_dir.iterdir() if p.is_dir()):
        return write_scale_report(run_dir)
    raise FileNotFoundError(f"{run_dir} holds no metrics.jsonl, align/ or sweep runs; produce one with "
                            "`harness run RECIPE`")
