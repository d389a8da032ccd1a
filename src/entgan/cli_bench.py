"""The `entgan bench` and `entgan tune` commands (and `entgan edge-clock`): run a bench config's
methods one after another and report them, or tune every method with the same budget.

    entgan bench benchmarks/mnist-2tasks-4workers.yaml --out runs/bench/headline
    entgan bench CONFIG --methods entgan,mdgan --quick      # a smoke run of two rows
    entgan tune CONFIG --write benchmarks/tuned.yaml        # the tuning grid -> a tuned file

Exit status: 0 when every run finished, 1 when some failed (the report lists them), 2 for a bad
config or a constrained network that cannot be set up (before any run starts).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported by the handlers only: `entgan --help` stays light
    from entgan.bench import BenchConfig, BenchRunner, RunResult

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
    _add_output_arguments(bench)
    bench.set_defaults(handler=_command_bench)
    return bench


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """What `bench` and `tune` share: reuse or replace an output folder, and the classifier cache."""
    parser.add_argument("--resume", action="store_true", help="keep finished runs of an earlier invocation")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--cache-dir", help="domain-classifier cache (default: ENTGAN_CACHE_DIR or ~/.cache/entgan)")


def _command_bench(args: argparse.Namespace) -> int:
    from entgan.bench import load_bench_config, plan_runs

    bench = load_bench_config(args.config)
    if args.quick:
        bench = bench.quick()
    runs = plan_runs(bench, only=_only(args), with_sweep=not args.no_sweep)
    out_dir = Path(args.out) if args.out else Path("runs") / "bench" / Path(args.config).stem
    results = _runner(bench, out_dir, args, _invocation(args)).run(runs)
    return _exit_status("bench", results, out_dir)


def _only(args: argparse.Namespace) -> list[str] | None:
    """`--methods a,b` as a list of names (None: every row); an empty list is refused."""
    from entgan.config import ConfigError

    if not args.methods:
        return None
    only = [name.strip() for name in args.methods.split(",") if name.strip()]
    if not only:
        raise ConfigError("--methods: give at least one name")
    return only


def _runner(bench: BenchConfig, out_dir: Path, args: argparse.Namespace, command: str) -> BenchRunner:
    """A `BenchRunner` for `bench` with the shared output options; a constrained network that
    cannot be made is a configuration error (exit 2 before any run)."""
    from entgan.bench import BenchRunner
    from entgan.bench.network import NetworkUnavailable
    from entgan.config import ConfigError

    try:
        return BenchRunner(
            bench,
            out_dir,
            cache_dir=Path(args.cache_dir) if args.cache_dir else None,
            resume=args.resume,
            overwrite=args.overwrite,
            quick=args.quick,
            command=command,
        )
    except NetworkUnavailable as error:
        raise ConfigError(str(error)) from None


def _exit_status(command: str, results: Sequence[RunResult], out_dir: Path) -> int:
    """0 when every run finished; otherwise name the failed runs and return `EXIT_RUN_FAILED`."""
    failed = [result.key for result in results if not result.ok]
    if failed:
        print(f"entgan {command}: {len(failed)} run(s) failed: {', '.join(failed)} (see {out_dir / 'bench.md'})",
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


def add_tune_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register `tune` on the `entgan` command's subparsers."""
    tune = subparsers.add_parser(
        "tune",
        help="tune every method with the same budget on a bench's tuning seeds",
        description="Run each method's candidate settings (the bench config's `tuning.grid`, the same "
        "number per method) on the tuning seeds, choose per method the candidate with the lowest median "
        "mean FID over the budget, and write the choices and every tuning run to a tuned file that the "
        "bench config's `tuned:` reads.",
    )
    tune.add_argument("config", help="bench YAML with a `tuning:` section")
    tune.add_argument("--out", help="output folder of the tuning runs (default: runs/tune/<config file name>)")
    tune.add_argument("--write", required=True, metavar="FILE", help="tuned file to write (e.g. benchmarks/tuned.yaml)")
    tune.add_argument("--methods", help="comma-separated methods to tune; default: all of the grid's")
    tune.add_argument("--quick", action="store_true", help="smoke run: 15 s budgets; checks the tuning, chooses nothing meaningful")
    _add_output_arguments(tune)
    tune.set_defaults(handler=_command_tune)
    return tune


