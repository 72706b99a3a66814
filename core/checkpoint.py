"""Checkpoints: an HF model directory plus everything needed to resume exactly.

Layout of ``RUN/checkpoints/step_{N:07d}/``::

    config.json, model.safetensors      save_pretrained (loadable with from_pretrained)
    tokenizer files                     tokenizer.save_pretrained
    trainer_state.pt                    step, optimizer, scheduler, RNG states
    instruments.safetensors             InstrumentSuite.state_dict() (sums and counts)

A checkpoint is written to a temporary directory and renamed into place, so an interrupted save
never leaves a directory that looks complete.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "trainer_state.pt"
INSTRUMENTS_FILE = "instruments.safetensors"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def is_complete(path: Path) -> bool:
    """A checkpoint whose save finished (the trainer state is written last, then renamed into place)."""
    return (Path(path) / STATE_FILE).is_file()


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((Path(run_dir) / "checkpoints").glob("step_*"))
    complete = [p for p in found if is_complete(p)]
    return complete[-1] if complete else None


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``tensors`` as safetensors atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)
    return path


def save_checkpoint(path: Path, *, model, tokenizer, optimizer, scheduler, step: int,
                    instruments: dict[str, torch.Tensor] | None = None, extra: dict | None = None) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if instruments:
        save_file({k: v.contiguous() for k, v in instruments.items()}, str(tmp / INSTRUMENTS_FILE))
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_state(), **(extra or {})}, tmp / STATE_FILE)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def load_trainer_state(path: Path) -> dict:
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE}); "
                                f"pass a directory under RUN/checkpoints/ written by `harness run`")
    return torch.load(path / STATE_FILE, weights_only=False)


def load_instruments(path: Path) -> dict[str, torch.Tensor] | None:
    file = Path(path) / INSTRUMENTS_FILE
    return load_file(str(file)) if file.is_file() else None
