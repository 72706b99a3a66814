"""Creating a run directory: only after every input has been validated and built."""

from __future__ import annotations

import shutil
from pathlib import Path

from harness.config import RunConfig, save_config


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
