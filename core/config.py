"""Typed, validated recipe configuration.

A recipe is a YAML file whose keys mirror the dataclasses below; anything not written takes the
default shown here. ``load_config(path, overrides)`` reads it, applies ``key.sub=value`` overrides
from the command line (values parsed as YAML, so ``train.lr=1e-3`` is a float and
``instruments.roles=[q,o]`` a list), and validates: an unknown key, a wrong type or an invalid
choice is a :class:`ConfigError` naming the key and the file.

A field's help, what ``harness keys`` prints beside it, is its ``metadata["help"]``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from weightgeom.hooks.roles import ARCHITECTURES, ROLES
from weightgeom.hooks.suite import SuiteConfig


class ConfigError(ValueError):
    """A recipe problem, with the key and the file in the message."""


class FieldError(ValueError):
    """A bad value of one field, raised by a section's checks; the loader adds the section and file."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} {message}")
        self.field, self.reason = field, message


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise FieldError(field, message)


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(value > 0, name, f"must be > 0, got {value}")


def _non_negative(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(value >= 0, name, f"must be >= 0, got {value}")


@dataclass
class ModelConfig:
    source: str = field(default="tiny", metadata={
        "help": '"tiny" (built from this config) or a local HF model directory'})
    arch: str = field(default="llama", metadata={"help": "a row of weightgeom.hooks.roles.ARCHITECTURES"})
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None
    intermediate_size: int | None = field(default=None, metadata={"help": "default: 4 * hidden_size"})
    max_seq_len: int = 256
    tie_word_embeddings: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        _require(self.arch in ARCHITECTURES, "arch", f"must be one of {sorted(ARCHITECTURES)} (the role table in "
                                                     f"hooks/roles.py), got {self.arch!r}")
        _positive(self, "hidden_size", "num_layers", "num_heads", "max_seq_len")
        _require(self.hidden_size % self.num_heads == 0, "hidden_size",
                 f"({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads})")


@dataclass
class TokenizerConfig:
    source: str = field(default="stdlib-bpe", metadata={
        "help": "trained locally on Python's stdlib sources, or a local directory"})
    vocab_size: int = 4096
    cache_dir: str = "~/.cache/weightgeom"

    def __post_init__(self) -> None:
        _positive(self, "vocab_size")
        _require(self.source != "stdlib-bpe" or self.vocab_size >= 258, "vocab_size",
                 f"must be >= 258 for the embedded byte-level tokenizer (256 bytes + pad + eos), got {self.vocab_size}")


@dataclass
class DataConfig:
    source: str | list[str] = field(default="stdlib", metadata={
        "help": '"stdlib" or local .txt/.jsonl/.json/.parquet files/dirs'})
    text_field: str = "text"
    seq_len: int = 128
    eval_fraction: float = 0.02
    max_tokens: int | None = field(default=2_000_000, metadata={"help": "cap on tokens read from the corpus"})

    def __post_init__(self) -> None:
        _positive(self, "seq_len")
        _require(0 <= self.eval_fraction < 1, "eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")


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
    save_every: int = field(default=0, metadata={"help": "0: checkpoint only at the end"})
    keep_checkpoints: int = field(default=0, metadata={
        "help": "keep only the newest N checkpoints (the final one is the newest); 0: all"})
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    fsdp: bool = field(default=False, metadata={
        "help": "shard the model over the processes (FSDP2, core/sharding.py); DDP otherwise"})
    on_nonfinite: Literal["stop", "skip"] = field(default="stop", metadata={
        "help": "a NaN/inf loss or gradient stops the run, or skips the step"})
    stall_patience: int = field(default=20, metadata={
        "help": "stop after this many consecutive all-zero-gradient (or skipped) steps; 0: never"})

    def __post_init__(self) -> None:
        _positive(self, "steps", "batch_size", "grad_accum", "lr", "log_every")
        _non_negative(self, "weight_decay", "momentum", "warmup_steps", "eval_every", "eval_batches", "save_every",
                      "keep_checkpoints", "stall_patience")
        _require(len(self.betas) == 2, "betas", f"must be two numbers [beta1, beta2], got {self.betas}")


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self) -> None:
        _positive(self, "r")
        _non_negative(self, "dropout")


