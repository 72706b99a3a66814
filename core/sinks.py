"""Metric sinks: where a logged row goes while training runs, and how reports read it back.

A row is a flat ``{key: float}`` dict with slash-namespaced keys (``train/loss``, ``rsf_in/L3/q``)
plus an optional ``phase`` string. Every sink receives the same rows:

* ``jsonl``       -> ``RUN/metrics.jsonl``: one JSON object per logged step, appended and flushed
                     at once (``tail -f`` shows it live; a crash loses at most the row in flight).
                     Non-finite floats are written as ``null`` so the file stays strict JSON.
* ``tensorboard`` -> ``RUN/tb/``: one scalar per key, tag = key.
* anything else   -> an accelerate tracker of that name (``wandb``, ``mlflow``, ``comet_ml``,
                     ``aim``, ``clearml``, ``dvclive``, ``swanlab``, ``trackio``), created from
                     accelerate's tracker classes directly, so every trainer (ours and TRL's) can
                     use it; its package must be installed (checked before the run directory exists).

A resumed run passes ``purge_step`` (the first step it will write again): TensorBoard then drops
the events at and after it from the earlier session, so no step appears twice.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

FILE = "metrics.jsonl"
TB_DIR = "tb"


class JsonlSink:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, row: dict[str, Any], step: int) -> None:
        clean = {"step": int(step), **{k: json_safe(v) for k, v in row.items()}}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardSink:
    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 (tensorboard is optional)

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log(self, row: dict[str, Any], step: int) -> None:
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class AccelerateTrackerSink:
    """Forwards rows to one of accelerate's tracker classes (``wandb``, ``mlflow``, ...), created
    here as ``Accelerator.init_trackers`` would, but without needing the trainer's ``Accelerator``.
    Offline use: each tracker's own switches (``WANDB_MODE=offline``, ``MLFLOW_TRACKING_URI=file:DIR``, ...)."""

    def __init__(self, name: str, project: str, logging_dir: Path, config: dict | None = None) -> None:
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS  # noqa: PLC0415 (only when a tracker is asked for)

        cls = LOGGER_TYPE_TO_CLASS[name]
        self.tracker = cls(project, str(logging_dir)) if cls.requires_logging_directory else cls(project)
        getattr(self.tracker, "start", lambda: None)()  # accelerate >= 1.2 starts trackers lazily
        if config:
            self.tracker.store_init_configuration(config)

    def log(self, row: dict[str, Any], step: int) -> None:
        numbers = {k: v for k, v in row.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        self.tracker.log(numbers, step=step)

    def close(self) -> None:
        self.tracker.finish()


class MultiSink:
    def __init__(self, sinks: list) -> None:
        self.sinks = sinks

    def log(self, row: dict[str, Any], step: int) -> None:
        for sink in self.sinks:
            sink.log(row, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def tracker_names(report_to: list[str]) -> list[str]:
    """The ``report_to`` entries that are accelerate trackers (not ``jsonl`` / ``tensorboard``)."""
    return [n for n in report_to if n not in ("jsonl", "tensorboard")]


def tracker_problems(report_to: list[str]) -> list[str]:
    """Why a ``tracking.report_to`` entry cannot be used here (unknown name, package not installed);
    empty when every entry works. Cheap: imports nothing of the trackers themselves."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers  # noqa: PLC0415

    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    problems = []
    for name in tracker_names(report_to):
        if name not in LOGGER_TYPE_TO_CLASS:
            problems.append(f"{name!r} is not a tracker; choose from ['jsonl', 'tensorboard', "
                            f"{', '.join(repr(n) for n in sorted(LOGGER_TYPE_TO_CLASS) if n != 'tensorboard')}]")
        elif name not in available:
            problems.append(f"{name!r} needs its package, which is not installed (pip install {name})")
    return problems


def build_sinks(run_dir: Path, report_to: list[str], accelerator=None, purge_step: int | None = None,
                project: str | None = None, config: dict | None = None) -> MultiSink:
    """Sinks named in ``tracking.report_to``. Only the main process writes; others get no sinks.
    ``purge_step``: a resumed run's first step (see the module docstring). ``project`` (default: the
    directory's name) and ``config`` (flat ``{key: value}``, stored as the run's hyperparameters) go
    to the accelerate trackers."""
    run_dir = Path(run_dir)
    if accelerator is not None and not accelerator.is_main_process:
        return MultiSink([])
    problems = tracker_problems(report_to)
    if problems:
        raise ValueError(f"tracking.report_to: {'; '.join(problems)}")
    sinks: list = []
    if "jsonl" in report_to:
        sinks.append(JsonlSink(run_dir / FILE))
    if "tensorboard" in report_to:
        sinks.append(TensorBoardSink(run_dir / TB_DIR, purge_step=purge_step))
    for name in tracker_names(report_to):
        params = {k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
                  for k, v in (config or {}).items()}
        sinks.append(AccelerateTrackerSink(name, project=project or run_dir.name, logging_dir=run_dir / "trackers",
                                           config=params))
    return MultiSink(sinks)


def truncate_after(path: Path, step: int) -> None:
    """Drop rows with ``step > step`` (a resumed run rewrites them), keeping the file otherwise intact.
    A last line cut mid-write (what a crash leaves) is dropped too; a damaged line before it is an
    error naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        return
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # the row being written when the run stopped
                print(f"[resume] {path}: dropped its last line, cut mid-write ({err.msg})", file=sys.stderr)
                break
            raise ValueError(f"{path}:{number}: not a JSON object ({err.msg}); only the last line of a metrics file "
                             "can be cut by a crash: repair or remove that line, then resume") from None
        if isinstance(row, dict) and row.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(path)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` (``null`` read back as NaN), with line numbers in errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}; was the run started with tracking.report_to: [jsonl]?")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{i}: not a JSON object ({err}); the file may have been cut mid-write") from err
        rows.append({k: (math.nan if v is None else v) for k, v in row.items()})
    return rows


def read_tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files under ``log_dir``: ``{tag: [(step, value), ...]}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: PLC0415

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def json_safe(value: Any) -> Any:
    """``value`` ready for strict JSON: non-finite floats become ``null`` (read back as NaN by
    ``read_metrics``), 0-d tensors and numpy scalars their Python value; dicts, lists and tuples
    recursively; everything else as it is (so ``json.dumps`` still refuses an array)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # 0-d tensors / numpy scalars
        return json_safe(value.item())
    return value
