"""Checkpoints: an HF model directory plus everything needed to resume exactly.

Layout of ``RUN/checkpoints/step_{N:07d}/``::

    config.json, model.safetensors      save_pretrained (loadable with from_pretrained)
    tokenizer files                     tokenizer.save_pretrained
    trainer_state.pt                    step, optimizer, scheduler, RNG states
    instruments.safetensors             InstrumentSuite.state_dict() (sums and counts)
    MANIFEST.json                       written last: every other file with its size

Crash safety: a checkpoint is written into ``step_N.tmp/``, every file is flushed to disk, the
manifest is written last, and only then is the directory renamed to ``step_N``. A checkpoint counts
as complete only when its name is exactly ``step_{N:07d}`` and its manifest lists files that all
exist with the listed sizes, so a save killed at any point (even SIGKILL) is never resumed from.
:func:`clean_stale` removes what such a save left behind (``.tmp`` / ``.old`` directories), or
finishes it when only the final rename was missing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

STATE_FILE = "trainer_state.pt"
INSTRUMENTS_FILE = "instruments.safetensors"
MANIFEST_FILE = "MANIFEST.json"
MANIFEST_FORMAT = 1
_NAME = re.compile(r"^step_(\d{7,})$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def checkpoint_step(path: Path) -> int | None:
    """The step of a directory named ``step_{N:07d}``, else None (``step_N.tmp`` is not a checkpoint)."""
    found = _NAME.match(Path(path).name)
    return int(found.group(1)) if found else None


def manifest_problem(path: Path, *, legacy: bool = True) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None when it is.

    Complete: ``MANIFEST.json`` parses and every file it lists exists with the listed size. With
    ``legacy``, a final ``step_N`` directory written before manifests existed (no ``MANIFEST.json``;
    such saves were renamed into place only after ``trainer_state.pt`` was written) counts as
    complete when that file is non-empty; a ``.tmp`` directory never does (its save may have been cut
    anywhere, also inside ``trainer_state.pt``).
    """
    path = Path(path)
    if not path.is_dir():
        return "not a directory"
    manifest = path / MANIFEST_FILE
    if not manifest.is_file():
        state = path / STATE_FILE
        if legacy and checkpoint_step(path) is not None and state.is_file() and state.stat().st_size > 0:
            return None  # legacy checkpoint
        return f"no {MANIFEST_FILE} (the save did not finish)"
    try:
        listed = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError) as err:
        return f"unreadable {MANIFEST_FILE} ({err})"
    if STATE_FILE not in listed:
        return f"{MANIFEST_FILE} does not list {STATE_FILE}"
    for name, size in listed.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {size}"
    return None


def is_complete(path: Path) -> bool:
    """A checkpoint whose save finished (see :func:`manifest_problem`)."""
    return checkpoint_step(path) is not None and manifest_problem(path) is None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of ``run_dir``, oldest first (by step, not by name)."""
    found = [p for p in (Path(run_dir) / "checkpoints").glob("step_*") if is_complete(p)]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def clean_stale(run_dir: Path) -> list[str]:
    """Finish or remove what an interrupted save left in ``run_dir/checkpoints``; returns what was done.

    ``step_N.tmp`` with a valid manifest and no ``step_N`` (killed between manifest and rename) is
    renamed into place; any other ``.tmp`` or ``.old`` directory is deleted.
    """
    done = []
    ckpts = Path(run_dir) / "checkpoints"
    if not ckpts.is_dir():
        return done
    for leftover in sorted(ckpts.glob("step_*.tmp")) + sorted(ckpts.glob("step_*.old")):
        final = leftover.with_name(leftover.name.rsplit(".", 1)[0])
        if (not final.exists() and checkpoint_step(final) is not None
                and manifest_problem(leftover, legacy=False) is None):  # only a save that wrote its manifest
            leftover.rename(final)
            done.append(f"completed {final.name} (its save was interrupted before the final rename)")
        else:
            shutil.rmtree(leftover, ignore_errors=True)
            done.append(f"removed {leftover.name} (left by an interrupted save)")
    return done


def prune_checkpoints(run_dir: Path, keep: int, protect: tuple[Path, ...] = ()) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints (``keep`` < 1 keeps all); paths in
    ``protect`` are never deleted. Returns the deleted paths."""
    if keep < 1:
        return []
    protected = {Path(p).resolve() for p in protect}
    old = [p for p in list_checkpoints(run_dir)[:-keep] if p.resolve() not in protected]
    for path in old:
        trash = path.with_name(path.name + ".old")  # renamed first: a half-deleted dir is never "complete"
        path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    return old


