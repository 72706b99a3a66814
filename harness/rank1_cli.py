"""``harness rank1``: closed-form rank-1 interventions on a pipeline run's pretrained model, or a checkpoint.

    harness rank1 runs/asymmetry                                 # base = the run's final pretraining checkpoint
    harness rank1 runs/asymmetry --layers 1 2 --roles q o --eps 0.25
    harness rank1 /models/my-ckpt --pairs prefs.jsonl --text corpus/ --out runs/rank1_mine

With a run directory (one holding ``config.yaml``), the base model is the run's last pretraining
checkpoint (``RUN/pretrain/`` for a pipeline, ``RUN/`` for a pretraining-only run, ``init_from`` for
an alignment-only recipe); the preference pairs are the recipe's (``align.data``), split by
``--eval-fraction`` into pairs for ``G`` and held-out pairs; the held-out text is the pretraining
corpus's eval split (``data.*`` of the recipe). Results go to ``RUN/rank1/`` and, for a pipeline
with alignment runs, the asymmetry report is re-rendered with a rank-1 section.

With a checkpoint directory (``config.json`` + weights), ``--pairs FILE`` and ``--out DIR`` are
required; the text comes from ``--text`` (default: the embedded stdlib corpus), which is held out
only if the checkpoint never trained on it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DTYPES = ("float32", "float64", "bfloat16")


def add_rank1_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``rank1`` on an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser("rank1", help="causal test: rank-1 edits along tested directions vs matched controls",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--layers", type=int, nargs="+", help="layers to edit (default: all)")
    p.add_argument("--roles", nargs="+", default=["q", "k", "o", "down"],
                   help="roles to edit: read roles (q k v gate up) on the input side, write roles (o down) on the "
                        "output side (default: q k o down)")
    p.add_argument("--eps", type=float, default=0.5, help="Frobenius norm of each edit (default 0.5)")
    p.add_argument("--eps-small", type=float, help="norm for the per-unit-norm changes (default eps / 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the control directions (default 0)")
    p.add_argument("--n-top", type=int, default=1, help="tested directions per source (default 1)")
    p.add_argument("--n-random", type=int, default=20, help="Haar-random controls per matrix (default 20)")
    p.add_argument("--n-matched", type=int, default=10,
                   help="variance-matched controls per tested direction (default 10)")
    p.add_argument("--n-lower", type=int, default=4, help="lower principal directions per source (default 4)")
    p.add_argument("--tol", type=float, default=0.1, help="relative band of the variance matching (default 0.1)")
    p.add_argument("--pred-centered", action="store_true",
                   help="prediction subspace of the vocab-centred unembedding (drops the shared logit shift)")
    p.add_argument("--beta", type=float, help="DPO beta (default: the recipe's align.beta, else 0.1)")
    p.add_argument("--pairs", help="preference file (.jsonl/.json/.parquet with prompt/chosen/rejected); "
                                   "required with a checkpoint directory")
    p.add_argument("--eval-fraction", type=float, default=0.2,
                   help="share of the pairs held out for measuring (the rest give G; default 0.2)")
    p.add_argument("--max-pairs", type=int, help="use at most this many training pairs for G")
    p.add_argument("--max-len", type=int,
                   help="tokens per pair sequence (default: the recipe's align.max_len, else 128)")
    p.add_argument("--text", nargs="+", help="text for CE/KL with a checkpoint directory: 'stdlib' or local "
                                             "files/directories (default stdlib)")
    p.add_argument("--text-blocks", type=int, default=16, help="held-out text blocks for CE and KL (default 16)")
    p.add_argument("--seq-len", type=int, help="tokens per text block (default: the recipe's data.seq_len, else 128)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass (default 32)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the model while measuring")
    p.add_argument("--out", help="output directory (default RUN/rank1 for a run directory)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def rank1_command(args: argparse.Namespace) -> int:
    """Run the experiment described by parsed ``args``; write JSON, Markdown and PNG; print the paths."""
    import torch  # noqa: PLC0415

    from harness.rank1 import run_rank1, write_rank1_report  # noqa: PLC0415

    path = Path(args.path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory: pass a run directory (with config.yaml) or a "
                                "checkpoint directory (with config.json)")
    if not 0 < args.eval_fraction < 1:
        raise ValueError(f"--eval-fraction must be in (0, 1), got {args.eval_fraction}")
    if args.text_blocks < 1:
        raise ValueError(f"--text-blocks must be >= 1, got {args.text_blocks}")
    if args.max_pairs is not None and args.max_pairs < 1:
        raise ValueError(f"--max-pairs must be >= 1, got {args.max_pairs}")
    inputs = _run_inputs(path, args) if (path / "config.yaml").is_file() else _checkpoint_inputs(path, args)
    train, held = inputs["pairs"], inputs["eval_pairs"]
    if args.max_pairs is not None:
        train = train[: args.max_pairs]
    print(f"[rank1] base {inputs['base']}: {len(train)} pairs for G, {len(held)} held-out pairs, "
          f"{inputs['text_blocks'].shape[0]} text blocks of {inputs['text_blocks'].shape[1]} tokens")
    result = run_rank1(inputs["base"], pairs=train, eval_pairs=held, text_blocks=inputs["text_blocks"],
                       layers=args.layers, roles=args.roles, eps=args.eps, eps_small=args.eps_small,
                       n_random=args.n_random, n_matched=args.n_matched, n_top=args.n_top, n_lower=args.n_lower,
                       tol=args.tol, pred_centered=args.pred_centered, seed=args.seed,
                       beta=inputs["beta"], max_len=inputs["max_len"], batch_size=args.batch_size,
                       tokenizer=inputs["tokenizer"], dtype=getattr(torch, args.dtype), progress=not args.no_progress)
    result.config.update(source=str(path), text_source=inputs["text_source"], eval_fraction=args.eval_fraction)
    report = write_rank1_report(result, inputs["out"])
    print(f"[rank1] {report}")
    if inputs["out"] == path / "rank1" and (path / "align").is_dir():
        from harness.asymmetry import write_asymmetry_report  # noqa: PLC0415

        print(f"[rank1] asymmetry report with the rank-1 section: {write_asymmetry_report(path)}")
    return 0


def _run_inputs(run_dir: Path, args) -> dict:
    from harness.build import build_corpus  # noqa: PLC0415
    from harness.checkpoint import checkpoint_dir, is_complete, latest_checkpoint  # noqa: PLC0415
    from harness.config import load_config  # noqa: PLC0415
    from harness.pipeline import alignment_tokenizer, load_pairs  # noqa: PLC0415

    cfg = load_config(run_dir / "config.yaml")
    if "pretrain" in cfg.stages:
        stage_dir = run_dir / "pretrain" if (run_dir / "pretrain").is_dir() else run_dir
        final = checkpoint_dir(stage_dir, cfg.train.steps)
        base = final if is_complete(final) else latest_checkpoint(stage_dir)
        if base is None:
            raise FileNotFoundError(f"{stage_dir}/checkpoints holds no complete pretraining checkpoint; finish the run "
                                    f"first (`harness run {run_dir / 'config.yaml'} --resume latest`)")
    elif cfg.init_from:
        base = Path(cfg.init_from)
    else:
        raise ValueError(f"{run_dir}/config.yaml has no pretraining stage and no init_from: no base model to edit")
    tokenizer = alignment_tokenizer(cfg, base)
    if args.pairs:
        pairs = _pairs_file(args.pairs)
    else:
        pairs = load_pairs(cfg)
    train, held = _split(pairs, args.eval_fraction, cfg.seed)
    if args.seq_len is not None:
        cfg.data.seq_len = args.seq_len
    _, eval_blocks = build_corpus(cfg, tokenizer)
    if len(eval_blocks) == 0:
        raise ValueError(f"the recipe's pretraining corpus has no eval split (data.eval_fraction = "
                         f"{cfg.data.eval_fraction}); there is no held-out text to measure CE and KL on")
    return {"base": base, "pairs": train, "eval_pairs": held, "text_blocks": eval_blocks[: args.text_blocks],
            "tokenizer": tokenizer, "beta": args.beta or cfg.align.beta, "max_len": args.max_len or cfg.align.max_len,
            "out": Path(args.out) if args.out else run_dir / "rank1",
            "text_source": f"held-out split of the recipe's corpus ({cfg.data.source})"}


def _checkpoint_inputs(ckpt: Path, args) -> dict:
    from harness.data import build_lm_blocks, load_texts  # noqa: PLC0415
    from harness.tokenizer import load_tokenizer  # noqa: PLC0415

    if not (ckpt / "config.json").is_file():
        raise FileNotFoundError(f"{ckpt} holds neither config.yaml (a run directory) nor config.json (a model "
                                "checkpoint directory)")
    if not args.pairs:
        raise ValueError("with a checkpoint directory, pass the preference pairs: --pairs FILE")
    if not args.out:
        raise ValueError("with a checkpoint directory, pass an output directory: --out DIR (nothing is written "
                         "into the checkpoint)")
    tokenizer = load_tokenizer(str(ckpt), 0, Path("."))
    train, held = _split(_pairs_file(args.pairs), args.eval_fraction, args.seed)
    seq_len = args.seq_len or 128
    texts = load_texts(args.text or "stdlib")
    blocks, _ = build_lm_blocks(texts, tokenizer, seq_len, eval_fraction=0.0, seed=args.seed,
                                max_tokens=seq_len * (args.text_blocks + 1))
    return {"base": ckpt, "pairs": train, "eval_pairs": held, "text_blocks": blocks[: args.text_blocks],
            "tokenizer": tokenizer, "beta": args.beta or 0.1, "max_len": args.max_len or 128, "out": Path(args.out),
            "text_source": f"{args.text or 'stdlib'} (held out only if the checkpoint never trained on it)"}


def _pairs_file(path: str) -> list[dict]:
    from harness.data import load_preference_pairs  # noqa: PLC0415

    pairs, stats = load_preference_pairs(path)
    print(f"[rank1] {path}: {stats.n_valid} of {stats.n_rows} rows used")
    return pairs


def _split(pairs: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded split into pairs for G and held-out pairs (at least one of each)."""
    import random  # noqa: PLC0415

    if len(pairs) < 2:
        raise ValueError(f"need at least 2 preference pairs (one for G, one held out), got {len(pairs)}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(pairs) - 1, max(1, round(len(pairs) * eval_fraction)))
    return [pairs[i] for i in order[n_eval:]], [pairs[i] for i in order[:n_eval]]
