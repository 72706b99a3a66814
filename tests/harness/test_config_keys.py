"""`harness keys`: each key's help is read from its field's metadata (``field(metadata={"help": ...})``),
never from the source; a field without help gets none, and an optional section says null turns it off."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from weightgeom.core.config import TrainConfig
from weightgeom.harness.config_keys import config_keys, format_keys


@dataclass
class Section:
    documented: int = field(default=1, metadata={"help": "what it sets"})
    bare: int = 2  # a comment beside a field is not its help


@dataclass
class Top:
    section: Section = field(default_factory=Section)
    extra: Section | None = field(default=None, metadata={"help": "an extra section"})


def test_help_comes_from_the_field_metadata():
    rows = {key: (default, help_text) for key, _, default, help_text in config_keys(Top)}
    assert rows["section.documented"] == (1, "what it sets")
    assert rows["section.bare"] == (2, "")
    assert rows["extra"] == (None, "an extra section optional section: null = off")


def test_the_recipe_keys_print_their_fields_help():
    on_nonfinite = next(f for f in dataclasses.fields(TrainConfig) if f.name == "on_nonfinite")
    text = format_keys("train.on_nonfinite")
    assert text.splitlines()[1].strip() == on_nonfinite.metadata["help"]
    assert "one alignment run per entry" in format_keys("align.objectives")
