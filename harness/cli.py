"""``harness``: run recipes, write reports, check configs.

    harness run recipes/asymmetry.yaml                  # the paper's experiment, end to end
    harness run asymmetry_smoke train.steps=50          # bundled recipe by name, with overrides
    harness run recipes/ce_tiny.yaml --resume latest    # continue from the newest checkpoint
    harness report runs/asymmetry                       # Markdown + PNG report from saved files
    harness validate recipes/asymmetry.yaml             # print the resolved config, run nothing
    harness compare BASE_DIR AFTER_DIR --out cmp/       # static geometry of the delta between two checkpoints
    harness prepare-data /data/corpus/ --out /data/tok  # pre-tokenize text into token shards
    harness rank1 runs/asymmetry                        # causal test: rank-1 edits vs matched controls
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.compare_cli import add_compare_parser, compare_command
from harness.prepare_data_cli import add_prepare_data_parser, prepare_data_command
from harness.rank1_cli import add_rank1_parser, rank1_command

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def resolve_recipe(name: str) -> Path:
    """A path to a YAML file, or the name of a bundled recipe (``asymmetry`` -> recipes/asymmetry.yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    bundled = RECIPES_DIR / f"{name.removesuffix('.yaml')}.yaml"
    if bundled.is_file():
        return bundled
    available = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"recipe {name!r} not found: not a file, and not a bundled recipe ({available})")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a recipe (pretraining, alignment, report)")
    run.add_argument("recipe", help="YAML file or bundled recipe name")
    run.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=100")
    run.add_argument("--resume", help="checkpoint directory, or 'latest' (pretraining runs)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    report = sub.add_parser("report", help="write RUN_DIR/report/report.md and plots from saved files")
    report.add_argument("run_dir")
    validate = sub.add_parser("validate", help="load and validate a recipe, print the resolved config")
    validate.add_argument("recipe")
    validate.add_argument("overrides", nargs="*")
    add_compare_parser(sub)
    add_prepare_data_parser(sub)
    add_rank1_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may follow options too: `harness run asymmetry --overwrite train.steps=10`
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    # Imported after parsing so that `harness --help` answers in a blink: the pipeline imports torch,
    # transformers and TRL (seconds).
    import yaml  # noqa: PLC0415

    from core.config import ConfigError, load_config, to_dict  # noqa: PLC0415
    from harness.pipeline import run_recipe, validate_recipe, write_report  # noqa: PLC0415

    try:
        if args.command == "compare":
            return compare_command(args)
        if args.command == "report":
            print(write_report(Path(args.run_dir)))
            return 0
        if args.command == "prepare-data":
            return prepare_data_command(args)
        if args.command == "rank1":
            return rank1_command(args)
        cfg = load_config(resolve_recipe(args.recipe), args.overrides)
        if args.command == "validate":
            validate_recipe(cfg)
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            return 0
        out = run_recipe(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
        print(f"done: {out}")
        return 0
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"harness: error: {err}", file=sys.stderr)
        return 2
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Under torchrun, tear the process group down before exit: a gloo group left alive at
    interpreter shutdown can abort a rank ("terminate called without an active exception")."""
    if "torch" not in sys.modules:  # --help never started one
        return
    import torch.distributed as dist  # noqa: PLC0415

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
