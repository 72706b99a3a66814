"""Metric sinks: where a logged row goes while training runs, and how reports read it back.

A row is a flat ``{key: float}`` dict with slash-namespaced keys (``train/loss``, ``rsf_in/L3/q``)
plus an optional ``phase`` string. Every sink receives the same rows:

* ``jsonl``       -> ``RUN/metrics.jsonl``: one JSON object per logged step, appended and flushed
                     at once (``tail -f`` shows it live; a crash loses at most the row in flight).
                     Non-finite floats are written as ``null`` so the file stays strict JSON.
* ``tensorboard`` -> ``RUN/tb/``: one scalar per key, tag = key.
* anything else   -> an accelerate tracker of that name (``wandb``, ``mlflow``, ``aim``, ...),
                     initialised through the run's ``Accelerator``.
"""

from __future__ import annotations

import json
import math
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
        clean = {"step": int(step), **{k: _json_value(v) for k, v in row.items()}}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardSink:
    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 (tensorboard is optional)

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, row: dict[str, Any], step: int) -> None:
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class AccelerateTrackerSink:
    """Forwards rows to trackers registered on an ``Accelerator`` (``accelerator.log``)."""

    def __init__(self, accelerator, project: str, config: dict | None = None) -> None:
        self.accelerator = accelerator
        accelerator.init_trackers(project, config=config or {})

    def log(self, row: dict[str, Any], step: int) -> None:
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.accelerator.log(numbers, step=step)

    def close(self) -> None:
        self.accelerator.end_training()


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
    """The ``report_to`` entries that are accelerate trackers (``Accelerator(log_with=...)``)."""
    return [n for n in report_to if n not in ("jsonl", "tensorboard")]


def build_sinks(run_dir: Path, report_to: list[str], accelerator=None) -> MultiSink:
    """Sinks named in ``tracking.report_to``. Only the main process writes; others get no sinks.

    Names other than ``jsonl`` / ``tensorboard`` need an ``accelerator`` whose ``log_with`` lists
    them; trainers that run without accelerate reject them with an error naming the key.
    """
    run_dir = Path(run_dir)
    if accelerator is not None and not accelerator.is_main_process:
        return MultiSink([])
    sinks: list = []
    others = tracker_names(report_to)
    if "jsonl" in report_to:
        sinks.append(JsonlSink(run_dir / FILE))
    if "tensorboard" in report_to:
        sinks.append(TensorBoardSink(run_dir / TB_DIR))
    if others:
        if accelerator is None or not accelerator.log_with:
            raise ValueError(f"tracking.report_to lists {others}: these go through an accelerate tracker, which this "
                             "trainer cannot set up; use 'jsonl' and 'tensorboard' here")
        sinks.append(AccelerateTrackerSink(accelerator, project=run_dir.name))
    return MultiSink(sinks)


def truncate_after(path: Path, step: int) -> None:
    """Drop rows with ``step > step`` (a resumed run rewrites them), keeping the file otherwise intact."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


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


def _json_value(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):  # 0-d tensors / numpy scalars
        return _json_value(value.item())
    return value
