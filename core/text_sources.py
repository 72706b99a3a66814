"""Local text sources streamed one document at a time, for corpora larger than memory.

The sources and document rules of every text input (`weightgeom.core.data.load_texts` collects them in memory;
`weightgeom.core.shards` streams them):

- `"stdlib"`: one document per stdlib `.py` file (`weightgeom.core.tokenizer.stdlib_text_files`);
- `.txt`: one document per file (the whole file, read with universal newlines);
- `.jsonl`: one document per line, from key `text_field` (read line by line);
- `.json`: a list of objects (read whole: prefer .jsonl for large corpora) or JSON lines;
- `.parquet`: one document per row of column `text_field` (read in record batches);
- a directory: every file above under it, recursively, sorted by path.

Missing values and whitespace-only documents are dropped. A single document is held whole (it
is tokenized in one call), so one enormous document needs memory of its own size; many
documents never do.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from weightgeom.core.tokenizer import stdlib_text_files

TABLE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # -> the `datasets` builder
TEXT_EXTENSIONS = (".txt", *TABLE_FORMATS)

_NON_SPACE = re.compile(r"\S")
_PARQUET_BATCH = 1024  # rows per parquet record batch: bounded memory, few Python round trips


@dataclass(frozen=True)
class SourceFile:
    """One file to read: `kind` is the reader (`txt` also serves stdlib `.py` files)."""

    path: Path
    kind: str  # "txt" | "jsonl" | "json" | "parquet"

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def source_list(sources: str | Sequence[str]) -> list[str]:
    """`sources` as a non-empty list of strings (a single string is one source)."""
    items = [sources] if isinstance(sources, (str, Path)) else list(sources)
    if not items:
        raise ValueError("no text source given; pass 'stdlib', local files or directories.")
    return [str(item) for item in items]


def resolve_sources(sources: str | Sequence[str]) -> list[SourceFile]:
    """The files behind `sources`, in reading order; errors name the source and the fix."""
    files: list[SourceFile] = []
    for item in source_list(sources):
        if item == "stdlib":
            files.extend(SourceFile(p, "txt") for p in stdlib_text_files())
            continue
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(
                f"text source {item!r} does not exist; use 'stdlib', a local file or a directory."
            )
        if path.is_dir():
            if (path / "index.json").is_file():
                raise ValueError(
                    f"{item!r} is a prepared token corpus (it has index.json), not text: pass it alone as "
                    "data.source to train on it, or pass the text it was prepared from."
                )
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_EXTENSIONS)
            if not found:
                raise ValueError(f"directory {item!r} holds no {'/'.join(TEXT_EXTENSIONS)} files.")
            files.extend(SourceFile(p, _kind(p)) for p in found)
        else:
            files.append(SourceFile(path, _kind(path)))
    return files


def _kind(path: Path) -> str:
    if path.suffix not in TEXT_EXTENSIONS:
        raise ValueError(f"{path}: unknown extension {path.suffix!r}; supported: {', '.join(TEXT_EXTENSIONS)}.")
    return path.suffix[1:]


def source_signature(files: Sequence[SourceFile]) -> list[list[Any]]:
    """`[absolute path, size, mtime_ns]` per file: what a cache of derived data must be keyed on."""
    out = []
    for f in files:
        stat = f.path.stat()
        out.append([str(f.path.resolve()), stat.st_size, stat.st_mtime_ns])
    return out


def iter_documents(
    files: Sequence[SourceFile], text_field: str = "text", on_bytes: Callable[[int], None] | None = None
) -> Iterator[str]:
    """Non-empty documents of `files` in order; `on_bytes(n)` reports source bytes consumed (progress)."""
    report = on_bytes or (lambda n: None)
    readers = {"txt": _read_txt, "jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet}
    for f in files:
        for text in readers[f.kind](f.path, text_field, report):
            if text is not None and _NON_SPACE.search(text):
                yield text


def _read_txt(path: Path, text_field: str, report: Callable[[int], None]) -> Iterator[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    report(path.stat().st_size)
    yield text


def _read_jsonl(path: Path, text_field: str, report: Callable[[int], None]) -> Iterator[str | None]:
    seen_row = False
    with path.open("rb") as fh:
        for line_no, line in enumerate(fh, start=1):
            report(len(line))
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {line_no} is not valid JSON ({err}).") from err
            except UnicodeDecodeError as err:  # json.loads decodes bytes itself
                raise ValueError(f"{path}: line {line_no} is not UTF-8 text ({err.reason} at byte {err.start}); "
                                 "save the file as UTF-8.") from None
            yield _row_text(row, path, f"line {line_no}", text_field, first=not seen_row)
            seen_row = True


def _read_json(path: Path, text_field: str, report: Callable[[int], None]) -> Iterator[str | None]:
    with path.open("rb") as fh:
        head = fh.read(4096).lstrip()
    if head.startswith(b"{"):  # JSON lines in a .json file, as `datasets` also accepts
        yield from _read_jsonl(path, text_field, report)
        return
    try:
        rows = json.loads(path.read_bytes())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: could not read as JSON ({err}).") from err
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list of objects (one per document) or JSON lines, "
                         f"got a top-level {type(rows).__name__}.")
    report(path.stat().st_size)
    for i, row in enumerate(rows):
        yield _row_text(row, path, f"row {i}", text_field, first=i == 0)


def _row_text(row: Any, path: Path, where: str, text_field: str, first: bool) -> str | None:
    if not isinstance(row, dict):
        raise ValueError(f"{path}: {where}: expected a JSON object, got {type(row).__name__}.")
    if first and text_field not in row:
        raise ValueError(
            f"{path}: no column {text_field!r}; available columns: {sorted(row)}. Set text_field."
        )
    value = row.get(text_field)  # absent in a later row: a missing value, dropped like None
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{path}: {where}: column {text_field!r} holds {type(value).__name__}, expected a string.")
    return value


def _read_parquet(path: Path, text_field: str, report: Callable[[int], None]) -> Iterator[str | None]:
    try:
        pfile = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: could not read as parquet: {err}") from err
    schema = pfile.schema_arrow
    if text_field not in schema.names:
        raise ValueError(f"{path}: no column {text_field!r}; available columns: {schema.names}. Set text_field.")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)
            or getattr(pa.types, "is_string_view", lambda t: False)(kind)):
        raise ValueError(f"{path}: column {text_field!r} has type {kind}, expected strings.")
    for batch in pfile.iter_batches(batch_size=_PARQUET_BATCH, columns=[text_field]):
        yield from batch.column(0).to_pylist()
    report(path.stat().st_size)
