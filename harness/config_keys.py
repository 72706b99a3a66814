"""``harness keys``: every recipe key with its type, default and help.

Built from the config dataclasses themselves (``weightgeom.core.config``,
``weightgeom.hooks.suite.SuiteConfig``), so the list cannot drift from what the loader accepts; the help
is each field's ``metadata["help"]`` (``field(default=..., metadata={"help": "..."})``), empty where a
field has none. Alignment objectives are listed per ``loss``.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from weightgeom.core.config import OBJECTIVES, RunConfig


def field_help(f: dataclasses.Field) -> str:
    """The help a config field carries in its metadata (empty when it has none)."""
    return f.metadata.get("help", "")


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
    """``[(dotted key, type, default, help)]`` for every leaf field of ``cls`` (sections recursed)."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        section = tp if dataclasses.is_dataclass(tp) else (inner[0] if len(inner) == 1 and
                                                           dataclasses.is_dataclass(inner[0]) else None)
        if f.name == "objectives":  # one dataclass per loss: listed per loss by format_keys
            rows.append((f"{prefix}{f.name}", "list of objectives", [o.name for o in _default(f)], field_help(f)))
            continue
        if section is not None:
            if section is not tp:
                rows.append((f"{prefix}{f.name}", _type_text(tp), None,
                             " ".join(filter(None, [field_help(f), "optional section: null = off"]))))
            rows += config_keys(section, f"{prefix}{f.name}.")
            continue
        rows.append((f"{prefix}{f.name}", _type_text(tp), _default(f), field_help(f)))
    return rows


def format_keys(filter_text: str | None = None) -> str:
    """The text ``harness keys [FILTER]`` prints."""
    lines = []
    rows = config_keys()
    for loss, cls in OBJECTIVES.items():
        rows += [(f"align.objectives[].{key}", tp, default, help_text + f" [loss: {loss}]")
                 for key, tp, default, help_text in config_keys(cls) if key != "loss"]
    seen = set()
    for key, tp, default, help_text in rows:
        if filter_text and filter_text not in key:
            continue
        if (key, help_text) in seen:
            continue
        seen.add((key, help_text))
        text = f"{key}  ({tp}, default {default!r})"
        lines.append(text + (f"\n      {help_text}" if help_text else ""))
    return "\n".join(lines)
