"""The `entgan` command: run, sample, validate (and bench, job, kb from `cli_bench`, `cli_job`).

Every user error (bad config, unreadable data, existing run directory) is reported on one line per
problem, naming the file and field, with exit status 2, before any process is spawned.

Building the parser imports nothing heavy, so `entgan --help` and `entgan CMD --help` answer at
once: a command's handler imports what it needs (torch, pydantic, ...) when that command runs.
`tests/test_cli_startup.py` holds every command's `--help` to that.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_USAGE = 2


def _command_run(args: argparse.Namespace) -> int:
    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

    from entgan.config import ConfigError, load_config
    from entgan.engine.launch import launch_local, resume_local

    if (args.config is None) == (args.resume is None):
        raise ConfigError("give either a CONFIG to start a run or --resume RUN_DIR to continue one")
    try:
        if args.resume is not None:
            run_dir = Path(args.resume)
            summary = resume_local(run_dir, show_progress=not args.no_progress)
        else:
            config = load_config(args.config)
            run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / config.name
            summary = launch_local(config, run_dir, overwrite=args.overwrite, show_progress=not args.no_progress)
    except (ProcessRaisedException, ProcessExitedException) as error:
        print(f"entgan: error: the run failed; the other processes were stopped.\n{error}", file=sys.stderr)
        return 1
    final = summary["final_eval"]
    print(f"run directory: {run_dir}")
    print(f"training wall-clock: {summary['train_clock_s']:.1f} s over {summary['rounds']} rounds")
    for key in sorted(final):
        if key != "round":
            first = summary["first_eval"].get(key)
            print(f"  {key}: {final[key]:.3f}" + (f" (after round 1: {first:.3f})" if first is not None else ""))
    print(f"server peak RSS: {summary['server_peak_rss_bytes'] / 2**20:.0f} MiB "
          f"(+{summary['server_rss_increase_bytes'] / 2**20:.0f} MiB over idle)")
    return 0


def _command_sample(args: argparse.Namespace) -> int:
    from entgan.api import sample_run
    from entgan.config import ConfigError
    from entgan.plots import save_image_grid

    if args.n < 1:
        raise ConfigError(f"-n must be at least 1, found {args.n}")
    try:
        images = sample_run(args.run_dir, args.task, args.n, seed=args.seed)
    except KeyError as error:
        raise ConfigError(f"{args.run_dir}: {error.args[0]}") from None
    except FileNotFoundError as error:
        raise ConfigError(str(error)) from None
    path = save_image_grid(images, Path(args.output))
    print(f"wrote {args.n} samples of task '{args.task}' to {path}")
    return 0


def _command_validate(args: argparse.Namespace) -> int:
    from entgan.config import load_config
    from entgan.engine.launch import preflight

    config = load_config(args.config)
    preflight(config)
    print(json.dumps({"ok": True, "tasks": [t.name for t in config.tasks], "world_size": config.world_size}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="entgan", description="Multi-task GAN training across edge workers.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="train on this machine: 1 server + K worker processes")
    run.add_argument("config", nargs="?", help="YAML run configuration")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last complete checkpoint")
    run.add_argument("--run-dir", help="where to write results (default: runs/<name>)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(handler=_command_run)

    sample = commands.add_parser("sample", help="write a grid of samples of one task from a run")
    sample.add_argument("run_dir")
    sample.add_argument("--task", required=True, help="task name, as in the run's config")
    sample.add_argument("-n", type=int, default=64, help="number of images (default 64)")
    sample.add_argument("-o", "--output", default="samples.png", help="PNG file to write")
    sample.add_argument("--seed", type=int, default=None)
    sample.set_defaults(handler=_command_sample)

    validate = commands.add_parser("validate", help="check a config and its data without training")
    validate.add_argument("config")
    validate.set_defaults(handler=_command_validate)

    from entgan.cli_bench import add_bench_command, add_edge_clock_command, add_tune_command

    add_bench_command(commands)
    add_tune_command(commands)
    add_edge_clock_command(commands)

    from entgan.cli_job import add_job_commands

    add_job_commands(commands)

    from entgan.cli_export import add_export_commands

    add_export_commands(commands)
    return parser


def _user_errors() -> tuple[type[Exception], ...]:
    """The errors a user can fix, reported in one message with exit status 2. Imported only when
    a command has failed (an `except` clause evaluates its expression only then)."""
    from entgan.config import ConfigError
    from entgan.data.errors import DataError

    return ConfigError, DataError


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except _user_errors() as error:
        print(f"entgan: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
