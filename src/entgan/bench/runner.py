"""Running a bench: one run after another, each in a fresh process, then the report.

Each run is `entgan run` in its own subprocess (which goes through
`entgan.engine.launch.launch_local`), so every run starts from a clean interpreter: the server's
idle-runtime baseline and peak RSS are not polluted by an earlier run, and a crash or a hang of one
method is recorded as that method's failure while the others go on. Under a constrained network the
subprocess starts inside its own network namespace (see `entgan.bench.network`).

Output folder::

    OUT/
      bench.md  bench.json  plots/*.png     the report (rewritten after every run)
      bench-config.yaml                     the resolved bench config (marks the folder as a bench's)
      configs/<run>.yaml                    the exact run configuration of every run
      runs/<run>/                           every run's directory (metrics.jsonl, summary.json, ...)
      logs/<run>.log  logs/<run>.json       every run's output, and its exit status and wall-clock
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import yaml

from entgan.bench.config import BenchConfig
from entgan.bench.network import NetworkStatus, probe, shaped_traffic, wrap
from entgan.bench.plan import PlannedRun
from entgan.bench.report import BenchContext, machine_info, now_iso, write_report
from entgan.bench.results import RunResult, failed_result, read_run
from entgan.config import ConfigError
from entgan.rundir import CONFIG_FILE, SUMMARY_FILE

BENCH_MARKER = "bench-config.yaml"
_ERROR_TAIL_LINES = 15
_KILL_GRACE_S = 10.0


def prepare_output(out_dir: Path, *, overwrite: bool, resume: bool) -> None:
    """Make `out_dir` ready; an existing bench folder is reused (resume) or replaced (overwrite),
    and a folder that is not a bench's output is never touched."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir}: output path is a file")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / BENCH_MARKER).is_file():
            raise ConfigError(f"{out_dir}: exists and is not an entgan bench output folder; refusing to use it")
        if not (overwrite or resume):
            raise ConfigError(f"{out_dir}: bench output already exists (pass --resume to keep finished runs, "
                              "or --overwrite to replace it)")
        if overwrite and not resume:
            shutil.rmtree(out_dir)
    for folder in ("configs", "runs", "logs", "plots"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)


