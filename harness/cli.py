"""``harness``: run recipes, write reports, check configs.

    harness run recipes/asymmetry.yaml                  # the paper's experiment, end to end
    harness run asymmetry_smoke train.steps=50          # bundled recipe by name, with overrides
    harness run recipes/ce_tiny.yaml --resume latest    # continue from the newest checkpoint
    harness report runs/asymmetry                       # Markdown + PNG report from saved files
    harness validate recipes/asymmetry.yaml             # print the resolved config, run nothing
    harness compare BASE_DIR AFTER_DIR --out cmp/       # static geometry of the delta between two checkpoints
    harness prepare-data /data/corpus/ --out /data/tok  # pre-tokenize text into token shards
    harness rank1 runs/asymmetry                        # causal test: rank-1 edits vs matched controls
    harness recipes                                     # the bundled recipes, one line each
    harness keys [train.]                               # every recipe key: type, default, meaning

Exit codes: 0 done; 2 bad input (recipe, data, model, output location; nothing was written); 3
training diverged (non-finite values or a dead model; the last good checkpoint is kept); 4 the file
system refused a write (disk full, permissions; the message names the path; complete checkpoints are
kept); 128 + N stopped by signal N (130 Ctrl-C, 143 SIGTERM) after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import threading
from pathlib import Path

from weightgeom import recipes
from weightgeom.harness.compare.cli import add_compare_parser, compare_command
from weightgeom.harness.prepare_data_cli import add_prepare_data_parser, prepare_data_command
from weightgeom.harness.rank1.cli import add_rank1_parser, rank1_command


def resolve_recipe(name: str) -> Path:
    """A path to a YAML file, or the name of a bundled recipe (``asymmetry`` -> weightgeom/recipes/asymmetry.yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    found = recipes.bundled().get(name.removesuffix(".yaml"))
    if found is not None:
        return found
    raise FileNotFoundError(f"recipe {name!r} not found: not a file, and not a bundled recipe "
                            f"({sorted(recipes.bundled())})")


EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_FILE_SYSTEM = 2, 3, 4
MAX_DEFAULT_THREADS = 8


def version() -> str:
    """The installed package's version."""
    import weightgeom  # noqa: PLC0415 (the package root is light: its names load on first use)

    return weightgeom.__version__


def bundled_recipes() -> list[tuple[str, str]]:
    """``[(name, first comment line)]`` of every recipe in recipes/."""
    out = []
    for path in recipes.bundled().values():
        words: list[str] = []
        for line in path.read_text().splitlines():
            if not line.startswith("# ") or line.startswith("#  "):  # the opening sentence, not an example
                break
            words.append(line[2:].strip())
            if line.rstrip().endswith((".", ":")):
                break
        out.append((path.stem, " ".join(words).rstrip(":")))
    return out


def default_threads(environ: dict | None = None, cores: int | None = None) -> tuple[int, str]:
    """(torch threads, why) for a run: ``OMP_NUM_THREADS`` when set, else the cores this process
    may use divided by the processes on this machine (``LOCAL_WORLD_SIZE`` under torchrun), capped
    at :data:`MAX_DEFAULT_THREADS`. Oversubscribed OpenMP threads (two processes with a thread per
    core each) made a step ~20x slower on 2 cores."""
    environ = os.environ if environ is None else environ
    if environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(environ["OMP_NUM_THREADS"]) > 0:
        return int(environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(1, int(environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(MAX_DEFAULT_THREADS, cores // local)), f"{cores} cores / {local} local process(es)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a recipe (pretraining, alignment, report)",
                         description="Run a recipe. Every recipe key can be overridden as key.sub=value; "
                                     "`harness keys` lists them all with types, defaults and meanings.",
                         epilog="common keys: name, output_dir, seed, train.steps, train.lr, train.batch_size, "
                                "train.save_every, train.keep_checkpoints, train.on_nonfinite, model.hidden_size, "
                                "instruments.k, instruments.every_n, align.train.steps, tracking.report_to "
                                "(all of them: harness keys)")
    run.add_argument("recipe", help="YAML file or bundled recipe name (harness recipes)")
    run.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=100 (harness keys)")
    run.add_argument("--resume", help="checkpoint directory, or 'latest' (pipelines: 'latest' only)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    run.add_argument("--no-progress", action="store_true", help="no progress bars (also none from transformers)")
    add_threads_flag(run)
    report = sub.add_parser("report", help="write RUN_DIR/report/report.md and plots from saved files")
    report.add_argument("run_dir")
    validate = sub.add_parser("validate", help="load and validate a recipe, print the resolved config")
    validate.add_argument("recipe")
    validate.add_argument("overrides", nargs="*")
    sub.add_parser("recipes", help="list the bundled recipes")
    keys = sub.add_parser("keys", help="list every recipe key with its type, default and meaning")
    keys.add_argument("filter", nargs="?", help="only keys containing this text, e.g. train.")
    for add in (add_compare_parser, add_prepare_data_parser, add_rank1_parser):
        add_threads_flag(add(sub))
    return parser


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: OMP_NUM_THREADS, else cores / "
                                                    f"local processes, at most {MAX_DEFAULT_THREADS})")


def _set_threads(explicit: int | None) -> None:
    """Before torch is imported: its OpenMP pool reads OMP_NUM_THREADS once. In a program that
    imported torch already (tests, notebooks) only an explicit --threads changes anything."""
    if explicit is not None and explicit < 1:
        raise SystemExit(f"harness: error: --threads must be >= 1, got {explicit}")
    if "torch" in sys.modules and explicit is None:
        return
    threads = explicit if explicit is not None else default_threads()[0]
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def _stop_on_sigterm(interrupted: type):
    """Outside a training phase (loading, tokenizing, reports) SIGTERM ends the run with a message
    and exit code 143 instead of silently; inside one, the phase's handler saves a checkpoint first.
    Returns the previous handler (the caller puts it back), or None off the main thread."""
    def stop(signum, frame):
        raise interrupted(signum, None, None, "run",
                          note=" outside a training phase (nothing new to save; finished checkpoints are kept)")

    if threading.current_thread() is threading.main_thread():
        return signal.signal(signal.SIGTERM, stop)
    return None


def _quiet_libraries() -> None:
    """--no-progress: no loading / writing / map bars from transformers, datasets or the hub."""
    import datasets  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        from huggingface_hub.utils import disable_progress_bars  # noqa: PLC0415

        disable_progress_bars()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.command == "recipes":
        for name, line in bundled_recipes():
            print(f"{name:<20} {line}")
        return 0
    if args.command in ("run", "compare", "rank1", "prepare-data"):
        _set_threads(args.threads)
    # Imported after parsing so that `harness --help` answers in a blink: the pipeline imports torch,
    # transformers and TRL (seconds).
    from weightgeom.core.config import ConfigError  # noqa: PLC0415
    from weightgeom.trainers.guard import DivergenceError  # noqa: PLC0415
    from weightgeom.trainers.interrupt import Interrupted  # noqa: PLC0415

    try:
        return _command(args)
    except (ConfigError, FileNotFoundError, FileExistsError, NotADirectoryError, ValueError) as err:
        print(f"harness: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as err:  # the file system refused (disk full, permissions): one line with the path and the fix
        print(f"harness: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_FILE_SYSTEM
    except DivergenceError as err:
        print(f"harness: stopped: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except Interrupted as err:
        print(f"harness: {err}", file=sys.stderr)
        command = shlex.join(resume_command(args))
        print(f"harness: continue with: {command}" if err.checkpoint is not None else
              f"harness: run the command again; with --resume latest, finished stages and checkpoints are kept "
              f"({command})", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("harness: interrupted (no checkpoint was written at this point)", file=sys.stderr)
        return 130
    finally:
        _close_process_group()


def _one_line(err: Exception) -> str:
    """Our own errors carry their message; an OSError raised by the system (it has an errno) is said as
    ``PATH: reason; fix`` instead of a bare ``[Errno N] ...``."""
    if isinstance(err, OSError) and err.errno is not None:
        from weightgeom.core.locations import os_error_line  # noqa: PLC0415

        return os_error_line(err)
    return str(err)


def resume_command(args: argparse.Namespace) -> list[str]:
    """The command that continues an interrupted ``harness run``: the same recipe, overrides and flags
    (``--threads``, ``--no-progress``), with ``--resume latest`` in place of any ``--resume`` or ``--overwrite``."""
    flags = (["--threads", str(args.threads)] if args.threads is not None else []) + \
        (["--no-progress"] if args.no_progress else [])
    return ["harness", "run", args.recipe, *args.overrides, *flags, "--resume", "latest"]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may follow options too: `harness run asymmetry --overwrite train.steps=10`
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def _command(args: argparse.Namespace) -> int:
    """Run one subcommand (not `recipes`); errors propagate to `main`, which turns them into exit codes."""
    import yaml  # noqa: PLC0415

    from weightgeom.core.config import load_config, to_dict  # noqa: PLC0415
    from weightgeom.core.processes import main_print  # noqa: PLC0415
    from weightgeom.harness.pipeline import run_recipe, validate_recipe, write_report  # noqa: PLC0415
    from weightgeom.harness.reports.health import console_lines  # noqa: PLC0415
    from weightgeom.trainers.interrupt import Interrupted  # noqa: PLC0415

    if args.command == "keys":
        from weightgeom.harness.config_keys import format_keys  # noqa: PLC0415

        print(format_keys(args.filter))
        return 0
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
    if args.no_progress:
        _quiet_libraries()
    previous_handler = _stop_on_sigterm(Interrupted)
    try:
        out = run_recipe(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    main_print(f"done: {out}")
    for line in console_lines(Path(out) / "report"):
        main_print(f"harness: {line}", file=sys.stderr)
    return 0


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
