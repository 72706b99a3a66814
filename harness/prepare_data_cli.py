"""``harness prepare-data``: pre-tokenize local text into memory-mapped token shards.

    harness prepare-data /data/corpus/ --out /data/corpus-tok --tokenizer /models/pythia-160m --num-proc 2
    harness prepare-data stdlib --out shards/stdlib --vocab-size 4096

Train on the result with ``data.source=/data/corpus-tok`` and the same tokenizer.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DEFAULT_TOKENIZER_CACHE = "~/.cache/weightgeom"


def add_prepare_data_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``prepare-data`` subcommand on `subparsers` and return its parser."""
    p = subparsers.add_parser(
        "prepare-data", help="pre-tokenize local text into memory-mapped token shards (held-out split by document)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="'stdlib' (the embedded corpus), or local .txt/.jsonl/.json/.parquet files or directories")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist, or be empty)")
    p.add_argument("--tokenizer", default="stdlib-bpe", metavar="stdlib-bpe|LOCAL_DIR",
                   help="the embedded stdlib BPE (default) or a local directory with tokenizer files")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the stdlib BPE (default 4096)")
    p.add_argument("--tokenizer-cache", default=DEFAULT_TOKENIZER_CACHE, metavar="DIR",
                   help=f"where the stdlib BPE is cached (default {DEFAULT_TOKENIZER_CACHE}, as tokenizer.cache_dir)")
    p.add_argument("--text-field", default="text", help="column/key holding the text in .jsonl/.json/.parquet")
    p.add_argument("--eval-fraction", type=float, default=0.02,
                   help="share of tokens held out, in whole documents (default 0.02; 0 for no eval split)")
    p.add_argument("--num-proc", type=int, default=None, help="tokenizer processes (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out document draw (default 0)")
    p.add_argument("--max-tokens", type=int, default=None, help="cap on tokens read (default: all)")
    p.add_argument("--shard-tokens", type=int, default=None, help="tokens per shard file (default 100,000,000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def prepare_data_command(args: argparse.Namespace) -> int:
    """Run ``prepare-data`` for parsed `args`; prints a one-line summary and returns 0.
    Bad input raises (FileNotFoundError / FileExistsError / ValueError) for the CLI to report."""
    from weightgeom.core.locations import check_output_file  # noqa: PLC0415
    from weightgeom.core.shards import DEFAULT_SHARD_TOKENS, prepare_corpus, read_index  # noqa: PLC0415
    from weightgeom.core.tokenizer import load_tokenizer  # noqa: PLC0415

    check_output_file(args.out, "--out")
    check_output_file(args.tokenizer_cache, "--tokenizer-cache")
    started = time.perf_counter()
    tokenizer = load_tokenizer(args.tokenizer, args.vocab_size, Path(args.tokenizer_cache).expanduser())
    out = prepare_corpus(args.sources, tokenizer, args.out, text_field=args.text_field,
                         eval_fraction=args.eval_fraction, seed=args.seed, num_proc=args.num_proc,
                         max_tokens=args.max_tokens, shard_tokens=args.shard_tokens or DEFAULT_SHARD_TOKENS,
                         progress=not args.no_progress)
    index = read_index(out)
    train, held = index["splits"]["train"], index["splits"]["eval"]
    print(f"prepared {out}: train {train['tokens']:,} tokens ({train['documents']:,} docs), "
          f"eval {held['tokens']:,} tokens ({held['documents']:,} docs), {index['dtype']}, "
          f"{time.perf_counter() - started:.1f} s")
    return 0