class BenchRunner:
    """Runs the planned runs of one bench in order and keeps the report up to date.

    Construction checks the constrained network (raising NetworkUnavailable when it is required and
    cannot be had); `run` then prepares the output folder, so a bench that cannot start leaves none.
    """

    def __init__(
        self,
        bench: BenchConfig,
        out_dir: Path,
        *,
        cache_dir: Path | None = None,
        resume: bool = False,
        overwrite: bool = False,
        quick: bool = False,
        command: str = "",
        echo: Callable[[str], None] = print,
    ) -> None:
        self.bench = bench
        self.out_dir = Path(out_dir)
        self.cache_dir = cache_dir
        self.resume = resume
        self.overwrite = overwrite
        self.echo = echo
        self.network: NetworkStatus = probe(bench.network)  # raises NetworkUnavailable if required
        self.context = BenchContext(
            command=command or shlex.join(sys.argv),
            started=now_iso(),
            machine=machine_info(),
            network=self.network,
            quick=quick,
        )

    def run(self, runs: Sequence[PlannedRun]) -> list[RunResult]:
        """Run `runs` in order into the output folder, rewriting the report after each one."""
        prepare_output(self.out_dir, overwrite=self.overwrite, resume=self.resume)
        (self.out_dir / BENCH_MARKER).write_text(
            yaml.safe_dump(self.bench.model_dump(mode="json"), sort_keys=False)
        )
        self.echo(f"bench '{self.bench.name}': {len(runs)} runs into {self.out_dir}")
        self.echo(f"network: {self.network.describe()}")
        results: list[RunResult] = []
        report = write_report(self.out_dir, self.bench, results, self.context)
        for index, run in enumerate(runs, start=1):
            self.echo(f"[{index}/{len(runs)}] {run.key}: {run.algorithm}, {run.workers} workers ...")
            result = self._reused(run) if self.resume else None
            if result is None:
                result = self._execute(run)
            results.append(result)
            self.echo(f"[{index}/{len(runs)}] {run.key}: {_outcome_words(result)}")
            report = write_report(self.out_dir, self.bench, results, self.context)
        self.echo(f"report: {report}")
        return results

    # --- one run ---
    def _paths(self, run: PlannedRun) -> tuple[Path, Path, Path, Path]:
        return (
            self.out_dir / "configs" / f"{run.key}.yaml",
            self.out_dir / "runs" / run.key,
            self.out_dir / "logs" / f"{run.key}.log",
            self.out_dir / "logs" / f"{run.key}.json",
        )

    def _reused(self, run: PlannedRun) -> RunResult | None:
        """A finished run of exactly this configuration from an earlier invocation, or None."""
        _, run_dir, log_path, record_path = self._paths(run)
        finished = (run_dir / SUMMARY_FILE).is_file() and record_path.is_file()
        if not finished or (run_dir / CONFIG_FILE).read_text() != run.config.to_yaml():
            return None
        record = json.loads(record_path.read_text())
        if record.get("returncode") != 0 or record.get("network") != self.network.describe():
            return None
        self.echo(f"    reusing the finished run in {run_dir}")
        return self._result(run, run_dir, log_path, record.get("process_wall_s"))

    def _execute(self, run: PlannedRun) -> RunResult:
        config_path, run_dir, log_path, record_path = self._paths(run)
        config_path.write_text(run.config.to_yaml())
        command = [
            sys.executable, "-m", "entgan.cli", "run", str(config_path),
            "--run-dir", str(run_dir), "--overwrite", "--no-progress",
        ]
        if self.network.active and self.bench.network is not None:
            command = wrap(command, self.bench.network)
        environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.cache_dir is not None:
            environment["ENTGAN_CACHE_DIR"] = str(self.cache_dir)
        started = time.perf_counter()
        with log_path.open("w") as log:
            log.write(f"$ {shlex.join(command)}\n")
            log.flush()
            returncode, timed_out = _run_in_own_group(command, log, environment, self.bench.timeout_s)
        wall = time.perf_counter() - started
        record = {
            "returncode": returncode,
            "timed_out": timed_out,
            "process_wall_s": wall,
            "network": self.network.describe(),
        }
        record_path.write_text(json.dumps(record))
        if timed_out:
            return failed_result(run, f"killed after {self.bench.timeout_s:g} s (run_timeout_s); log: {log_path}", wall)
        if returncode != 0:
            return failed_result(run, f"exit status {returncode}: {_tail(log_path)} (log: {log_path})", wall)
        return self._result(run, run_dir, log_path, wall)

    def _result(self, run: PlannedRun, run_dir: Path, log_path: Path, wall: float | None) -> RunResult:
        result = read_run(
            run, run_dir, self.bench.target_fid, self.bench.target_confirmations, wall, self.bench.profiles
        )
        if self.network.active and log_path.is_file():
            result.shaped_link = shaped_traffic(log_path.read_text())
        return result


def _run_in_own_group(
    command: list[str], log: IO[str], environment: dict[str, str], timeout_s: float
) -> tuple[int, bool]:
    """Run `command` in a new session (its own process group), output to `log`. On a timeout or an
    interrupt, the whole group is stopped: the run's server, its workers and their helpers."""
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True
    )
    try:
        return process.wait(timeout=timeout_s), False
    except subprocess.TimeoutExpired:
        _stop_group(process)
        return process.returncode if process.returncode is not None else -signal.SIGKILL, True
    except BaseException:
        _stop_group(process)
        raise


def _stop_group(process: subprocess.Popen) -> None:
    for stop_signal in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, stop_signal)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=_KILL_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(log_path: Path) -> str:
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    return " | ".join(lines[-_ERROR_TAIL_LINES:])


def _outcome_words(result: RunResult) -> str:
    if not result.ok:
        return f"FAILED: {result.error}"
    reached = f"target at {result.target.train_clock_s:.1f} s" if result.target else "target not reached"
    fid = f"{result.final_fid:.1f}" if result.final_fid is not None else "–"
    increase = (result.server_rss_increase_bytes or 0) / 2**20
    return (f"{result.rounds} rounds, {result.train_clock_s:.1f} s training; FID {fid}, {reached}; "
            f"server +{increase:.0f} MiB")