def _command_tune(args: argparse.Namespace) -> int:
    from entgan.bench import load_bench_config
    from entgan.bench.plan import plan_tuning_runs
    from entgan.bench.tuning import choose, write_tuned

    bench = load_bench_config(args.config, read_tuned=False)
    if args.quick:
        bench = bench.quick()
    runs = plan_tuning_runs(bench, _only(args))
    out_dir = Path(args.out) if args.out else Path("runs") / "tune" / Path(args.config).stem
    command = shlex.join(["entgan", "tune", args.config, "--write", args.write])
    # The runs' report: the tuning runs alone (no reporting seeds or sweep; only the edge clock
    # the candidates are compared on, if any).
    assert bench.tuning is not None
    clock = bench.tuning.clock
    profiles = {} if clock is None else {clock: bench.profiles[clock]}
    report_bench = bench.model_copy(update={"methods": [], "profiles": profiles, "memory_sweep": None, "seeds": []})
    results = _runner(report_bench, out_dir, args, command).run(runs)
    tuned = choose(bench, results)
    path = write_tuned(Path(args.write), tuned, command)
    for method, overrides in tuned["methods"].items():
        print(f"{method}: {overrides or 'the base as it is'}")
    print(f"tuned settings: {path}")
    return _exit_status("tune", results, out_dir)


def add_edge_clock_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register `edge-clock` on the `entgan` command's subparsers."""
    edge = subparsers.add_parser(
        "edge-clock",
        help="replay a recorded run on edge device profiles and print each round's time",
        description="Replay the timelines of a run recorded with engine.timeline: true on device profiles "
        "(entgan.bench.profiles) and print, per round, the training clock beside each profile's edge clock.",
    )
    edge.add_argument("run_dir", help="run directory with timeline/rank-K.jsonl files")
    edge.add_argument(
        "--profile",
        metavar="FILE",
        help="YAML with one profile, a `profiles:` mapping or a bench config (default: unlimited links, speed 1)",
    )
    edge.add_argument("--name", action="append", help="profile(s) of the file to use (default: all)")
    edge.add_argument("--include-harness", action="store_true", help="count evaluation and checkpoint time too")
    edge.add_argument(
        "--stretch",
        choices=("cpu", "wall"),
        default="cpu",
        help="cost compute by thread CPU time (the edge clock) or by recorded wall time (checks the replay)",
    )
    edge.add_argument("--json", action="store_true", help="print JSON instead of a table")
    edge.set_defaults(handler=_command_edge_clock)
    return edge


def _command_edge_clock(args: argparse.Namespace) -> int:
    import json

    from entgan.bench.edge_clock import load_programs, replay
    from entgan.bench.profiles import UNLIMITED, load_profiles
    from entgan.config import ConfigError
    from entgan.rundir import RunDirectory

    profiles = load_profiles(args.profile) if args.profile else {"unlimited": UNLIMITED}
    if args.name:
        unknown = sorted(set(args.name) - set(profiles))
        if unknown:
            raise ConfigError(f"--name: {unknown} not in {args.profile}; it has {sorted(profiles)}")
        profiles = {name: profiles[name] for name in args.name}
    try:
        programs = load_programs(Path(args.run_dir), stretch=args.stretch)
    except FileNotFoundError as error:
        raise ConfigError(str(error)) from None
    clocks = {name: replay(programs, profile, include_harness=args.include_harness) for name, profile in profiles.items()}
    rows = {int(row["round"]): row for row in RunDirectory(Path(args.run_dir)).metrics()}
    rounds = sorted({entry.round for clock in clocks.values() for entry in clock.rounds})
    if args.json:
        print(json.dumps({
            "profiles": {name: profile.model_dump(mode="json") for name, profile in profiles.items()},
            "complete": {name: clock.complete for name, clock in clocks.items()},
            "rounds": [
                {
                    "round": number,
                    "train_clock_s": rows.get(number, {}).get("train_clock_s"),
                    "round_s": rows.get(number, {}).get("round_s"),
                    **{f"edge/{name}": clock.at_round(number) for name, clock in clocks.items()},
                }
                for number in rounds
            ],
        }, indent=2))
        return 0
    header = ["round", "training clock (s)", "round (s)", *(f"edge '{name}' (s)" for name in clocks)]
    print("  ".join(header))
    for number in rounds:
        row = rows.get(number, {})
        cells = [str(number), _seconds(row.get("train_clock_s")), _seconds(row.get("round_s"))]
        for clock in clocks.values():
            entry = next((e for e in clock.rounds if e.round == number), None)
            cells.append("–" if entry is None else f"{entry.end_s:.3f} (+{entry.duration_s:.3f})")
        print("  ".join(cells))
    for name, clock in clocks.items():
        if not clock.complete:
            print(f"edge '{name}': the timelines end before the run does (cut short); rounds after that are missing",
                  file=sys.stderr)
    return 0


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"