# ----- alignment objectives: one dataclass per loss, holding exactly the settings that loss takes -----
# Each says which trainer runs it (``trainer``: a key of harness.pipeline's table of alignment loops)
# and what that trainer can do: ``resumes`` (continue from a mid-run checkpoint; else restart) and
# ``skips_nonfinite`` (honour ``train.on_nonfinite: skip``; else a non-finite step stops the run).
@dataclass
class PreferenceLoopObjective:
    """The objectives our own preference loop (trainers/preference.py) runs."""

    trainer: ClassVar[str] = "preference"
    resumes: ClassVar[bool] = True
    skips_nonfinite: ClassVar[bool] = True


@dataclass
class GradedObjective(PreferenceLoopObjective):
    """``L_g = -log sigmoid(beta (D_w - grade * D_l))``: grade 0 = chosen likelihood, 1 = DPO."""

    name: str
    loss: Literal["graded"] = "graded"
    grade: float = 1.0

    def contrast_grade(self) -> float | None:
        return self.grade


@dataclass
class DpoObjective(PreferenceLoopObjective):
    """Sigmoid DPO in our loop (the graded loss at grade 1)."""

    name: str
    loss: Literal["dpo"] = "dpo"

    def contrast_grade(self) -> float | None:
        return 1.0


@dataclass
class LikelihoodObjective(PreferenceLoopObjective):
    """The graded loss at grade 0: raise the chosen completion's likelihood only."""

    name: str
    loss: Literal["likelihood"] = "likelihood"

    def contrast_grade(self) -> float | None:
        return 0.0


@dataclass
class MixtureObjective(PreferenceLoopObjective):
    """``lam * CE(chosen) + (1 - lam) * DPO``."""

    name: str
    loss: Literal["mixture"] = "mixture"
    lam: float = 0.5

    def contrast_grade(self) -> float | None:
        return None  # a mixture with CE is not a point on the graded axis


@dataclass
class TrlObjective:
    """TRL's ``DPOTrainer`` with ``loss_type`` (``sigmoid`` is DPO; ``ipo``, ``hinge``, ...): it keeps no
    mid-run checkpoint (a resumed pipeline restarts it) and stops at a non-finite step."""

    trainer: ClassVar[str] = "trl"
    resumes: ClassVar[bool] = False
    skips_nonfinite: ClassVar[bool] = False

    name: str
    loss: Literal["trl"] = "trl"
    loss_type: str | list[str] = "sigmoid"

    def contrast_grade(self) -> float | None:
        return 1.0 if self.loss_type in ("sigmoid", ["sigmoid"]) else None


# ``loss`` picks the dataclass (default: graded); a key of another loss is an unknown key.
OBJECTIVES = {"graded": GradedObjective, "dpo": DpoObjective, "likelihood": LikelihoodObjective,
              "mixture": MixtureObjective, "trl": TrlObjective}
Objective = GradedObjective | DpoObjective | LikelihoodObjective | MixtureObjective | TrlObjective


