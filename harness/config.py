"""Typed, validated recipe configuration.

A recipe is a YAML file whose keys mirror the dataclasses below; anything not written takes the
default shown here. ``load_config(path, overrides)`` reads it, applies ``key.sub=value`` overrides
from the command line (values parsed as YAML, so ``train.lr=1e-3`` is a float and
``instruments.roles=[q,o]`` a list), and validates: an unknown key, a wrong type or an invalid
choice is a :class:`ConfigError` naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A recipe problem, with the key and the file in the message."""


@dataclass
class ModelConfig:
    source: str = "tiny"  # "tiny" (built from this config) or a local HF model directory
    arch: Literal["llama", "qwen2", "mistral", "gpt2", "gpt_neox"] = "llama"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None
    intermediate_size: int | None = None  # default: 4 * hidden_size
    max_seq_len: int = 256
    tie_word_embeddings: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False


@dataclass
class TokenizerConfig:
    source: str = "stdlib-bpe"  # trained locally on Python's stdlib sources, or a local directory
    vocab_size: int = 4096
    cache_dir: str = "~/.cache/weightgeom"


@dataclass
class DataConfig:
    source: str | list[str] = "stdlib"  # "stdlib" or local .txt/.jsonl/.json/.parquet files/dirs
    text_field: str = "text"
    seq_len: int = 128
    eval_fraction: float = 0.02
    max_tokens: int | None = 2_000_000  # cap on tokens read from the corpus


@dataclass
class TrainConfig:
    steps: int = 400
    batch_size: int = 16
    grad_accum: int = 1
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    momentum: float = 0.0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    save_every: int = 0  # 0: checkpoint only at the end
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"


@dataclass
class InstrumentConfig:
    enabled: bool = True
    roles: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    layers: list[int] | None = None
    input_roles: list[str] = field(default_factory=lambda: ["q", "k", "v", "gate", "up"])  # C_a, rsf_in
    output_roles: list[str] = field(default_factory=lambda: ["o", "down"])  # C_delta, rsf_out_delta
    k: int = 8
    k_curve: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    every_n: int = 20
    log_spaced: bool = True
    n_random: int = 20
    max_tokens: int | None = None
    dtype: Literal["float32", "float64"] = "float32"
    snapshot_every: int = 0  # 0: snapshot whenever metrics are computed is too much; end only


@dataclass
class ObjectiveConfig:
    name: str
    loss: Literal["trl", "graded", "mixture", "dpo", "likelihood"] = "graded"
    grade: float = 1.0  # graded: L = -log sigmoid(beta (D_w - grade * D_l))
    lam: float = 0.5  # mixture: lam * CE(chosen) + (1 - lam) * DPO
    loss_type: str | list[str] = "sigmoid"  # TRL loss types, for loss: trl


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class AlignConfig:
    data: str = "embedded"  # "embedded" (built from the local corpus) or a local .jsonl/.json/.parquet
    n_pairs: int = 512
    max_len: int = 128
    beta: float = 0.1
    objectives: list[ObjectiveConfig] = field(default_factory=lambda: [ObjectiveConfig(name="dpo", loss="trl")])
    lora: LoraConfig | None = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=100, batch_size=8, lr=5e-4, warmup_steps=5, eval_every=0, max_grad_norm=1.0))


@dataclass
class TrackingConfig:
    report_to: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    stages: list[Literal["pretrain", "align", "report"]] = field(default_factory=lambda: ["pretrain", "report"])
    init_from: str | None = None  # a checkpoint / HF model dir to start from (align-only runs)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    instruments: InstrumentConfig = field(default_factory=InstrumentConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: list[dict[str, Any]] = field(default_factory=list)  # asymmetry_scale: one override set per run

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# ----- loading --------------------------------------------------------------------------------------
def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe (or the defaults when ``path`` is None), apply overrides, validate."""
    raw: dict = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: malformed YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of keys to values, got {type(raw).__name__}")
    for item in overrides or []:
        apply_override(raw, item)
    return from_dict(RunConfig, raw, source)


def apply_override(raw: dict, item: str) -> None:
    """``a.b.c=value`` sets ``raw["a"]["b"]["c"]`` (value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"command-line override {item!r} must look like key.sub=value")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"command line: cannot parse value of {key}: {err}") from err
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"command line: {key} goes inside {part}, which is not a section")
    node[parts[-1]] = value


def from_dict(cls: type, data: Any, source: str, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, checking every key and type."""
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown key '{prefix}{unknown[0]}'; valid keys here: {sorted(fields)}")
    kwargs = {name: _convert(hints[name], value, source, f"{prefix}{name}") for name, value in data.items()}
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{source}: missing required key '{prefix}{missing[0]}'")
    obj = cls(**kwargs)
    _validate(obj, source, prefix)
    return obj


def _convert(tp: Any, value: Any, source: str, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, source, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[-1] if len(errors) == 1 else ConfigError(
            f"{source}: key '{key}' expects {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: key '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: key '{key}' expects a list, got {value!r}")
        return [_convert(args[0], v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{key}' expects a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, f"{key}.")
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML reads 1e-3 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: key '{key}' expects {_type_name(tp)}, got {value!r}")
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


_POSITIVE = {"hidden_size", "num_layers", "num_heads", "vocab_size", "seq_len", "steps", "batch_size",
             "grad_accum", "k", "every_n", "max_len", "n_pairs", "r", "max_seq_len", "log_every"}
_NON_NEGATIVE = {"warmup_steps", "eval_every", "eval_batches", "save_every", "n_random", "weight_decay",
                 "snapshot_every", "momentum", "dropout"}


def _validate(obj: Any, source: str, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name in _POSITIVE and isinstance(value, (int, float)) and value <= 0:
            raise ConfigError(f"{source}: key '{prefix}{f.name}' must be > 0, got {value}")
        if f.name in _NON_NEGATIVE and isinstance(value, (int, float)) and value < 0:
            raise ConfigError(f"{source}: key '{prefix}{f.name}' must be >= 0, got {value}")
    if isinstance(obj, (TrainConfig,)) and obj.lr <= 0:
        raise ConfigError(f"{source}: key '{prefix}lr' must be > 0, got {obj.lr}")
    if isinstance(obj, DataConfig) and not 0 <= obj.eval_fraction < 1:
        raise ConfigError(f"{source}: key '{prefix}eval_fraction' must be in [0, 1), got {obj.eval_fraction}")
    if isinstance(obj, ModelConfig) and obj.hidden_size % obj.num_heads:
        raise ConfigError(f"{source}: model.hidden_size ({obj.hidden_size}) must be divisible by "
                          f"model.num_heads ({obj.num_heads})")
    if isinstance(obj, AlignConfig):
        names = [o.name for o in obj.objectives]
        if len(set(names)) != len(names):
            raise ConfigError(f"{source}: align.objectives names must be unique, got {names}")
        if obj.beta <= 0:
            raise ConfigError(f"{source}: key '{prefix}beta' must be > 0, got {obj.beta}")
    if isinstance(obj, ObjectiveConfig) and not 0 <= obj.lam <= 1:
        raise ConfigError(f"{source}: key '{prefix}lam' must be in [0, 1], got {obj.lam}")
    if isinstance(obj, InstrumentConfig):
        from hooks.roles import ROLES  # noqa: PLC0415

        for key in ("roles", "input_roles", "output_roles"):
            bad = [r for r in getattr(obj, key) if r not in ROLES]
            if bad:
                raise ConfigError(f"{source}: key '{prefix}{key}' has unknown roles {bad}; valid: {list(ROLES)}")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