def rng_state() -> dict:
    """Every RNG's state as tensors and plain Python values (what ``torch.load(weights_only=True)`` reads)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _default_mode() -> int:
    """``0o666`` less the process umask: the mode ``open()`` gives a new file (safetensors and
    transformers write through private temporary files, which leaves 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories; the rename is still atomic
        _fsync(path)


def link_or_copy(source: Path, target: Path) -> Path:
    """``target`` as a hard link to ``source`` (no second copy on disk), else a copy; atomic."""
    source, target = Path(source), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # another filesystem, or links not supported
        shutil.copyfile(source, tmp)
        os.chmod(tmp, _default_mode())
    tmp.replace(target)
    return target


def write_manifest(path: Path, step: int) -> None:
    """Flush every file under ``path`` to disk, then list them (with sizes) in ``MANIFEST.json``."""
    path = Path(path)
    mode = _default_mode()
    files = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        os.chmod(file, mode)
        _fsync(file)
        files[file.relative_to(path).as_posix()] = file.stat().st_size
    manifest = path / MANIFEST_FILE
    manifest.write_text(json.dumps({"format": MANIFEST_FORMAT, "step": step, "files": files}, indent=1),
                        encoding="utf-8")
    _fsync(manifest)
    _fsync_dir(path)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions, a vanished directory); nothing
    half-written is left, the earlier checkpoints are untouched."""


def save_checkpoint(path: Path, *, model, tokenizer, optimizer, scheduler, step: int,
                    instruments: dict[str, torch.Tensor] | None = None, extra: dict | None = None,
                    model_state: dict | None = None, optimizer_state: dict | None = None) -> Path:
    """Write a complete checkpoint at ``path`` (see the module docstring for the crash-safety order).
    ``model_state`` / ``optimizer_state``: whole state dicts gathered beforehand from a sharded model
    (core/sharding.py), written instead of the model's and optimizer's own. ``extra``: more trainer
    state (tensors and plain values only: it is read back with ``weights_only``). A failed write
    raises :class:`CheckpointWriteError` naming the path and removes the partial ``.tmp``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True, state_dict=model_state)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if instruments:
            save_file({k: v.contiguous() for k, v in instruments.items()}, str(tmp / INSTRUMENTS_FILE))
        optimizer_state = optimizer_state if optimizer_state is not None else optimizer.state_dict()
        torch.save({"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                    "rng": rng_state(), **(extra or {})}, tmp / STATE_FILE)
        write_manifest(tmp, step)
    except (OSError, RuntimeError, SafetensorError) as err:  # torch reports a full disk as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(errno_of(err), f"could not write the checkpoint of step {step} ({describe(err)}); "
                                   "nothing half-written was kept and earlier checkpoints are untouched: free space "
                                   "(or fix the permissions) there, then continue with --resume latest",
                                   str(path)) from err
    if path.exists():  # a re-save of the same step: move the old one aside, never delete it first
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)
    _fsync_dir(path.parent)
    return path


def errno_of(err: BaseException) -> int:
    """The errno of an OSError, else the one a full disk gives (what torch's write errors mostly are)."""
    return err.errno if isinstance(err, OSError) and err.errno else errno.ENOSPC


def describe(err: BaseException) -> str:
    """One line for an I/O failure, without a library's traceback-style text."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:200]


def load_trainer_state(path: Path) -> dict:
    path = Path(path)
    problem = manifest_problem(path)
    if problem is not None:
        raise FileNotFoundError(f"{path} is not a complete checkpoint ({problem}); pass a directory under "
                                "RUN/checkpoints/ written by `harness run`, or --resume latest")
    try:
        # tensors and plain data only: a pickle that names any other object (which could run code) is refused
        return torch.load(path / STATE_FILE, weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path / STATE_FILE} holds objects other than tensors and plain data, so loading it could "
                         "run code; refused. A checkpoint written by this version never does: this file was made by "
                         "something else (or by a version before 2026-12). Start a new run from the weights with "
                         f"init_from={path} (weights are read as safetensors, no code)") from None
    except (EOFError, RuntimeError, OSError) as err:
        raise ValueError(f"{path / STATE_FILE} cannot be read ({type(err).__name__}: {err}); the checkpoint is "
                         "damaged: delete it and resume from an earlier one") from err


def load_instruments(path: Path) -> dict[str, torch.Tensor] | None:
    file = Path(path) / INSTRUMENTS_FILE
    return load_file(str(file)) if file.is_file() else None
