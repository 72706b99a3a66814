"""The inputs of ``harness rank1`` (a pipeline run's recipe, or a checkpoint with a preference file)
and the run itself; the command-line parser is in harness/rank1/cli.py."""

from __future__ import annotations

import argparse
from dataclasses import fields, replace
from pathlib import Path

import torch

from weightgeom.core.checkpoint import checkpoint_dir, is_complete, latest_checkpoint
from weightgeom.core.config import Rank1Config, load_config
from weightgeom.core.data import load_preference_pairs, load_texts
from weightgeom.core.locations import check_output_file
from weightgeom.core.model_sources import resolve_model
from weightgeom.core.shards import load_corpus
from weightgeom.core.stage_inputs import corpus_cache, load_pairs, split_pairs, stage_tokenizer, starting_model
from weightgeom.core.tokenizer import load_tokenizer
from weightgeom.harness.rank1.experiment import run_rank1
from weightgeom.harness.rank1.report import rank1_section, write_rank1_report
from weightgeom.harness.reports.asymmetry import write_asymmetry_report


def run_from_args(args: argparse.Namespace) -> int:
    """``harness rank1``: gather the inputs (a run directory or a checkpoint), run, write the report."""
    path = resolve_model(args.path)  # a .gguf file or short name: its dequantized directory (cached)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory: pass a run directory (with config.yaml) or a "
                                "checkpoint directory (with config.json)")
    if args.eval_fraction is not None and not 0 < args.eval_fraction < 1:
        raise ValueError(f"--eval-fraction must be in (0, 1), got {args.eval_fraction}")
    if args.text_blocks is not None and args.text_blocks < 1:
        raise ValueError(f"--text-blocks must be >= 1, got {args.text_blocks}")
    if args.max_pairs is not None and args.max_pairs < 1:
        raise ValueError(f"--max-pairs must be >= 1, got {args.max_pairs}")
    if args.out:
        check_output_file(args.out, "--out")  # before minutes of edits, not after
    inputs = _run_inputs(path, args) if (path / "config.yaml").is_file() else _checkpoint_inputs(path, args)
    config = config_from_args(args, inputs["config"])
    train, held = inputs["pairs"], inputs["eval_pairs"]
    if config.max_pairs is not None:
        train = train[: config.max_pairs]
    blocks = inputs["text_blocks"][: config.text_blocks]
    print(f"[rank1] base {inputs['base']}: {len(train)} pairs for G, {len(held)} held-out pairs, "
          f"{blocks.shape[0]} text blocks of {blocks.shape[1]} tokens")
    seed, beta = run_settings(args, inputs["seed"], inputs["beta"])
    result = run_rank1(inputs["base"], pairs=train, eval_pairs=held, text_blocks=blocks, config=config, seed=seed,
                       beta=beta, max_len=inputs["max_len"], tokenizer=inputs["tokenizer"],
                       dtype=getattr(torch, args.dtype), progress=not args.no_progress)
    result.config.update(source=str(path), text_source=inputs["text_source"], eval_fraction=inputs["eval_fraction"])
    report = write_rank1_report(result, inputs["out"])
    print(f"[rank1] {report}")
    if inputs["out"] == path / "rank1" and (path / "align").is_dir():
        asymmetry = write_asymmetry_report(path, sections=rank1_section(path))
        print(f"[rank1] asymmetry report with the rank-1 section: {asymmetry}")
    return 0


def _run_inputs(run_dir: Path, args) -> dict:
    cfg = load_config(run_dir / "config.yaml")
    if "pretrain" in cfg.stages:
        stage_dir = run_dir / "pretrain" if (run_dir / "pretrain").is_dir() else run_dir
        final = checkpoint_dir(stage_dir, cfg.train.steps)
        base = final if is_complete(final) else latest_checkpoint(stage_dir)
        if base is None:
            raise FileNotFoundError(f"{stage_dir}/checkpoints holds no complete pretraining checkpoint; finish the run "
                                    f"first (`harness run {run_dir / 'config.yaml'} --resume latest`)")
    elif cfg.init_from:
        base = starting_model(cfg)
    else:
        raise ValueError(f"{run_dir}/config.yaml has no pretraining stage and no init_from: no base model to edit")
    tokenizer = stage_tokenizer(cfg, base)
    if args.pairs:
        pairs = _pairs_file(args.pairs)
    else:
        pairs, _ = load_pairs(cfg, tokenizer)
    train, held = _split(pairs, args.eval_fraction or cfg.align.eval_fraction, cfg.seed)
    if args.seq_len is not None:
        cfg.data.seq_len = args.seq_len
    _, eval_blocks = load_corpus(cfg.data, tokenizer, cfg.seed, corpus_cache(cfg))
    if len(eval_blocks) == 0:
        raise ValueError(f"the recipe's pretraining corpus has no eval split (data.eval_fraction = "
                         f"{cfg.data.eval_fraction}); there is no held-out text to measure CE and KL on")
    # the defaults are the recipe's rank1 section, seed and align.beta (the pipeline's rank1 stage): same
    # flags, same result
    return {"base": base, "pairs": train, "eval_pairs": held, "config": cfg.rank1, "seed": cfg.seed,
            "beta": cfg.align.beta, "text_blocks": eval_blocks, "tokenizer": tokenizer, "max_len": args.max_len or
            cfg.align.max_len,
            "out": Path(args.out) if args.out else run_dir / "rank1",
            "eval_fraction": args.eval_fraction or cfg.align.eval_fraction,
            "text_source": f"held-out split of the recipe's corpus ({cfg.data.source})"}


