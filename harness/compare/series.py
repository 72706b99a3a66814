"""``compare_series``: the trajectory of a run someone already has, from its saved checkpoints.

``harness compare series CK1 CK2 CK3 ...`` (an ordered list, taken in the given order) or
``harness compare series DIR`` (a folder holding checkpoints, or a run whose ``checkpoints/`` does, ordered by
the number in each folder's name: ``step_N``, ``checkpoint-N``, ``stepN``, ... ; a folder whose name holds no
number, or two with the same number, is an error naming them). For every checkpoint after the first:

* the **cumulative** delta, from the first checkpoint: exactly ``compare(first, ck, options)``;
* the **incremental** delta, from the previous checkpoint: ``compare(previous, ck, options)`` (for the second
  checkpoint both are the same delta).

Each checkpoint is loaded once and measured once (``C_a`` on text by each delta's BASE, the mechanism's
``C_delta`` on each checkpoint); at most three models are in memory (the first, the previous, the current).
"""

from __future__ import annotations

import gc
import re
from pathlib import Path

import torch

from weightgeom.harness.compare.analysis import (
    Checkpoint,
    Measurements,
    check_text,
    compare_models,
    load_model,
    mass_of_checkpoint,
    pick_device,
    resolved,
)
from weightgeom.harness.compare.options import CompareOptions
from weightgeom.harness.compare.report import write_series_report
from weightgeom.harness.compare.result import SeriesResult, SeriesRow

_NAMED_STEP = re.compile(r"(?:step|checkpoint|ckpt|iter|global_step)[_-]?(\d+)", re.IGNORECASE)


def step_of(name: str) -> int | None:
    """The step a checkpoint folder's name gives: the number after ``step``, ``checkpoint``, ``ckpt``, ``iter``
    (``step_0000030``, ``checkpoint-500``, ``step1000``, ``stage1-step1000-tokens4B``), else the name's only
    number; None when it holds none or several without such a word."""
    found = _NAMED_STEP.search(name)
    if found is not None:
        return int(found.group(1))
    numbers = re.findall(r"\d+", name)
    return int(numbers[0]) if len(numbers) == 1 else None


def series_checkpoints(checkpoints: list[str | Path] | str | Path) -> list[Path]:
    """The ordered checkpoint directories of a series: a list of two or more (kept in its order; ``.gguf``
    files and short names resolved), or one folder holding them (or a run folder whose ``checkpoints/`` does),
    ordered by :func:`step_of`."""
    items = [checkpoints] if isinstance(checkpoints, (str, Path)) else list(checkpoints)
    if not items:
        raise ValueError("series: no checkpoints given; pass two or more checkpoint directories, or one folder "
                         "holding them")
    if len(items) > 1:
        paths = [resolved(f"series checkpoint {i + 1}", p) for i, p in enumerate(items)]
        seen: dict[Path, int] = {}
        for i, p in enumerate(paths):
            if p.resolve() in seen:
                raise ValueError(f"series: checkpoint {i + 1} ({p}) is the same as checkpoint {seen[p.resolve()] + 1}")
            seen[p.resolve()] = i
        return paths
    folder = Path(items[0])
    if not folder.is_dir():
        raise FileNotFoundError(f"series: {folder} is not a directory; pass a folder of checkpoints, or two or more "
                                "checkpoint directories in order")
    if (folder / "config.json").is_file():
        raise ValueError(f"series: {folder} is one checkpoint; a series needs two or more (a list in order, or a "
                         "folder holding them)")
    search = folder / "checkpoints" if (folder / "checkpoints").is_dir() else folder
    found = sorted(p for p in search.iterdir()
                   if p.is_dir() and not p.name.endswith(".tmp") and (p / "config.json").is_file())
    if len(found) < 2:
        raise ValueError(f"series: {search} holds {len(found)} checkpoint folder(s) (with config.json); a series "
                         "needs two or more")
    unnumbered = [p.name for p in found if step_of(p.name) is None]
    if unnumbered:
        raise ValueError(f"series: the order of the checkpoints in {search} is ambiguous: {', '.join(unnumbered)} "
                         "holds no step number (step_N, checkpoint-N); pass the checkpoints in order instead")
    by_step: dict[int, list[str]] = {}
    for p in found:
        by_step.setdefault(step_of(p.name), []).append(p.name)
    clashes = [names for names in by_step.values() if len(names) > 1]
    if clashes:
        raise ValueError(f"series: the order of the checkpoints in {search} is ambiguous: {', '.join(clashes[0])} "
                         "give the same step; pass the checkpoints in order instead")
    return sorted(found, key=lambda p: step_of(p.name))


def compare_series(checkpoints: list[str | Path] | str | Path, options: CompareOptions | None = None, *,
                   device: str | torch.device | None = None, out_dir: str | Path | None = None,
                   progress: bool = False, **overrides) -> SeriesResult:
    """Cumulative and incremental deltas of an ordered series of checkpoints (:func:`series_checkpoints`).

    Every row's ``cumulative`` result equals ``compare(first, checkpoint, options)`` and ``incremental`` equals
    ``compare(previous, checkpoint, options)``. ``out_dir``: ``report.md`` (a table per role), ``series.jsonl``
    (one row per checkpoint and kind) and one trajectory plot per role."""
    options = (options or CompareOptions()).replace(**overrides)
    device = pick_device(device)
    check_text(options)
    paths = series_checkpoints(checkpoints)
    steps = [step_of(p.name) for p in paths]
    measurements = Measurements(device)
    first = load_model("series checkpoint 1", paths[0], device)
    series = SeriesResult([str(p) for p in paths], steps, [])
    if options.mass:
        series.first_mass = mass_of_checkpoint(Checkpoint("AFTER", first, paths[0]), options, measurements)
    previous = first
    for i, path in enumerate(paths[1:], 1):
        if progress:
            print(f"[compare series] {i + 1}/{len(paths)}: {path}", flush=True)
        current = load_model(f"series checkpoint {i + 1}", path, device)
        after = Checkpoint("AFTER", current, path)
        cumulative = compare_models(Checkpoint("BASE", first, paths[0]), after, options, measurements)
        incremental = cumulative if i == 1 else compare_models(Checkpoint("BASE", previous, paths[i - 1]), after,
                                                               options, measurements)
        series.rows.append(SeriesRow(i, str(path), steps[i], cumulative, incremental))
        if previous is not first:
            del previous
            gc.collect()
        previous = current
    if out_dir is not None:
        write_series_report(series, out_dir)
    return series
