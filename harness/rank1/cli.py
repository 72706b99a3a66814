"""``harness rank1``: closed-form rank-1 interventions on a pipeline run's pretrained model, or a checkpoint.

    harness rank1 runs/asymmetry                                 # base = the run's final pretraining checkpoint
    harness rank1 runs/asymmetry --layers 1 2 --roles q o --eps 0.25
    harness rank1 /models/my-ckpt --pairs prefs.jsonl --text corpus/ --out runs/rank1_mine

With a run directory (one holding ``config.yaml``), the base model is the run's last pretraining
checkpoint (``RUN/pretrain/`` for a pipeline, ``RUN/`` for a pretraining-only run, ``init_from`` for
an alignment-only recipe); the preference pairs are the recipe's (``align.data``), split by
``--eval-fraction`` into pairs for ``G`` and held-out pairs; the held-out text is the pretraining
corpus's eval split (``data.*`` of the recipe); the settings not given as flags are the recipe's
``rank1:`` section (so ``harness rank1 RUN`` reproduces the pipeline's rank1 stage). Results go to
``RUN/rank1/`` and, for a pipeline with alignment runs, the asymmetry report is re-rendered with a
rank-1 section.

With a checkpoint directory (``config.json`` + weights), ``--pairs FILE`` and ``--out DIR`` are
required; the text comes from ``--text`` (default: the embedded stdlib corpus), which is held out
only if the checkpoint never trained on it.
"""

from __future__ import annotations

import argparse

DTYPES = ("float32", "float64", "bfloat16")


def add_rank1_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``rank1`` on an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser("rank1", help="causal test: rank-1 edits along tested directions vs matched controls",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--layers", type=int, nargs="+", help="layers to edit (default: all)")
    p.add_argument("--roles", nargs="+",
                   help="roles to edit: read roles (q k v gate up) on the input side, write roles (o down) on the "
                        "output side (default: q k o down)")
    p.add_argument("--eps", type=float, help="Frobenius norm of each edit (default 0.5)")
    p.add_argument("--eps-small", type=float, help="norm for the per-unit-norm changes (default eps / 10)")
    p.add_argument("--seed", type=int, help="seed of the control directions (default: the recipe's seed, else 0)")
    p.add_argument("--n-top", type=int, help="tested directions per source (default 1)")
    p.add_argument("--n-random", type=int, help="Haar-random controls per matrix (default 20)")
    p.add_argument("--n-matched", type=int,
                   help="variance-matched controls per tested direction (default 10)")
    p.add_argument("--n-lower", type=int, help="lower principal directions per source (default 4)")
    p.add_argument("--tol", type=float, help="relative band of the variance matching (default 0.1)")
    p.add_argument("--layer-controls", type=int,
                   help="other layers giving the layer-control family, evenly spaced (default: all of them)")
    p.add_argument("--pred-centered", action="store_true", default=None,  # None: not given (the recipe's)
                   help="prediction subspace of the vocab-centred unembedding (drops the shared logit shift)")
    p.add_argument("--beta", type=float, help="DPO beta (default: the recipe's align.beta, else 0.1)")
    p.add_argument("--pairs", help="preference file (.jsonl/.json/.parquet with prompt/chosen/rejected); "
                                   "required with a checkpoint directory")
    p.add_argument("--eval-fraction", type=float,
                   help="share of the pairs held out for measuring, the rest give G (default: the recipe's "
                        "align.eval_fraction for a run directory, so the held-out pairs are the alignment runs' "
                        "held-out pairs; 0.2 for a checkpoint)")
    p.add_argument("--max-pairs", type=int,
                   help="use at most this many training pairs for G (default: the recipe's rank1.max_pairs, else all)")
    p.add_argument("--max-len", type=int,
                   help="tokens per pair sequence (default: the recipe's align.max_len, else 128)")
    p.add_argument("--text", nargs="+", help="text for CE/KL with a checkpoint directory: 'stdlib' or local "
                                             "files/directories (default stdlib)")
    p.add_argument("--text-blocks", type=int,
                   help="held-out text blocks for CE and KL (default: the recipe's rank1.text_blocks, else 16)")
    p.add_argument("--seq-len", type=int, help="tokens per text block (default: the recipe's data.seq_len, else 128)")
    p.add_argument("--batch-size", type=int, help="sequences per forward pass (default 32)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the model while measuring")
    p.add_argument("--out", help="output directory (default RUN/rank1 for a run directory)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def rank1_command(args: argparse.Namespace) -> int:
    """Run the experiment described by parsed ``args``; write JSON, Markdown and PNG; print the paths."""
    from weightgeom.harness.rank1.inputs import run_from_args  # noqa: PLC0415 (torch and transformers: not for --help)

    return run_from_args(args)
