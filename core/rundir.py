"""A run's output directory: created only after every input has been validated and built.

    RUN/config.yaml, metrics.jsonl, tb/, instruments/step_N.safetensors, checkpoints/step_N/

:class:`RunDirectory` owns everything a trainer writes there (the resolved config, the metric sinks,
checkpoints and instrument snapshots). Under several processes only the main one writes; the others
get the same object with writing switched off, so trainers call it unconditionally.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import yaml

from weightgeom.core.checkpoint import (
    INSTRUMENTS_FILE,
    checkpoint_dir,
    clean_stale,
    link_or_copy,
    prune_checkpoints,
    save_checkpoint,
)
from weightgeom.core.config import ConfigError, RunConfig, from_dict, save_config, to_dict
from weightgeom.core.processes import on_main, process_state
from weightgeom.core.sinks import MultiSink, build_sinks, truncate_after

SNAPSHOT_DIR = "instruments"
RUN_INFO = "run_info.json"
CONFIG_FILE = "config.yaml"
RUN_MARKER = ".weightgeom-run"  # in every directory a run created: only such a directory is ever replaced
# Keys a resumed run may change: where the tokenizer cache lives and where metrics go change no number.
# Settings a resumed run may change: where the run and the caches live (a run directory may be moved
# or renamed), and where metrics are sent. Everything else shapes the numbers.
RESUME_MAY_CHANGE = ("tokenizer.cache_dir", "tracking.report_to", "output_dir", "name")


def config_changes(saved: dict, cfg: RunConfig) -> list[str]:
    """``key: saved -> now`` for every setting of ``cfg`` that differs from the ``saved`` config
    (a run's config.yaml; keys added since it was written take their defaults)."""
    try:
        before = to_dict(from_dict(RunConfig, saved, "the saved config.yaml"))
    except ConfigError as err:
        return [f"the saved config cannot be read by this version ({err})"]
    now = to_dict(cfg)
    flat_before, flat_now = _flatten(before), _flatten(now)
    return [f"{key}: {flat_before.get(key)!r} -> {flat_now.get(key)!r}"
            for key in sorted(set(flat_before) | set(flat_now))
            if flat_before.get(key) != flat_now.get(key) and not key.startswith(RESUME_MAY_CHANGE)]


def check_resume_config(run_dir: Path, cfg: RunConfig) -> None:
    """A resumed run continues the recipe it started with: a changed setting (a longer
    ``train.steps`` would silently reshape the learning-rate schedule) is an error naming each key."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"--resume: {run_dir} has no {CONFIG_FILE}, so the recipe it was started with is unknown and "
                          "a resume could silently continue under another one; start the run again (--overwrite), "
                          f"or start a new run from a checkpoint with init_from={Path(run_dir) / 'checkpoints'}/step_N")
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"--resume: {path} cannot be read ({err}); the run's recipe is unknown") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"--resume: {path} is not a mapping of recipe keys; the run's recipe is unknown")
    changes = config_changes(saved, cfg)
    if changes:
        raise ConfigError(f"--resume: the recipe differs from the one {run_dir} was started with "
                          f"({path}): {'; '.join(changes)}. A resumed run must continue the same recipe (the "
                          "schedule, data order and statistics depend on it): resume with the original values, "
                          f"or start a new run from a checkpoint with init_from={Path(run_dir) / 'checkpoints'}/step_N "
                          "and another name")


def is_run_dir(path: Path) -> bool:
    """``path`` is a directory this project created as a run (it holds :data:`RUN_MARKER`)."""
    return (Path(path) / RUN_MARKER).is_file() and not Path(path).is_symlink()


def existing_run_problem(run_dir: Path, *, overwrite: bool) -> str | None:
    """Why ``run_dir`` may not be (re)created, or None. A directory that exists and is not empty is
    replaced only with ``overwrite`` and only when it holds this project's run marker: ``--overwrite``
    never deletes anything a run did not write (a sibling project, a parent folder, an older run's
    folder from before markers existed)."""
    run_dir = Path(run_dir)
    if run_dir.is_symlink():
        return f"{run_dir} is a symbolic link; choose another name (name=...) or output_dir"
    if not run_dir.exists():
        return None
    if not run_dir.is_dir():
        return f"{run_dir} exists and is a file, not a run directory; choose another name (name=...) or output_dir"
    if not any(run_dir.iterdir()):
        return None
    if not is_run_dir(run_dir):
        return (f"{run_dir} exists, is not empty and is not a weightgeom run directory (no {RUN_MARKER}); nothing "
                "there is deleted, also not with --overwrite: choose another name (name=...) or output_dir, or "
                "empty it yourself")
    if not overwrite:
        return (f"{run_dir} already holds a run: pass --overwrite to replace it, --resume latest to continue it, "
                "or choose another name (name=...)")
    return None


def prepare_run_dir(run_dir: Path, cfg: RunConfig, *, resuming: bool = False, overwrite: bool = False) -> Path:
    """Create ``run_dir`` (with the run marker) and write the resolved config. An existing non-empty
    directory is an error unless ``resuming`` (continue it, with the same config:
    :func:`check_resume_config`) or ``overwrite`` and it is a run directory (:func:`existing_run_problem`)."""
    run_dir = Path(run_dir)
    if resuming:
        check_resume_config(run_dir, cfg)
    else:
        problem = existing_run_problem(run_dir, overwrite=overwrite)
        if problem is not None:
            raise FileExistsError(problem)
        if run_dir.exists() and any(run_dir.iterdir()):
            shutil.rmtree(run_dir)  # a run directory (its marker checked above), with --overwrite
    run_dir.mkdir(parents=True, exist_ok=True)
    marker = run_dir / RUN_MARKER
    if not marker.is_file():
        marker.write_text(json.dumps({"format": 1, "name": cfg.name}) + "\n")
    save_config(cfg, run_dir / CONFIG_FILE)
    return run_dir


def _flatten(tree: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}`` (lists stay values)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def snapshot_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR / f"step_{step:07d}.safetensors"


class RunDirectory:
    """The files of one run. ``resume_step``: the step a resumed run continues after (its metric rows
    beyond that step are dropped, since the resumed run writes them again).

    ``accelerator``: the run's ``Accelerator`` when it has one (only its process rank is used).
    Under several processes only the main one creates and writes the directory; if creating it fails
    there, every process raises the error. ``keep_checkpoints``: keep only the newest N checkpoints
    (0: all; the phase's final checkpoint is always the newest).
    """

    def __init__(self, path: Path, cfg: RunConfig, *, resume_step: int | None = None, overwrite: bool = False,
                 accelerator=None, keep_checkpoints: int = 0) -> None:
        self.path, self.keep_checkpoints = Path(path), keep_checkpoints
        self.is_main = process_state().is_main_process
        on_main(self._create, cfg, resume_step, overwrite)
        self.sinks = MultiSink([])
        if self.is_main:
            self.sinks = build_sinks(self.path, cfg.tracking.report_to, accelerator,
                                     purge_step=None if resume_step is None else resume_step + 1,
                                     project=cfg.name, config=_flatten(to_dict(cfg)))

    def _create(self, cfg: RunConfig, resume_step: int | None, overwrite: bool) -> None:
        prepare_run_dir(self.path, cfg, resuming=resume_step is not None, overwrite=overwrite)
        if resume_step is not None:
            for note in clean_stale(self.path):
                print(f"[resume] {self.path.name}: {note}", file=sys.stderr)
            truncate_after(self.path / "metrics.jsonl", resume_step)

    def log(self, row: dict, step: int) -> None:
        self.sinks.log(row, step)

    def save(self, step: int, *, model, tokenizer, optimizer, scheduler, instruments: dict[str, torch.Tensor],
             snapshot: bool, model_state: dict | None = None, optimizer_state: dict | None = None,
             extra: dict | None = None) -> Path:
        """A checkpoint at ``step`` (and, with ``snapshot``, the instrument state as a report snapshot).
        ``instruments`` (and, for a sharded model, ``model_state`` / ``optimizer_state``) are computed on
        every process beforehand (collectives); only the main process writes."""
        path = checkpoint_dir(self.path, step)
        if self.is_main:
            save_checkpoint(path, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
                            step=step, instruments=instruments, model_state=model_state,
                            optimizer_state=optimizer_state, extra=extra)
            if snapshot and instruments:  # the same bytes as the checkpoint's copy: a hard link, not a second file
                link_or_copy(path / INSTRUMENTS_FILE, snapshot_path(self.path, step))
            prune_checkpoints(self.path, self.keep_checkpoints, protect=(path,))
        return path

    def record(self, **fields) -> None:
        """Merge ``fields`` into ``RUN/run_info.json`` (main process only; ``started`` is kept from
        the first session of a resumed run)."""
        if not self.is_main:
            return
        path = self.path / RUN_INFO
        info = json.loads(path.read_text()) if path.is_file() else {}
        if "started" in info:
            fields.pop("started", None)
        info.update(fields)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        tmp.replace(path)

    def close(self) -> None:
        self.sinks.close()
