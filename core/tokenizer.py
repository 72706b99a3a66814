"""Tokenizers: the embedded default (byte-level BPE trained on Python's own stdlib) and local loading.

Nothing is downloaded. The default tokenizer is trained with the `tokenizers` library on the
`.py` sources of the running interpreter's standard library (~12 MB, a couple of seconds) and
cached on disk under a key that changes whenever the vocabulary size, the Python version or the
set of training files changes.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from weightgeom.core.config import TokenizerConfig

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|eos|>"
# Bump when the training recipe changes so stale caches are not reused.
_RECIPE_VERSION = 1
# Directory names skipped under the stdlib: tests are huge and unrepresentative; site-packages
# holds whatever the user installed, which would make the "embedded" corpus machine dependent.
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
# Any of these in a directory means it holds a tokenizer AutoTokenizer can read.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")


def stdlib_text_files(max_bytes: int | None = None) -> list[Path]:
    """Non-empty `*.py` files of the stdlib, sorted by relative path (deterministic).

    Skips test directories, site-packages and the build-config directory. With `max_bytes`, walks
    the sorted list and keeps each file that still fits in the remaining budget (files that do
    not fit are skipped, later smaller ones may still be taken), so the total size is <= max_bytes.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts[:-1]
        if any(p in _SKIP_DIRS or p.startswith("config-") for p in parts):
            continue
        if path.is_file() and path.stat().st_size > 0:
            files.append(path)
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    if max_bytes is None:
        return files
    selected, total = [], 0
    for path in files:
        size = path.stat().st_size
        if total + size <= max_bytes:
            selected.append(path)
            total += size
    if not selected:
        raise ValueError(f"max_bytes={max_bytes} is smaller than every stdlib file under {root}; raise it.")
    return selected


def _cache_key(vocab_size: int, files: list[Path]) -> str:
    """Directory name for a trained tokenizer: vocab size, Python version, hash of the file list."""
    digest = hashlib.sha256(f"recipe={_RECIPE_VERSION}\n".encode())
    for path in files:
        digest.update(f"{path.as_posix()}\t{path.stat().st_size}\n".encode())
    py = ".".join(str(v) for v in sys.version_info[:3])
    return f"stdlib-bpe-v{vocab_size}-py{py}-{digest.hexdigest()[:12]}"


def _train_bpe(files: list[Path], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenizer, lossless decode) with pad and eos specials."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, EOS_TOKEN],
        # All 256 byte symbols up front: any input text, even bytes unseen in training, encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = (path.read_text(encoding="utf-8", errors="replace") for path in files)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        padding_side="right",
        # Cleanup would rewrite spaces around punctuation and break the decode round trip.
        clean_up_tokenization_spaces=False,
    )


def train_stdlib_tokenizer(
    vocab_size: int, cache_dir: Path, max_bytes: int = 16_000_000
) -> PreTrainedTokenizerFast:
    """Train (or reload from `cache_dir/<key>/`) the embedded byte-level BPE tokenizer.

    Special tokens: `<|pad|>` (id 0), `<|eos|>` (id 1, also used as bos). Padding side is right.
    The cache is written to a temporary directory and renamed into place, so an interrupted run
    leaves no half-written entry; if another process wins the rename, its copy is used.
    """
    min_vocab = 256 + 2  # every byte plus the two specials
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size={vocab_size} is too small for byte-level BPE; use >= {min_vocab}.")
    cache_dir = Path(cache_dir)
    files = stdlib_text_files(max_bytes)
    final = cache_dir / _cache_key(vocab_size, files)
    if not (final / "tokenizer.json").is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache_dir))
        try:
            _wrap(_train_bpe(files, vocab_size)).save_pretrained(tmp)
            try:
                tmp.rename(final)
            except OSError:
                if not (final / "tokenizer.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(final, local_files_only=True)
    tokenizer.padding_side = "right"
    return tokenizer


def load_tokenizer(source: str, vocab_size: int, cache_dir: Path) -> PreTrainedTokenizerBase:
    """`"stdlib-bpe"` -> the embedded tokenizer; otherwise a local directory with tokenizer files.

    `vocab_size` and `cache_dir` only apply to `"stdlib-bpe"`; a local tokenizer keeps its own
    vocabulary. A local tokenizer without a pad token gets pad = eos. Padding side is set to
    right, which the harness's loops assume.
    """
    if source == "stdlib-bpe":
        return train_stdlib_tokenizer(vocab_size, cache_dir)
    path = check_tokenizer_dir(source)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"tokenizer in {source!r} has neither a pad nor an eos token; add one to its config."
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def check_tokenizer_dir(source: str) -> Path:
    """The checks :func:`load_tokenizer` makes on a local tokenizer directory (nothing is loaded)."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"tokenizer source {source!r} is neither 'stdlib-bpe' nor an existing path. Only local "
            "directories are supported; names on a model hub are not downloaded."
        )
    if not path.is_dir():
        raise ValueError(f"tokenizer source {source!r} is a file; pass the directory that holds it.")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        found = sorted(p.name for p in path.iterdir()) or ["nothing"]
        raise ValueError(
            f"directory {source!r} holds no tokenizer files (expected one of {', '.join(_TOKENIZER_FILES)}); "
            f"found: {', '.join(found)}."
        )
    return path


def tokenizer_from_config(cfg: TokenizerConfig) -> PreTrainedTokenizerBase:
    """The recipe's tokenizer: a local directory (``tokenizer.source``), else the embedded stdlib BPE
    trained (once, then cached in ``tokenizer.cache_dir``) at ``tokenizer.vocab_size``."""
    return load_tokenizer(cfg.source, cfg.vocab_size, Path(cfg.cache_dir).expanduser())
