"""Checks that a recipe can run, made before anything is trained or written.

Everything here is cheap (file system look-ups and a weightless model skeleton on PyTorch's
``meta`` device), so a bad path, a model directory without weights, an architecture without a
role table, a tracker whose package is missing or an ``instruments.k`` the model cannot honour
fails in about a second, before the tokenizer is trained and before the run directory exists. (A model
type without a row passes when the instruments' generic fallback maps it by module names.)

``preflight(cfg)`` raises :class:`weightgeom.core.config.ConfigError` (or ``FileNotFoundError`` for a missing
path) and returns warnings: settings that run, but not as the recipe reads.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from weightgeom.core.config import ConfigError, RunConfig
from weightgeom.core.locations import check_output_dir
from weightgeom.core.models import check_local_model_dir, tiny_config
from weightgeom.core.sinks import tracker_problems
from weightgeom.core.stage_inputs import BUILT_IN_PAIRS, starting_model
from weightgeom.core.text_sources import TABLE_FORMATS, TEXT_EXTENSIONS
from weightgeom.core.tokenizer import check_tokenizer_dir
from weightgeom.hooks.roles import ARCHITECTURES, WRITE_ROLES, InferredRolesWarning, arch_spec_for, resolve_tracked
from weightgeom.hooks.suite import SuiteConfig


def preflight(cfg: RunConfig) -> list[str]:
    """Every check below, in the order a run would hit them; returns warnings (see the module docstring)."""
    stages = set(cfg.stages)
    check_output_dir(cfg.output_dir, "output_dir")
    check_output_dir(cfg.tokenizer.cache_dir, "tokenizer.cache_dir")
    if "pretrain" in stages:
        check_text_sources(cfg.data.source, "data.source")
    if "align" in stages and cfg.align.data not in BUILT_IN_PAIRS:
        check_table_file(cfg.align.data, "align.data")
    if "align" in stages and cfg.align.data == "embedded" and "pretrain" not in stages:
        check_text_sources(cfg.data.source, "data.source (the embedded preference pairs are cut from it)")
    if "pretrain" not in stages and "align" in stages and not cfg.init_from:
        raise ConfigError("an alignment-only recipe needs init_from: a checkpoint or local HF model directory")
    key = "init_from" if cfg.init_from else "model.source"
    model_dir = _named(key, starting_model, cfg)  # a .gguf file or short name is dequantized here, once
    if model_dir is not None:
        _named(key, check_local_model_dir, model_dir)
    if cfg.tokenizer.source != "stdlib-bpe" and "pretrain" in stages:
        _named("tokenizer.source", check_tokenizer_dir, cfg.tokenizer.source)
    problems = tracker_problems(cfg.tracking.report_to)
    if problems:
        raise ConfigError(f"tracking.report_to: {'; '.join(problems)}")
    warnings: list[str] = []
    stopping = [o.name for o in cfg.align.objectives if not o.skips_nonfinite]
    if "align" in stages and cfg.align.train.on_nonfinite == "skip" and stopping:
        warnings.append(f"align.train.on_nonfinite=skip applies to our own loops; objectives {stopping} (loss: trl) "
                        "stop at a non-finite step")
    skeleton = skeleton_model(cfg, model_dir, key)
    if model_dir is not None:
        check_weights(model_dir, key)
        check_vocabulary(cfg, skeleton, model_dir, key)
    if cfg.instruments.enabled:
        warnings += check_instruments(skeleton, cfg.instruments)
    return warnings


def tokenizer_size(cfg: RunConfig, model_dir: str | None) -> int:
    """Tokens of the tokenizer the run will use: the one saved with the model it starts from, else
    ``tokenizer.source`` (a local directory, loaded; the embedded one has ``vocab_size``)."""
    source = cfg.tokenizer.source
    if model_dir is not None and any(
            (Path(model_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        source = model_dir
    if source == "stdlib-bpe":
        return cfg.tokenizer.vocab_size
    try:
        return len(AutoTokenizer.from_pretrained(source, local_files_only=True))
    except Exception as err:  # noqa: BLE001 (whatever the tokenizer files' reader raises, re-raised)
        raise ConfigError(f"the tokenizer in {source} cannot be loaded: {err}") from None


def check_vocabulary(cfg: RunConfig, model: nn.Module, model_dir: str, key: str) -> None:
    """A local model's embedding must cover every token id of the run's tokenizer."""
    rows = model.get_input_embeddings().weight.shape[0]
    needed = tokenizer_size(cfg, model_dir)
    if rows < needed:
        raise ConfigError(f"{key}: the model in {model_dir} has a vocabulary of {rows} tokens, smaller than the "
                          f"tokenizer's {needed}: save the model's tokenizer beside it, or set tokenizer.source to it")


def _named(key: str, check, value):
    try:
        return check(value)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{key}: {err}") from err
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from err


def check_weights(model_dir: str | Path, key: str) -> None:
    """The weights in ``model_dir`` are the model its ``config.json`` describes: every parameter present
    (tied ones may be absent) with the configured shape. transformers' own loader on the ``meta``
    device decides (its key renamings and tied weights included), reading file headers only; without
    this check a mismatch would silently train a randomly initialised model."""
    try:
        with _quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(model_dir, device_map="meta", local_files_only=True,
                                                               output_loading_info=True, ignore_mismatched_sizes=True,
                                                               use_kernels=False)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ConfigError(f"{key}: the weights in {model_dir} cannot be read against its config.json "
                          f"({type(err).__name__}: {str(err).splitlines()[0][:300]})") from None
    expected = sum(1 for _ in model.named_parameters())
    missing, mismatched = sorted(info.get("missing_keys") or []), list(info.get("mismatched_keys") or [])
    if mismatched:
        shown = "; ".join(f"{name}: checkpoint {tuple(a)} vs config {tuple(b)}" for name, a, b in
                          (_mismatch(m) for m in mismatched[:3]))
        raise ConfigError(f"{key}: the weights in {model_dir} have other shapes than its config.json gives, for "
                          f"{len(mismatched)} parameters ({shown}); the config and the weights are of different "
                          "models: put the config.json the weights were saved with beside them")
    if missing:
        unexpected = sorted(info.get("unexpected_keys") or [])
        other = f"; the files hold other names instead, e.g. {unexpected[:2]}" if unexpected else ""
        raise ConfigError(f"{key}: the weights in {model_dir} lack {len(missing)} of the {expected} parameters its "
                          f"config.json describes (e.g. {missing[:3]}){other}. They would be randomly initialised: "
                          "put the config.json the weights were saved with beside them")


def _mismatch(entry) -> tuple[str, tuple, tuple]:
    """``(name, checkpoint shape, model shape)`` of one ``mismatched_keys`` entry (a tuple or a name)."""
    if isinstance(entry, (tuple, list)) and len(entry) == 3:
        return entry[0], entry[1], entry[2]
    return str(entry), (), ()


@contextlib.contextmanager
def _quiet_transformers():
    """transformers prints a loading report (MISSING / MISMATCH tables) and a progress bar; this check says
    it in one line."""
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def check_text_sources(source: str | list[str], key: str) -> None:
    """Each corpus entry is ``stdlib`` or an existing file / directory of a readable kind."""
    for item in [source] if isinstance(source, str) else source:
        if item == "stdlib":
            continue
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"{key}: {item!r} does not exist; use 'stdlib', a local file or a directory "
                                    f"of {'/'.join(TEXT_EXTENSIONS)} files")
        if path.is_dir():
            if not any(p.is_file() and p.suffix in TEXT_EXTENSIONS for p in path.rglob("*")):
                raise ConfigError(f"{key}: directory {item!r} holds no {'/'.join(TEXT_EXTENSIONS)} files")
        elif path.suffix not in TEXT_EXTENSIONS:
            raise ConfigError(f"{key}: {item!r} has the unknown extension {path.suffix!r}; supported: "
                              f"{', '.join(TEXT_EXTENSIONS)}")


def check_table_file(item: str, key: str) -> None:
    path = Path(item)
    if not path.is_file():
        raise FileNotFoundError(f"{key}: {item!r} is not an existing file; pass a local "
                                f"{'/'.join(TABLE_FORMATS)} file with prompt, chosen and rejected, or 'embedded'")
    if path.suffix not in TABLE_FORMATS:
        raise ConfigError(f"{key}: {item!r} has the unknown extension {path.suffix!r}; supported: "
                          f"{', '.join(TABLE_FORMATS)}")


def skeleton_model(cfg: RunConfig, model_dir: str | None = None, key: str = "init_from") -> nn.Module:
    """The recipe's model on the ``meta`` device (shapes only, no memory, no weights read)."""
    if model_dir is None:
        m = cfg.model
        config = tiny_config(m.arch, vocab_size=cfg.tokenizer.vocab_size, hidden_size=m.hidden_size,
                             num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads or m.num_heads,
                             intermediate_size=m.intermediate_size or 4 * m.hidden_size, max_seq_len=m.max_seq_len,
                             tie_word_embeddings=m.tie_word_embeddings)
    else:
        try:
            model_type = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")).get("model_type")
        except (ValueError, AttributeError) as err:
            raise ConfigError(f"{key}: {model_dir}/config.json is not a JSON object ({err})") from None
        if model_type not in ARCHITECTURES and not _roles_inferable(model_dir):
            raise ConfigError(
                f"{key}: {model_dir} holds a {model_type!r} model, which has no role table; supported: "
                f"{sorted(ARCHITECTURES)}. Add an ArchSpec row to weightgeom.hooks.roles.ARCHITECTURES (block list, "
                "final norm, unembedding, each role's module path), or run with instruments.enabled=false")
        try:
            config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(f"{key}: {model_dir}/config.json cannot be read by transformers: {err}") from err
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError, KeyError, RuntimeError) as err:
        raise ConfigError(f"{key if model_dir else 'model'}: transformers cannot build this model: {err}") from err