@dataclass
class AlignConfig:
    # "embedded" (true vs word-shuffled text cut from data.source: for models trained from scratch),
    # "docstrings" (stdlib function questions answered by that function's docstring summary vs another's:
    # for instruct models, through their chat template) or a local .jsonl/.json/.parquet
    data: str = "embedded"
    n_pairs: int = 512
    max_len: int = 128
    beta: float = field(default=0.1, metadata={
        "help": "checked where it is used (weightgeom.trainers.losses.check_beta)"})
    eval_fraction: float = field(default=0.1, metadata={
        "help": "pairs held out for eval/pref_* (whole pairs, seeded; at least 1 of >= 10)"})
    objectives: list[Objective] = field(default_factory=lambda: [TrlObjective(name="dpo")], metadata={
        "help": "one alignment run per entry, each a mapping with name, loss and that loss's keys "
                "(align.objectives[].* below)"})
    lora: LoraConfig | None = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=100, batch_size=8, lr=5e-4, warmup_steps=5, eval_every=0, max_grad_norm=1.0))

    def __post_init__(self) -> None:
        _positive(self, "n_pairs", "max_len")
        _require(0 <= self.eval_fraction < 1, "eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        names = [o.name for o in self.objectives]
        _require(len(set(names)) == len(names), "objectives", f"names must be unique, got {names}")


@dataclass
class Rank1Config:
    """The rank-1 causal test (docs/rank1.md): the recipe's ``rank1:`` section, and the settings of
    ``harness rank1`` (whose flags replace them), validated on construction. The sampling seed of the
    controls and the DPO beta of ``G`` are the run's (``seed``, ``align.beta``), passed beside it.

    What is edited and how: ``roles``/``layers``: the matrices edited (``layers`` None: all; statistics
    are always taken in every layer, the ``layer`` control family needs them). ``eps``: Frobenius norm
    of every edit (absolute; compare with the ``weight_norm`` the result reports per matrix).
    ``eps_small``: the norm at which per-unit-norm changes ``(m(eps_small) - m0) / eps_small`` are
    measured (default ``eps / 10``). ``n_top``: tested directions per source. ``n_random``: Haar
    controls per (layer, role); ``n_matched``: variance-matched controls per tested direction;
    ``n_lower``: lower principal directions per source; ``tol``: relative band of the matching.
    ``layer_controls``: how many other layers give the ``layer`` family (evenly spaced over them;
    null: every other layer; a 30-layer model would otherwise measure 29 such edits per direction).
    ``pred_centered``: prediction subspace of the vocab-centred unembedding. ``batch_size``: pairs /
    text blocks per forward.

    What it reads (:data:`INPUTS`): ``max_pairs``: training pairs that give the mean gradient ``G``
    (the held-out pairs are the alignment runs', ``align.eval_fraction``); ``text_blocks``: held-out
    pretraining blocks for CE and KL.
    """

    INPUTS: ClassVar[tuple[str, ...]] = ("max_pairs", "text_blocks")

    roles: list[str] = field(default_factory=lambda: ["q", "k", "o", "down"], metadata={
        "help": "the read and write pathways"})
    layers: list[int] | None = None
    eps: float = 0.5
    eps_small: float | None = None
    n_top: int = 1
    n_random: int = 20
    n_matched: int = 10
    n_lower: int = 4
    tol: float = 0.1
    layer_controls: int | None = None
    pred_centered: bool = False
    batch_size: int = 32
    max_pairs: int | None = 128
    text_blocks: int = 16

    def __post_init__(self) -> None:
        unknown = [r for r in self.roles if r not in ROLES]
        _require(bool(self.roles) and not unknown, "roles",
                 f"needs at least one of {list(ROLES)}; got {list(self.roles)} (unknown: {unknown})")
        _require(math.isfinite(self.eps) and self.eps > 0, "eps",
                 f"(the edit's Frobenius norm) must be a finite number > 0, got {self.eps}")
        _require(self.eps_small is None or (math.isfinite(self.eps_small) and self.eps_small > 0), "eps_small",
                 f"must be a finite number > 0 (or null for eps / 10), got {self.eps_small}")
        _positive(self, "n_top", "batch_size", "text_blocks")
        _require(self.n_random >= 2, "n_random", f"must be >= 2 (a z-score needs a spread), got {self.n_random}")
        _require(self.n_matched >= 2, "n_matched", f"must be >= 2 (a z-score needs a spread), got {self.n_matched}")
        _non_negative(self, "n_lower")
        _require(0 <= self.tol < 1, "tol", f"(relative matching band) must be in [0, 1), got {self.tol}")
        _require(self.layer_controls is None or self.layer_controls >= 2, "layer_controls",
                 f"must be >= 2 (a z-score needs a spread) or null for every other layer, got {self.layer_controls}")
        _require(self.max_pairs is None or self.max_pairs >= 1, "max_pairs",
                 f"must be >= 1 or null, got {self.max_pairs}")

    @property
    def small(self) -> float:
        """The norm of the small edits (``eps_small``, default ``eps / 10``)."""
        return self.eps_small if self.eps_small is not None else self.eps / 10

    def edits(self) -> dict:
        """The settings of what is edited and how (every field but :data:`INPUTS`), in field order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self.INPUTS}


@dataclass
class TrackingConfig:
    report_to: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    stages: list[Literal["pretrain", "align", "rank1", "report"]] = field(
        default_factory=lambda: ["pretrain", "report"])
    init_from: str | None = field(default=None, metadata={
        "help": "a checkpoint / HF model dir to start from (align-only runs)"})
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    instruments: SuiteConfig = field(default_factory=SuiteConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    rank1: Rank1Config = field(default_factory=Rank1Config)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: list[dict[str, Any]] = field(default_factory=list, metadata={
        "help": "asymmetry_scale: one override set per run"})

    def __post_init__(self) -> None:
        _require(not ("align" in self.stages and not self.align.objectives), "align.objectives",
                 "is empty, but stages include 'align': list at least one objective, or drop 'align' from stages")
        _require(bool(self.output_dir.strip()), "output_dir", "is empty: give a directory (e.g. runs)")
        problem = run_name_problem(self.name)
        _require(problem is None, "name", f"{problem}: the run directory is output_dir/name, always strictly inside "
                                          f"output_dir, so name must be one plain folder name (e.g. name=my_run)")

    @property
    def run_dir(self) -> Path:
        """``output_dir / name``: strictly inside ``output_dir`` (``name`` is one plain folder name)."""
        return Path(self.output_dir) / self.name


def run_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a run directory inside ``output_dir`` (None when it can): it must be one
    path component, not empty, ``.`` or ``..``, with no separator and not absolute."""
    if not name or not name.strip():
        return f"is empty ({name!r})"
    if name in (".", "..") or name.strip(". ") == "":
        return f"is {name!r}, which names output_dir itself or a folder above it"
    if "/" in name or "\\" in name or Path(name).is_absolute() or len(Path(name).parts) != 1:
        return f"is {name!r}, a path, not a folder name"
    if "\0" in name:
        return "holds a NUL character"
    return None


# Keys of earlier versions, and what replaced them (an error that says what to write instead).
RENAMED = {
    "instruments.n_random": "key 'instruments.n_random' is gone: z-scores are now exact (closed form, no sampling); "
                            "write instruments.zscores: true (the default) or false",
}


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
    if not overrides:
        return from_dict(RunConfig, raw, source)
    from_dict(RunConfig, raw, source)  # the recipe alone: its own errors name the file
    for item in overrides:
        apply_override(raw, item)
    # the recipe was valid, so an error now comes from the overrides: name the command line, and
    # the overrides whose key the message mentions
    try:
        return from_dict(RunConfig, raw, "command line")
    except ConfigError as err:
        message = str(err)
        culprits = [o for o in overrides if o.partition("=")[0].strip() in message] or list(overrides)
        raise ConfigError(message.replace("command line", f"command line ({' '.join(culprits)})", 1)) from None


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


def from_dict(cls: type, data: Any, source: str, prefix: str = "", what: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, checking every key and type (``what`` qualifies the
    list of valid keys in errors, e.g. "for loss 'dpo'")."""
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    renamed = [RENAMED[f"{prefix}{k}"] for k in unknown if f"{prefix}{k}" in RENAMED]
    if renamed:
        raise ConfigError(f"{source}: {renamed[0]}")
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), list(fields), n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
        raise ConfigError(f"{source}: unknown key '{prefix}{unknown[0]}'{hint}; valid keys here"
                          f"{' ' + what if what else ''}: {sorted(fields)}")
    kwargs = {name: _convert(hints[name], value, source, f"{prefix}{name}") for name, value in data.items()}
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{source}: missing required key '{prefix}{missing[0]}'")
    try:
        return cls(**kwargs)
    except FieldError as err:
        raise ConfigError(f"{source}: key '{prefix}{err.field}' {err.reason}") from err
    except ValueError as err:  # a section's own check (e.g. instruments.k), already naming the key
        raise ConfigError(f"{source}: {err}") from err


def _convert(tp: Any, value: Any, source: str, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and tp is not Objective:
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
    if tp is Objective:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping like {{name: dpo, loss: trl}}, got {value!r}")
        loss = value.get("loss", "graded")
        if loss not in OBJECTIVES:
            raise ConfigError(f"{source}: key '{key}.loss' must be one of {list(OBJECTIVES)}, got {loss!r}")
        return from_dict(OBJECTIVES[loss], value, source, f"{key}.", what=f"for loss '{loss}'")
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


def saved_objective(data: dict) -> Objective:
    """An objective from a run's saved ``config.yaml``. Lenient where recipes are strict: runs written
    before objectives had one dataclass per loss saved every loss's keys, so keys the loss does not
    take are dropped here (never when loading a recipe)."""
    cls = OBJECTIVES.get(data.get("loss", "graded"), GradedObjective)
    names = {f.name for f in dataclasses.fields(cls)}
    return from_dict(cls, {k: v for k, v in data.items() if k in names}, "saved config.yaml", "align.objectives.")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
