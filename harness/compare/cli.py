"""harness compare: static read/write geometry of weight deltas between local checkpoints.

    harness compare BASE AFTER                       # the delta between two checkpoints
    harness compare init AFTER --seeds 0 1 2         # the whole delta training wrote: AFTER - random inits
    harness compare series CK1 CK2 CK3               # a series in order: cumulative and incremental deltas
    harness compare series RUN/pretrain              # ... or every checkpoint of a folder, by step

    harness compare runs/asym/pretrain/checkpoints/step_0000030 runs/asym/align/g1.00/checkpoints/step_0000006
    harness compare BASE AFTER --text /data/sample.jsonl --k 4 --unembed base --out cmp/
    harness compare BASE AFTER --c-a RUN/align/g1.00/instruments/step_0000006.safetensors
    harness compare init smollm2-135m-instruct --seeds 0 1 2 --mass ce dpo g0 g0.5 g1 --out cmp_init/

`init` as BASE means a random initialisation of AFTER's config (a folder named init: ./init). --mass adds the
mechanism: the mass of each loss's C_delta (measured on AFTER) in the prediction subspace.
Prints the mean-over-layers table and writes report.md, JSON and PNGs to --out.
Python: weightgeom.harness.compare.analysis.compare(BASE, AFTER, CompareOptions(...)), compare_init (init.py),
compare_series (series.py); the options are the object these flags fill; docs/compare.md explains the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from weightgeom.harness.compare.options import (
    C_A_MODELS,
    INIT,
    MASS_LOSS_HELP,
    MASS_MODELS,
    UNEMBED_CHOICES,
    CompareOptions,
)

DEFAULT_OUT = "compare"
SERIES = "series"
DEFAULTS = CompareOptions()  # every flag's default is the Python API's
NEGATED = {"zscores": "no_zscores", "read_side": "no_read_side"}  # fields set off by a --no-... flag


def _int_list(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,4,8, got {value!r}") from err


class _Items(argparse.Action):
    """``--seeds 0 1 2`` or ``--seeds 0,1,2``: one flat list of the items."""

    def __init__(self, *args, item=str, **kwargs):
        self.item = item
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        items = []
        for value in values:
            for part in str(value).split(","):
                if part.strip():
                    try:
                        items.append(self.item(part.strip()))
                    except ValueError:
                        parser.error(f"{option_string}: {part!r} is not a valid value")
        setattr(namespace, self.dest, items)


def add_compare_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``compare`` subcommand to an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "compare", help="static read/write geometry of weight deltas: two checkpoints, AFTER vs a random init, "
                        "or a series",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="CHECKPOINT",
                   help="BASE AFTER (model directories, .gguf files or short names such as smollm2-135m-instruct), "
                        "or 'init AFTER', or 'series CK1 CK2 ...' / 'series DIR'")
    p.add_argument("--text", default=DEFAULTS.text,
                   help="text sample for C_a and the CE mechanism: 'stdlib' (embedded corpus, default), a "
                        ".txt/.jsonl/.json/.parquet file or a directory")
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
                   help="which checkpoint runs over the text to measure C_a (default base; after when BASE is init)")
    p.add_argument("--n-tokens", type=int, default=DEFAULTS.n_tokens,
                   help=f"non-padding tokens in the C_a sample (default {DEFAULTS.n_tokens})")
    p.add_argument("--seq-len", type=int, default=DEFAULTS.seq_len,
                   help=f"tokens per sequence, capped at the model's positions (default {DEFAULTS.seq_len})")
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                   help=f"sequences per forward (default {DEFAULTS.batch_size})")
    p.add_argument("--no-zscores", action="store_true", help="skip the z-scores against random subspaces")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of the token (and pair) sample")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the one saved in BASE; AFTER's for init)")
    p.add_argument("--no-read-side", action="store_true",
                   help="the write side only: no C_a, no RSF_in (no pass over --text unless --mass ce)")
    p.add_argument("--layers", nargs="+", action=_Items, item=int, default=DEFAULTS.layers,
                   help="only these layers (default: all), e.g. --layers 0 15 29")
    p.add_argument("--seeds", nargs="+", action=_Items, item=int, default=list(DEFAULTS.seeds),
                   help="init only: the random initialisations' seeds (default 0), e.g. --seeds 0 1 2")
    p.add_argument("--mass", nargs="+", action=_Items, default=list(DEFAULTS.mass), metavar="LOSS",
                   help=f"the mechanism: C_delta's mass in the prediction subspace for each loss: {MASS_LOSS_HELP}; "
                        "e.g. --mass ce dpo g0 g0.5 g1")
    p.add_argument("--mass-model", choices=MASS_MODELS, default=DEFAULTS.mass_model,
                   help="whose C_delta the mechanism measures (default after; a preference loss's reference is that "
                        "same model)")
    p.add_argument("--mass-tokens", type=int, default=DEFAULTS.mass_tokens,
                   help=f"tokens of --text for the CE mechanism (default {DEFAULTS.mass_tokens})")
    p.add_argument("--pairs", default=DEFAULTS.pairs,
                   help="preference pairs for a preference loss's mechanism: docstrings (default), embedded, or a "
                        "local .jsonl/.json/.parquet file with prompt/chosen/rejected")
    p.add_argument("--n-pairs", type=int, default=DEFAULTS.n_pairs,
                   help=f"pairs for a preference loss's mechanism (default {DEFAULTS.n_pairs})")
    p.add_argument("--max-len", type=int, default=DEFAULTS.max_len,
                   help=f"tokens per pair sequence (default {DEFAULTS.max_len})")
    p.add_argument("--beta", type=float, default=DEFAULTS.beta,
                   help=f"a preference loss's temperature (default {DEFAULTS.beta})")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default ./{DEFAULT_OUT})")
    return p


def options_from_args(args: argparse.Namespace) -> CompareOptions:
    """The :class:`CompareOptions` the flags fill: each field is the flag of the same name (``--k-curve`` is
    ``k_curve``), ``--no-zscores`` and ``--no-read-side`` the ones negated."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(CompareOptions) if f.name not in NEGATED}
    return CompareOptions(**given, **{name: not getattr(args, flag) for name, flag in NEGATED.items()})


