"""harness compare BASE AFTER: static read/write geometry of the weight delta between two local checkpoints.

    harness compare runs/asym/pretrain/checkpoints/step_0000030 runs/asym/align/g1.00/checkpoints/step_0000006
    harness compare BASE AFTER --text /data/sample.jsonl --k 4 --unembed base --out cmp/
    harness compare BASE AFTER --c-a RUN/align/g1.00/instruments/step_0000006.safetensors

Prints the mean-over-layers table and writes report.md, compare.json and PNGs to --out.
Python: weightgeom.harness.compare.analysis.compare(BASE, AFTER, CompareOptions(...)), the object these flags
fill; the numbers and choices are explained in docs/compare.md.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from weightgeom.harness.compare.options import C_A_MODELS, UNEMBED_CHOICES, CompareOptions

DEFAULT_OUT = "compare"
DEFAULTS = CompareOptions()  # every flag's default is the Python API's


def _int_list(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,4,8, got {value!r}") from err


def add_compare_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``compare`` subcommand to an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "compare", help="static read/write geometry of the weight delta between two local checkpoints",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", help="BASE model directory (config.json + weights), e.g. RUN/pretrain/checkpoints/step_N, "
                   "a .gguf file or a short name (smollm2-135m-instruct)")
    p.add_argument("after", help="AFTER model directory of the same architecture and shapes")
    p.add_argument("--text", default=DEFAULTS.text,
                   help="text sample for C_a: 'stdlib' (embedded corpus, default), a .txt/.jsonl/.json/.parquet "
                        "file or a directory")
    p.add_argument("--text-field", default=DEFAULTS.text_field,
                   help="column holding the text in .jsonl/.json/.parquet (default: text)")
    p.add_argument("--k", type=int, default=DEFAULTS.k,
                   help=f"subspace dimension (default {DEFAULTS.k}; capped at dim - 1)")
    p.add_argument("--k-curve", type=_int_list, default=list(DEFAULTS.k_curve),
                   help=f"k values of the RSF-vs-k curves (default {','.join(map(str, DEFAULTS.k_curve))})")
    p.add_argument("--unembed", choices=UNEMBED_CHOICES, default=DEFAULTS.unembed,
                   help="whose W_U spans the prediction subspace (default after, as the live metrics)")
    p.add_argument("--c-a", dest="c_a", metavar="SNAPSHOT",
                   help="take C_a from an instrument snapshot (*.safetensors) instead of measuring it on --text")
    p.add_argument("--c-a-model", choices=C_A_MODELS, default=DEFAULTS.c_a_model,
                   help="which checkpoint runs over the text to measure C_a (default base)")
    p.add_argument("--n-tokens", type=int, default=DEFAULTS.n_tokens,
                   help=f"non-padding tokens in the C_a sample (default {DEFAULTS.n_tokens})")
    p.add_argument("--seq-len", type=int, default=DEFAULTS.seq_len,
                   help=f"tokens per sequence, capped at the model's positions (default {DEFAULTS.seq_len})")
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                   help=f"sequences per forward (default {DEFAULTS.batch_size})")
    p.add_argument("--no-zscores", action="store_true", help="skip the z-scores against random subspaces")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of the token sample")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the one saved in BASE)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default ./{DEFAULT_OUT})")
    return p


def options_from_args(args: argparse.Namespace) -> CompareOptions:
    """The :class:`CompareOptions` the flags fill: each field is the flag of the same name (``--k-curve`` is
    ``k_curve``), ``--no-zscores`` the one negated."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(CompareOptions) if f.name != "zscores"}
    return CompareOptions(**given, zscores=not args.no_zscores)


def compare_command(args: argparse.Namespace) -> int:
    """Run :func:`weightgeom.harness.compare.analysis.compare` from parsed arguments; print the table and the report
    path."""
    from weightgeom.core.locations import check_output_file  # noqa: PLC0415
    from weightgeom.harness.compare.analysis import compare  # noqa: PLC0415 (torch and transformers: not for --help)
    from weightgeom.harness.compare.report import mean_table  # noqa: PLC0415

    check_output_file(args.out, "--out")  # before any model is loaded
    result = compare(args.base, args.after, options_from_args(args), device=args.device, out_dir=args.out)
    if result.no_delta:
        print(f"no delta: {result.notes[0]}")
    else:
        print(f"C_a: {result.c_a_source}")
        print(f"prediction subspace: {result.unembed.upper()}'s W_U, eigengap {result.gap_pred:.3g}")
        print(mean_table(result))
    for note in result.notes[1:] if result.no_delta else result.notes:
        print(f"note: {note}")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0
