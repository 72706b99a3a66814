"""A run's output directory: created only after every input has been validated and built.

    RUN/config.yaml, metrics.jsonl, tb/, instruments/step_N.safetensors, checkpoints/step_N/

:class:`RunDirectory` owns everything a trainer writes there (the resolved config, the metric sinks,
checkpoints and instrument snapshots). Under several processes only the main one writes; the others
get the same object with writing switched off, so trainers call it unconditionally.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from core.checkpoint import checkpoint_dir, save_checkpoint, save_tensors
from core.config import RunConfig, save_config
from core.processes import on_main, process_state
from core.sinks import MultiSink, build_sinks, truncate_after

SNAPSHOT_DIR = "instruments"


def prepare_run_dir(run_dir: Path, cfg: RunConfig, *, resuming: bool = False, overwrite: bool = False) -> Path:
    """Create ``run_dir`` and write the resolved config. An existing non-empty directory is an error
    unless ``overwrite`` (replace it) or ``resuming`` (continue it)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()) and not resuming:
        if not overwrite:
            raise FileExistsError(f"{run_dir} already holds a run: pass --overwrite to replace it, "
                                  f"--resume to continue it, or choose another name (name=...)")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    return run_dir


def snapshot_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR / f"step_{step:07d}.safetensors"


class RunDirectory:
    """The files of one run. ``resume_step``: the step a resumed run continues after (its metric rows
    beyond that step are dropped, since the resumed run writes them again).

    Under several processes only the main one creates and writes the directory; if creating it fails
    there, every process raises the error. ``accelerator``: the run's ``Accelerator`` when it has one
    (accelerate trackers in ``tracking.report_to`` log through it).
    """

    def __init__(self, path: Path, cfg: RunConfig, *, resume_step: int | None = None, overwrite: bool = False,
                 accelerator=None) -> None:
        self.path = Path(path)
        self.is_main = process_state().is_main_process
        on_main(self._create, cfg, resume_step, overwrite)
        self.sinks = build_sinks(self.path, cfg.tracking.report_to, accelerator) if self.is_main else MultiSink([])

    def _create(self, cfg: RunConfig, resume_step: int | None, overwrite: bool) -> None:
        prepare_run_dir(self.path, cfg, resuming=resume_step is not None, overwrite=overwrite)
        if resume_step is not None:
            truncate_after(self.path / "metrics.jsonl", resume_step)

    def log(self, row: dict, step: int) -> None:
        self.sinks.log(row, step)

    def save(self, step: int, *, model, tokenizer, optimizer, scheduler, instruments: dict[str, torch.Tensor],
             snapshot: bool) -> Path:
        """A checkpoint at ``step`` (and, with ``snapshot``, the instrument state as a report snapshot).
        ``instruments`` is the suite's snapshot state, computed on every process beforehand (a collective)."""
        path = checkpoint_dir(self.path, step)
        if self.is_main:
            save_checkpoint(path, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
                            step=step, instruments=instruments)
            if snapshot and instruments:
                save_tensors(snapshot_path(self.path, step), instruments)
        return path

    def close(self) -> None:
        self.sinks.close()