def _checkpoint_inputs(ckpt: Path, args) -> dict:
    if not (ckpt / "config.json").is_file():
        raise FileNotFoundError(f"{ckpt} holds neither config.yaml (a run directory) nor config.json (a model "
                                "checkpoint directory)")
    if not args.pairs:
        raise ValueError("with a checkpoint directory, pass the preference pairs: --pairs FILE")
    if not args.out:
        raise ValueError("with a checkpoint directory, pass an output directory: --out DIR (nothing is written "
                         "into the checkpoint)")
    tokenizer = load_tokenizer(str(ckpt), 0, Path("."))
    train, held = _split(_pairs_file(args.pairs), args.eval_fraction or 0.2, args.seed or 0)
    seq_len = args.seq_len or 128
    defaults = Rank1Config(max_pairs=None)  # with a checkpoint: every training pair gives G, unless --max-pairs
    n_blocks = args.text_blocks or defaults.text_blocks
    blocks = text_blocks(load_texts(args.text or "stdlib"), tokenizer, seq_len, n_blocks)
    return {"base": ckpt, "pairs": train, "eval_pairs": held, "config": defaults, "seed": 0, "beta": 0.1,
            "text_blocks": blocks, "tokenizer": tokenizer, "max_len": args.max_len or 128, "out": Path(args.out),
            "eval_fraction": args.eval_fraction or 0.2,
            "text_source": f"{args.text or 'stdlib'} (held out only if the checkpoint never trained on it)"}


def _pairs_file(path: str) -> list[dict]:
    pairs, stats = load_preference_pairs(path)
    print(f"[rank1] {path}: {stats.n_valid} of {stats.n_rows} rows used")
    return pairs


def _split(pairs: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Pairs for G and held-out pairs, split as the pipeline splits them (at least one of each)."""
    if len(pairs) < 2:
        raise ValueError(f"need at least 2 preference pairs (one for G, one held out), got {len(pairs)}")
    return split_pairs(pairs, eval_fraction, seed)


def text_blocks(texts: list[str], tokenizer, seq_len: int, n_blocks: int) -> torch.Tensor:
    """The first ``n_blocks`` blocks (n_blocks, seq_len) of the token stream ``doc eos doc eos ...``."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the checkpoint's tokenizer has no eos token; documents are joined with eos")
    need, stream = n_blocks * seq_len, []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(stream) >= need:
            return torch.tensor(stream[:need], dtype=torch.long).view(n_blocks, seq_len)
    raise ValueError(f"the text holds {len(stream)} tokens, fewer than --text-blocks x seq_len = {need}; "
                     "pass more text (--text) or fewer/shorter blocks")


def config_from_args(args: argparse.Namespace, defaults: Rank1Config) -> Rank1Config:
    """``defaults`` with the flags that were given (``--roles``, ``--eps``, ``--max-pairs``, ...) in their
    place; a flag left out is None (``--n-lower 0`` is given). ``--seed`` and ``--beta`` are the run's
    settings, applied beside the config (:func:`run_from_args`)."""
    given = {f.name: getattr(args, f.name) for f in fields(Rank1Config) if getattr(args, f.name, None) is not None}
    return replace(defaults, **given)


def run_settings(args: argparse.Namespace, seed: int, beta: float) -> tuple[int, float]:
    """``(seed, beta)``: the flags when given (``--seed 0`` is given), else the run's."""
    return (args.seed if args.seed is not None else seed), (args.beta if args.beta is not None else beta)
