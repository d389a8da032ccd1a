"""The `entgan bench` command: run a bench config's methods one after another and report them.

    entgan bench benchmarks/mnist-2tasks-4workers.yaml --out runs/bench/headline
    entgan bench CONFIG --methods entgan,mdgan --quick      # a smoke run of two rows

Exit status: 0 when every run finished, 1 when some failed (the report lists them), 2 for a bad
config or a constrained network that cannot be set up (before any run starts).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

EXIT_RUN_FAILED = 1


def add_bench_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register `bench` on the `entgan` command's subparsers."""
    bench = subparsers.add_parser(
        "bench",
        help="run several methods on the same workload and compare them",
        description="Run the methods, ablations and memory sweep of a bench config, each run in a fresh "
        "process, and write bench.md, bench.json and plots into the output folder.",
    )
    bench.add_argument("config", help="bench YAML (see benchmarks/)")
    bench.add_argument("--out", help="output folder (default: runs/bench/<config file name>)")
    bench.add_argument(
        "--methods",
        help="comma-separated rows to run (methods or ablation names); default: all of them",
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 15 s budget per run, 3 rounds per sweep run; checks the bench, measures nothing",
    )
    bench.add_argument("--no-sweep", action="store_true", help="skip the server-memory sweep")
    bench.add_argument("--resume", action="store_true", help="keep finished runs of an earlier invocation")
    bench.add_argument("--overwrite", action="store_true", help="replace an existing bench output folder")
    bench.add_argument("--cache-dir", help="domain-classifier cache (default: ENTGAN_CACHE_DIR or ~/.cache/entgan)")
    bench.set_defaults(handler=_command_bench)
    return bench


def _command_bench(args: argparse.Namespace) -> int:
    from entgan.bench import BenchRunner, load_bench_config, plan_runs
    from entgan.bench.network import NetworkUnavailable
    from entgan.config import ConfigError

    bench = load_bench_config(args.config)
    if args.quick:
        bench = bench.quick()
    only = [name.strip() for name in args.methods.split(",") if name.strip()] if args.methods else None
    if only is not None and not only:
        raise ConfigError("--methods: give at least one name")
    runs = plan_runs(bench, only=only, with_sweep=not args.no_sweep)
    out_dir = Path(args.out) if args.out else Path("runs") / "bench" / Path(args.config).stem
    try:
        runner = BenchRunner(
            bench,
            out_dir,
            cache_dir=Path(args.cache_dir) if args.cache_dir else None,
            resume=args.resume,
            overwrite=args.overwrite,
            quick=args.quick,
            command=_invocation(args),
        )
    except NetworkUnavailable as error:
        raise ConfigError(str(error)) from None
    results = runner.run(runs)
    failed = [result.key for result in results if not result.ok]
    if failed:
        print(f"entgan bench: {len(failed)} run(s) failed: {', '.join(failed)} (see {out_dir / 'bench.md'})",
              file=sys.stderr)
        return EXIT_RUN_FAILED
    return 0


def _invocation(args: argparse.Namespace) -> str:
    """The command as a user would type it again (recorded in the report)."""
    words = ["entgan", "bench", args.config]
    for option in ("out", "methods", "cache_dir"):
        value = getattr(args, option)
        if value:
            words += [f"--{option.replace('_', '-')}", value]
    for flag in ("quick", "no_sweep", "resume", "overwrite"):
        if getattr(args, flag):
            words.append(f"--{flag.replace('_', '-')}")
    return shlex.join(words)