def mode(paths: list[str]) -> tuple[str, list[str]]:
    """``("pair", [BASE, AFTER])``, ``("init", [AFTER])`` or ``("series", [...])`` from the positional paths."""
    if paths[0] == SERIES:
        if len(paths) < 2:
            raise ValueError("compare series: pass two or more checkpoints in order, or one folder holding them")
        return SERIES, paths[1:]
    if len(paths) != 2:
        raise ValueError(f"compare takes BASE AFTER, 'init AFTER' or 'series CK1 CK2 ...'; got {len(paths)} paths "
                         f"({' '.join(paths)})")
    if paths[0] == INIT:
        return INIT, paths[1:]
    return "pair", paths


def compare_command(args: argparse.Namespace) -> int:
    """Run a comparison from parsed arguments; print the table and the report path."""
    from weightgeom.core.locations import check_output_file  # noqa: PLC0415

    kind, paths = mode(args.paths)
    options = options_from_args(args)
    if kind != INIT and options.seeds != DEFAULTS.seeds:
        raise ValueError("--seeds applies to 'harness compare init AFTER' only (BASE = a random initialisation)")
    check_output_file(args.out, "--out")  # before any model is loaded
    if kind == INIT:
        return _init(paths[0], options, args)
    if kind == SERIES:
        return _series(paths, options, args)
    from weightgeom.harness.compare.analysis import compare  # noqa: PLC0415 (torch and transformers: not for --help)

    result = compare(paths[0], paths[1], options, device=args.device, out_dir=args.out)
    _print_result(result)
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def _print_result(result) -> None:
    from weightgeom.harness.compare.report import mass_table, mean_table  # noqa: PLC0415

    if result.no_delta:
        print(f"no delta: {result.notes[0]}")
    else:
        if result.c_a_source:
            print(f"C_a: {result.c_a_source}")
        print(f"prediction subspace: {result.unembed.upper()}'s W_U, eigengap {result.gap_pred:.3g}")
        print(mean_table(result))
        if result.mass:
            print("mechanism: C_delta's mass in the prediction subspace (relative, 1 = isotropic)")
            print(mass_table(result.mass))
    for note in result.notes[1:] if result.no_delta else result.notes:
        print(f"note: {note}")


def _init(after: str, options: CompareOptions, args: argparse.Namespace) -> int:
    from weightgeom.harness.compare.init import compare_init  # noqa: PLC0415
    from weightgeom.harness.compare.report import init_curve_table, init_mean_table, mass_table  # noqa: PLC0415

    init = compare_init(after, options, device=args.device, out_dir=args.out, progress=True)
    print(f"AFTER - random init of its config (seeds {', '.join(map(str, init.seeds))}; mean ± sd over seeds of the "
          "mean over layers)")
    print(init_mean_table(init))
    curves = init.curve_summary("out")
    if curves:
        print("relative RSF_out vs the prediction subspace, against k:")
        print(init_curve_table(curves))
    if init.results[0].mass:
        print("mechanism: C_delta's mass in the prediction subspace (relative, 1 = isotropic)")
        print(mass_table(init.results[0].mass))
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def _series(paths: list[str], options: CompareOptions, args: argparse.Namespace) -> int:
    from weightgeom.harness.compare.series import compare_series  # noqa: PLC0415

    series = compare_series(paths[0] if len(paths) == 1 else paths, options, device=args.device, out_dir=args.out,
                            progress=True)
    print(f"series of {len(series.paths)} checkpoints: {Path(args.out) / 'series.jsonl'}")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0