def _roles_inferable(model_dir: str) -> bool:
    """Whether the instruments' generic fallback maps a model type that has no row (roles found by module
    names, weightgeom.hooks.roles.arch_spec_for), checked on a weightless skeleton. Its warning naming the
    mapping is left to the skeleton the instruments check next, and to the run."""
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore", InferredRolesWarning)
            arch_spec_for(AutoModelForCausalLM.from_config(config))
    except Exception:  # noqa: BLE001 (unreadable, unbuildable or unmappable alike: the caller's error says what to do)
        return False
    return True


def measured_dims(model: nn.Module, cfg: SuiteConfig) -> dict[str, int]:
    """``{"L0/q input": n, "L0/o output": m, ...}``: the dimension of each space a streamed
    subspace lives in (input side of ``input_roles``; output side of ``output_roles`` and of the
    tracked write roles, whose ``rsf_out_pred`` uses the prediction subspace)."""
    tracked = resolve_tracked(model, cfg.roles, None, cfg.layers)
    dims = {}
    for tm in tracked:
        w = getattr(tm.module, "base_layer", tm.module).weight
        out_dim, in_dim = (w.shape[1], w.shape[0]) if tm.transposed else (w.shape[0], w.shape[1])
        if tm.rows is not None:
            out_dim = len(tm.rows)
        if tm.role in cfg.input_roles:
            dims[f"{tm.key} input"] = in_dim
        if tm.role in cfg.output_roles or tm.role in WRITE_ROLES:
            dims[f"{tm.key} output"] = out_dim
    return dims


def check_instruments(model: nn.Module, cfg: SuiteConfig) -> list[str]:
    """The instruments fit this model: roles and layers exist, and ``instruments.k`` is below every
    measured dimension (at ``k >= dim`` a relative RSF is 1 by construction: the subspace is the whole
    space). ``k_curve`` points that do not fit a matrix are left out of the reports' curves (visible
    there), so they need no error. Returns warnings (none at present)."""
    try:
        dims = measured_dims(model, cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if not dims:
        raise ConfigError(f"instruments.roles {list(cfg.roles)} match no matrix of this model "
                          f"(input_roles {list(cfg.input_roles)}, output_roles {list(cfg.output_roles)})")
    where, smallest = min(dims.items(), key=lambda kv: kv[1])
    if cfg.k >= smallest:
        raise ConfigError(f"instruments.k={cfg.k} is not below the smallest measured dimension of this model "
                          f"({smallest}, {where}): a top-k subspace of a {smallest}-dimensional space is the whole "
                          f"space, so every relative RSF would read 1. Use instruments.k <= {smallest - 1}.")
    return []
