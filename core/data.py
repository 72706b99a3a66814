"""Data: text corpora, resumable batch order, and preference pairs (LM blocks: `weightgeom.core.shards`).

Everything reads local files or the embedded stdlib corpus; nothing is downloaded. Every random
choice uses its own seeded `torch.Generator`, never the global RNG, so data order does not depend
on (or disturb) model initialisation and resuming at step k reproduces the same batches.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import warnings
from bisect import bisect_right
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from weightgeom.core.text_sources import TABLE_FORMATS, iter_documents, resolve_sources, source_list

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")


# ---------------------------------------------------------------------------------------------
# Text corpora


def load_texts(source: str | list[str], text_field: str = "text", max_docs: int | None = None) -> list[str]:
    """Documents from `"stdlib"` and/or local files and directories, in a deterministic order, in memory
    (for the embedded preference set and text samples; pretraining corpora stream through weightgeom.core.shards).
    The sources and document rules are `weightgeom.core.text_sources`': one document per `.txt` file, per row of a
    `.jsonl` / `.json` / `.parquet` (column `text_field`), per stdlib `.py` file; directories recursively.
    Whitespace-only documents and missing values are dropped; `max_docs` keeps the first ones.
    """
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"max_docs must be >= 1 (or None for all), got {max_docs}.")
    texts = list(islice(iter_documents(resolve_sources(source), text_field), max_docs))
    if not texts:
        raise ValueError(
            f"corpus {source_list(source)} holds no non-empty text; check the files and text_field={text_field!r}."
        )
    return texts


def _read_rows(path: Path) -> tuple[list[dict], list[str]]:
    """The rows of a .json/.jsonl/.parquet file as dicts, and the column names (of the first row for
    JSON, of the schema for parquet)."""
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist.")
    if path.suffix not in TABLE_FORMATS:
        raise ValueError(f"{path}: unknown extension {path.suffix!r}; supported: {', '.join(TABLE_FORMATS)}.")
    if path.suffix in (".jsonl", ".json"):
        rows = _json_rows(path)
        return rows, list(rows[0]) if rows else []
    import pyarrow.parquet as pq  # noqa: PLC0415 (a dependency of datasets)

    try:
        table = pq.read_table(path)
    except Exception as err:  # noqa: BLE001 (pyarrow's own error types, re-raised as ValueError)
        raise ValueError(f"{path}: could not read as parquet ({err})") from None
    return table.to_pylist(), table.column_names


def _json_rows(path: Path) -> list[dict]:
    """The rows of a .jsonl / .json file: JSON lines (one object per line), a list of objects, or a
    columnar object of equal-length lists (``{"prompt": [...], "chosen": [...], ...}``). A UTF-8 byte
    order mark is accepted, as it is for corpora. Errors name the file and the line or row."""
    if path.suffix == ".json":
        try:
            whole = json.loads(path.read_text(encoding="utf-8-sig"))
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
        except json.JSONDecodeError:
            whole = None  # not one JSON document: JSON lines in a .json file, as datasets also reads them
        if isinstance(whole, list):
            bad = next((i for i, row in enumerate(whole) if not isinstance(row, dict)), None)
            if bad is not None:
                raise ValueError(f"{path}: row {bad} is a {type(whole[bad]).__name__}; expected a list of objects")
            return whole
        if isinstance(whole, dict):
            return _columnar_rows(whole, path)
        if whole is not None:
            raise ValueError(f"{path}: a top-level {type(whole).__name__}; expected a list of objects, an object of "
                             "columns, or JSON lines")
    check_jsonl(path)
    with path.open(encoding="utf-8-sig") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _columnar_rows(columns: dict, path: Path) -> list[dict]:
    """``{column: [values]}`` (every value a list, all of one length) as rows; one object of scalars is
    one row."""
    lists = {k: v for k, v in columns.items() if isinstance(v, list)}
    messages = any(isinstance(v[0], dict) for v in lists.values() if v)  # one conversational row, not columns
    if not lists or len(lists) < len(columns) or messages:
        return [columns]  # one object: a single row (JSON lines with one line)
    lengths = {k: len(v) for k, v in lists.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{path}: an object of columns whose lists differ in length ({lengths}); each column needs "
                         "one value per row")
    n = next(iter(lengths.values()))
    return [{k: v[i] for k, v in lists.items()} for i in range(n)]


def check_jsonl(path: Path) -> None:
    """Every non-blank line of a .jsonl file is a JSON object; else a ValueError naming the line
    (1-based) and column. ``datasets`` reports such a file without the line."""
    with Path(path).open(encoding="utf-8-sig", errors="strict") as handle:
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not valid JSON ({err.msg}, column {err.colno}); each line "
                                     "must be one JSON object") from None
                if not isinstance(value, dict):
                    raise ValueError(f"{path}:{number}: expected a JSON object per line, got "
                                     f"{type(value).__name__}")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None


# ---------------------------------------------------------------------------------------------
# Batch order


def batch_indices(n_items: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Item indices (batch_size,) for optimizer step `step`: a pure function of (step, seed).

    The item stream is epoch 0's permutation, then epoch 1's, ...; step `s` takes stream positions
    `[s * batch_size, (s + 1) * batch_size)`, continuing across epoch boundaries. Each epoch's
    permutation comes from a generator seeded by (seed, epoch), so resuming at step k needs only k.
    """
    if n_items < 1 or batch_size < 1 or step < 0:
        raise ValueError(f"need n_items >= 1, batch_size >= 1, step >= 0; got {n_items}, {batch_size}, {step}.")
    first, last = step * batch_size, (step + 1) * batch_size  # stream positions [first, last)
    parts = []
    for epoch in range(first // n_items, (last - 1) // n_items + 1):
        perm = _epoch_permutation(n_items, seed, epoch)
        lo = max(first - epoch * n_items, 0)
        hi = min(last - epoch * n_items, n_items)
        parts.append(perm[lo:hi].long())
    return torch.cat(parts)


@functools.lru_cache(maxsize=2)  # a step needs at most two epochs; the cache holds 4 bytes per item each
def _epoch_permutation(n_items: int, seed: int, epoch: int) -> torch.Tensor:
    """Epoch `epoch`'s permutation of range(n_items), computed once: drawing it costs ~50 ms at 1.5 M
    items, which every step would otherwise pay. Stored as int32 where it fits; callers copy slices."""
    perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(_epoch_seed(seed, epoch)))
    return perm.to(torch.int32) if n_items < 2**31 else perm


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed for (seed, epoch); hashing avoids collisions like seed+epoch."""
    digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ---------------------------------------------------------------------------------------------
# Preference pairs


@dataclass(frozen=True)
class PreferenceStats:
    """What `load_preference_pairs` read: rows in the file, pairs kept, identical pairs dropped."""

    n_rows: int
    n_valid: int
    n_identical_dropped: int
    conversational: bool


def load_preference_pairs(path: str | Path, keep_messages: bool = False) -> tuple[list[dict], PreferenceStats]:
    """Read `prompt` / `chosen` / `rejected` pairs from a local .jsonl/.json/.parquet file.

    Two formats, as TRL accepts them with an explicit prompt (implicit-prompt files, where the
    prompt is the shared prefix of chosen and rejected, are not supported):
    - plain: three strings per row;
    - conversational: three lists of `{"role": str, "content": str}` messages. With
      ``keep_messages`` they are returned as such (render them with :func:`render_pairs`, which
      applies a tokenizer's chat template); otherwise flattened to plain text as
      `"{role}: {content}\\n"` per message, so prompt + chosen reads as the whole conversation.
    The first row decides the format. Rows with an empty (whitespace-only) field are an error;
    rows with chosen == rejected carry no preference and are dropped with a warning.
    Returns dicts with `prompt`, `chosen`, `rejected` (plain strings, or message lists).
    """
    path = Path(path)
    rows, columns = _read_rows(path)
    missing = [c for c in PREFERENCE_COLUMNS if c not in columns]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {missing}; found columns {columns}. "
            "Preference data needs explicit prompt, chosen and rejected columns."
        )
    absent = next((i for i, row in enumerate(rows) if any(c not in row for c in PREFERENCE_COLUMNS)), None)
    if absent is not None:
        raise ValueError(f"{path}: row {absent} lacks column(s) "
                         f"{[c for c in PREFERENCE_COLUMNS if c not in rows[absent]]} (rows are 0-based)")
    conversational = bool(rows) and isinstance(rows[0]["chosen"], list)
    pairs, empty_rows = [], {c: [] for c in PREFERENCE_COLUMNS}
    for row_idx, row in enumerate(rows):
        pair = {}
        for col in PREFERENCE_COLUMNS:
            text, is_empty = _field_text(row[col], conversational, path, col, row_idx)
            pair[col] = [dict(m) for m in row[col]] if keep_messages and conversational else text
            if is_empty:
                empty_rows[col].append(row_idx)
        pairs.append(pair)
    empty = {c: r for c, r in empty_rows.items() if r}
    if empty:
        detail = "; ".join(f"{c!r} in {len(r)} row(s), first {r[:5]}" for c, r in empty.items())
        raise ValueError(f"{path}: empty fields (rows are 0-based): {detail}. Remove or fill these rows.")
    kept = [p for p in pairs if p["chosen"] != p["rejected"]]
    n_identical = len(pairs) - len(kept)
    if n_identical:
        warnings.warn(
            f"{path}: dropped {n_identical} of {len(pairs)} rows where chosen == rejected.", stacklevel=2
        )
    if not kept:
        raise ValueError(
            f"{path}: no valid preference pair ({len(rows)} rows, {n_identical} with chosen == rejected)."
        )
    return kept, PreferenceStats(len(rows), len(kept), n_identical, conversational)


def flatten_messages(messages: list[dict]) -> str:
    """Messages as plain text, ``"{role}: {content}\\n"`` each: for a tokenizer without a chat template."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages)


def render_pairs(pairs: list[dict], tokenizer: PreTrainedTokenizerBase | None) -> list[dict]:
    """Plain-text pairs. Conversational pairs (message lists) go through the tokenizer's chat template
    as TRL renders them: prompt = the template with the generation prompt (or continuing the prompt's
    last message when it is the assistant's), then the longest prefix it shares with the rendered
    prompt + chosen and prompt + rejected; each completion = the rest of its rendering. Without a
    chat template (the embedded tokenizer), messages are flattened (:func:`flatten_messages`).
    Plain pairs are returned unchanged."""
    out = []
    for pair in pairs:
        if not isinstance(pair["chosen"], list):
            out.append(pair)
        elif tokenizer is None or not getattr(tokenizer, "chat_template", None):
            out.append({k: flatten_messages(pair[k]) for k in PREFERENCE_COLUMNS})
        else:
            out.append(_templated(pair, tokenizer))
    return out


def _templated(pair: dict, tokenizer: PreTrainedTokenizerBase) -> dict:
    assistant_last = pair["prompt"][-1]["role"] == "assistant"
    prompt = tokenizer.apply_chat_template(pair["prompt"], tokenize=False, add_generation_prompt=not assistant_last,
                                           continue_final_message=assistant_last)
    full = {side: tokenizer.apply_chat_template(pair["prompt"] + pair[side], tokenize=False)
            for side in ("chosen", "rejected")}
    for text in full.values():  # a template may render the prompt differently before a reply
        prompt = prompt[: next((i for i, (a, b) in enumerate(zip(prompt, text)) if a != b), min(len(prompt),
                                                                                                 len(text)))]
    return {"prompt": prompt, "chosen": full["chosen"][len(prompt):], "rejected": full["rejected"][len(prompt):]}


def _field_text(value: Any, conversational: bool, path: Path, column: str, row: int) -> tuple[str, bool]:
    """(plain text, is_empty) for one field; errors name the file, column and 0-based row."""
    where = f"{path}: column {column!r}, row {row}"
    if not conversational:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string (row 0 is plain text), got {type(value).__name__}.")
        return value, not value.strip()
    if not isinstance(value, list):
        raise ValueError(
            f"{where}: expected a list of messages (row 0 is conversational), got {type(value).__name__}."
        )
    lines, contents = [], []
    for i, message in enumerate(value):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(role, str) or not isinstance(content, str):
            raise ValueError(
                f"{where}, message {i}: expected {{'role': str, 'content': str}}, got {message!r}."
            )
        lines.append(f"{role}: {content}\n")
        contents.append(content)
    return "".join(lines), not "".join(contents).strip()


def build_embedded_preferences(
    texts: list[str], n_pairs: int, seed: int = 0, prompt_chars: int = 200, completion_chars: int = 120
) -> list[dict]:
    """Preference pairs cut from a local corpus: chosen = true continuation, rejected = its words shuffled.

    A split point is drawn uniformly over corpus positions (then moved to the end of its line);
    prompt = the `prompt_chars` characters before it, chosen = the newline there plus the whole
    lines that fit in the next `completion_chars` characters, rejected = the same text with its
    whitespace-separated words permuted and the whitespace (indentation, newlines) left in place.
    Chosen and rejected thus have the same characters, length and layout (no length confound, a
    known DPO shortcut); only word order differs, which any LM trained on the corpus scores: a character 6-gram already
    prefers chosen in ~99% of stdlib pairs (shuffling whole lines instead gave ~66%).
    Needs >= 2 distinct words in the window. Deterministic given `seed`.
    """
    if n_pairs < 1 or prompt_chars < 1 or completion_chars < 4:
        raise ValueError(
            "need n_pairs >= 1, prompt_chars >= 1, completion_chars >= 4; "
            f"got {n_pairs}, {prompt_chars}, {completion_chars}."
        )
    docs = [t for t in texts if len(t) > prompt_chars + completion_chars]
    if not docs:
        raise ValueError(
            f"no document is longer than prompt_chars + completion_chars = {prompt_chars + completion_chars}."
        )
    # Valid split positions per doc are [prompt_chars, len - completion_chars]; cumulate their counts.
    cumulative = [0]
    for doc in docs:
        cumulative.append(cumulative[-1] + len(doc) - prompt_chars - completion_chars + 1)
    gen = torch.Generator().manual_seed(seed)
    pairs, seen = [], set()
    max_attempts = 50 * n_pairs + 100
    for _ in range(max_attempts):
        if len(pairs) == n_pairs:
            break
        pos = int(torch.randint(cumulative[-1], (1,), generator=gen))
        doc_idx = bisect_right(cumulative, pos) - 1
        doc = docs[doc_idx]
        split = prompt_chars + pos - cumulative[doc_idx]
        if doc[split - 1] != "\n":
            split = doc.find("\n", split) + 1  # 0 when there is no later newline
        if split == 0 or split - 1 < prompt_chars or split + completion_chars > len(doc) or (doc_idx, split) in seen:
            continue
        # The newline that ends the prompt's last line opens the completion instead: byte-level BPE
        # merges "\n" with the next line's indentation, so a prompt ending in "\n" would not end on
        # a token boundary (TRL then moves that token into the completion and warns).
        split -= 1
        if doc[split - 1].isspace():
            # A prompt ending in whitespace (a blank line, trailing spaces) merges with the completion's
            # leading newline into one pre-token: the prompt would not end on a token boundary.
            continue
        window = doc[split : split + 1 + completion_chars]
        chosen = window[: window.rfind("\n") + 1]  # a newline, then whole lines only
        rejected = _shuffle_words(chosen, gen)
        if rejected is not None:
            seen.add((doc_idx, split))
            pairs.append({"prompt": doc[split - prompt_chars : split], "chosen": chosen, "rejected": rejected})
    if len(pairs) < n_pairs:
        raise ValueError(
            f"built only {len(pairs)} of {n_pairs} pairs after {max_attempts} draws; the corpus is too small "
            "or prompt_chars/completion_chars too large."
        )
    return pairs


def _shuffle_words(text: str, gen: torch.Generator) -> str | None:
    """`text` with its non-whitespace runs permuted in place; None if no permutation changes it."""
    pieces = re.split(r"(\s+)", text)  # odd indices hold the whitespace separators
    word_slots = [i for i, piece in enumerate(pieces) if piece and not piece.isspace()]
    if len({pieces[i] for i in word_slots}) < 2:
        return None
    for _ in range(8):  # a permutation can reproduce the original (2 distinct words: p = 1/2)
        perm = torch.randperm(len(word_slots), generator=gen).tolist()
        shuffled = list(pieces)
        for slot, source in zip(word_slots, perm):
            shuffled[slot] = pieces[word_slots[source]]
        if "".join(shuffled) != text:
            return "".join(shuffled)
    return None


def prompt_budget(n_prompt: int, n_completion: int, max_len: int) -> int:
    """Prompt tokens to keep (from the right) so that prompt + completion fits ``max_len``: the
    prompt gives way first but keeps at least ``max_len // 2`` tokens (or all it has);
    ``n_completion`` counts the eos a trainer appends."""
    return min(n_prompt, max(max_len - n_completion, max_len // 2))


def fit_pair(prompt: list[int], chosen: list[int], rejected: list[int], max_len: int
             ) -> tuple[list[int], list[int], list[int]]:
    """``(prompt, chosen, rejected)`` token ids cut to fit ``max_len``: the prompt loses tokens from the
    left first (:func:`prompt_budget`, both completions' lengths counted), then the completions are
    cut from the right. Chosen and rejected share the kept prompt."""
    keep_p = prompt_budget(len(prompt), max(len(chosen), len(rejected)), max_len)
    return prompt[len(prompt) - keep_p:], chosen[: max_len - keep_p], rejected[: max_len - keep_p]


def identical_after_truncation(pairs: list[dict], tokenizer: PreTrainedTokenizerBase, max_len: int) -> list[int]:
    """Indices of the pairs whose chosen and rejected sequences are the same tokens once cut to ``max_len``
    (:func:`fit_pair`, eos appended as trainers do): they carry no preference (margin exactly 0)."""
    def encode(field: str) -> list[list[int]]:
        return tokenizer([p[field] for p in pairs], add_special_tokens=False, verbose=False)["input_ids"]

    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for i, (p, c, r) in enumerate(zip(encode("prompt"), encode("chosen"), encode("rejected"))):
        _, c, r = fit_pair(p, c + eos, r + eos, max_len)
        if c == r:
            out.append(i)
    return out


def tokenize_pairs(
    pairs: list[dict], tokenizer: PreTrainedTokenizerBase, max_len: int, append_eos: bool = True
) -> dict[str, torch.Tensor]:
    """Tokenize preference pairs into padded tensors (n_pairs, L), L = longest sequence <= max_len.

    Keys `{chosen,rejected}_{input_ids,attention_mask,loss_mask}`. Each row is
    `prompt tokens + completion tokens (+ eos, as TRL does)` then right padding with the pad id.
    `loss_mask` is 1 on completion tokens only, aligned with `input_ids` (to score with shifted
    logits use `logits[:, :-1]` vs `input_ids[:, 1:]` masked by `loss_mask[:, 1:]`).
    Fitting max_len: the prompt loses tokens from the left first, but keeps at least
    `max_len // 2` (or all it has) so the completion is not left without context; then
    completions are cut from the right. Chosen and rejected share the same kept prompt tokens.
    """
    if not pairs:
        raise ValueError("tokenize_pairs got no pairs.")
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}.")
    if tokenizer.pad_token_id is None or (append_eos and tokenizer.eos_token_id is None):
        raise ValueError("tokenizer needs a pad token (and an eos token when append_eos=True).")
    eos = [tokenizer.eos_token_id] if append_eos else []

    def encode(field: str) -> list[list[int]]:
        return tokenizer([p[field] for p in pairs], add_special_tokens=False, verbose=False)["input_ids"]

    prompts, chosen, rejected = encode("prompt"), encode("chosen"), encode("rejected")
    rows = {"chosen": [], "rejected": []}
    for p, c, r in zip(prompts, chosen, rejected):
        prompt, c, r = fit_pair(p, c + eos, r + eos, max_len)
        rows["chosen"].append((prompt, c))
        rows["rejected"].append((prompt, r))
    width = max(len(p) + len(c) for side in rows.values() for p, c in side)
    out = {}
    for side, side_rows in rows.items():
        ids = torch.full((len(side_rows), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(side_rows), width), dtype=torch.long)
        loss = torch.zeros((len(side_rows), width), dtype=torch.long)
        for i, (prompt, completion) in enumerate(side_rows):
            n_p, n = len(prompt), len(prompt) + len(completion)
            ids[i, :n] = torch.tensor(prompt + completion, dtype=torch.long)
            attention[i, :n] = 1
            loss[i, n_p:n] = 1
        out[f"{side}_input_ids"], out[f"{side}_attention_mask"], out[f"{side}_loss_mask"] = ids, attention, loss
    return out
