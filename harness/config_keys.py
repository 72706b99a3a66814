"""``harness keys``: every recipe key with its type, default and the comment beside its field.

Built from the config dataclasses themselves (``weightgeom.core.config``,
``weightgeom.hooks.suite.SuiteConfig``), so the list cannot drift from what the loader accepts.
Alignment objectives are listed per ``loss``.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import Any

from weightgeom.core.config import OBJECTIVES, RunConfig

_FIELD_COMMENT = re.compile(r"^\s+(\w+):[^#\n]*#\s*(.+)$")


def _comments(cls: type) -> dict[str, str]:
    """``{field: its trailing source comment}`` for a dataclass (empty when the source is unavailable)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2).strip() for m in map(_FIELD_COMMENT.match, source.splitlines()) if m}


def _type_text(tp: Any) -> str:
    text = str(tp).replace("typing.", "")
    return getattr(tp, "__name__", text) if not typing.get_args(tp) else text


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return "(required)"


def config_keys(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """``[(dotted key, type, default, comment)]`` for every leaf field of ``cls`` (sections recursed)."""
    rows = []
    hints = typing.get_type_hints(cls)
    comments = _comments(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        section = tp if dataclasses.is_dataclass(tp) else (inner[0] if len(inner) == 1 and
                                                           dataclasses.is_dataclass(inner[0]) else None)
        if f.name == "objectives":
            rows.append((f"{prefix}{f.name}", "list of objectives", [o.name for o in _default(f)],
                         "one alignment run per entry, each a mapping with name, loss and that loss's keys "
                         "(align.objectives[].* below)"))
            continue
        if section is not None:
            if section is not tp:
                rows.append((f"{prefix}{f.name}", _type_text(tp), None,
                             " ".join(filter(None, [comments.get(f.name), "optional section: null = off"]))))
            rows += config_keys(section, f"{prefix}{f.name}.")
            continue
        rows.append((f"{prefix}{f.name}", _type_text(tp), _default(f), comments.get(f.name, "")))
    return rows


def format_keys(filter_text: str | None = None) -> str:
    """The text ``harness keys [FILTER]`` prints."""
    lines = []
    rows = config_keys()
    for loss, cls in OBJECTIVES.items():
        rows += [(f"align.objectives[].{key}", tp, default, comment + (f" [loss: {loss}]"))
                 for key, tp, default, comment in config_keys(cls) if key != "loss"]
    seen = set()
    for key, tp, default, comment in rows:
        if filter_text and filter_text not in key:
            continue
        if (key, comment) in seen:
            continue
        seen.add((key, comment))
        text = f"{key}  ({tp}, default {default!r})"
        lines.append(text + (f"\n      {comment}" if comment else ""))
    return "\n".join(lines)
