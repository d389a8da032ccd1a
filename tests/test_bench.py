"""`entgan bench`: config validation, run planning, time to target, the report, the shaped network.

Fast tests build results by hand; the slow ones run a tiny real bench (fresh processes through
`entgan bench`) and a run behind a rate-limited loopback in a private network namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import yaml

from entgan import cli
from entgan.bench import plan_runs, time_to_target
from entgan.bench.config import (
    NetworkConfig,
    apply_overrides,
    load_bench_config,
    parse_bench_config,
    split_workers,
)
from entgan.bench.network import NetworkUnavailable, probe, shaped_traffic, wrap
from entgan.bench.report import BenchContext, cpu_info_field, render_markdown, report_data
from entgan.bench.results import RunResult, TargetHit, training_comm_wait_share
from entgan.config import ConfigError

from conftest import tiny_config_data

REPOSITORY = Path(__file__).resolve().parents[1]


def bench_data(**overrides: Any) -> dict[str, Any]:
    """A tiny bench: two rows on the tiny workload, a short budget."""
    base = tiny_config_data(eval={"every": 1000}, checkpoint={"every": 0})
    data: dict[str, Any] = {
        "name": "tiny",
        "base": base,
        "methods": ["entgan"],
        "ablations": [{"name": "no-overlap", "overrides": {"control.overlap.enabled": False}}],
        "target_fid": 300.0,
        "time_budget_s": 2.0,
        "eval_every_s": 0.5,
    }
    data.update(overrides)
    return data


def config_error(data: dict[str, Any], tmp_path: Path | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_bench_config(data, origin="bench.yaml", relative_to=tmp_path)
    return str(caught.value)


# --- configuration ----------------------------------------------------------------------------


def test_valid_bench_config_plans_timed_runs_and_a_sweep() -> None:
    bench = parse_bench_config(bench_data(memory_sweep={"workers": [4, 2], "rounds": 3}))

    runs = plan_runs(bench)

    assert [run.key for run in runs] == ["entgan", "no-overlap", "sweep-entgan-k2", "sweep-entgan-k4"]
    timed = runs[0].config
    assert timed.stop.time_budget_s == 2.0 and timed.stop.target_fid == 300.0 and not timed.stop.end_at_target
    assert timed.eval.every_seconds == 0.5
    assert timed.rounds == bench.max_rounds
    assert runs[1].config.control.overlap.enabled is False and runs[0].config.control.overlap.enabled is True
    sweep_k2, sweep_k4 = runs[2].config, runs[3].config
    assert [task.workers for task in sweep_k2.tasks] == [1, 1]
    assert [task.workers for task in sweep_k4.tasks] == [2, 2]
    assert sweep_k4.rounds == 3 and sweep_k4.stop.time_budget_s is None
    # Everything else is the shared workload.
    for run in runs:
        assert run.config.seed == bench.base.seed and run.config.model == bench.base.model
        assert run.config.optimizer == bench.base.optimizer and run.config.data == bench.base.data


def test_every_shipped_bench_config_loads_and_plans() -> None:
    """Every bench in benchmarks/ (not the profile library or `entgan tune`'s outputs, which have no
    `base`) parses, and its rows and seeds make runs: a README command must not fail on its config."""
    shipped = sorted((REPOSITORY / "benchmarks").glob("*.yaml"))
    benches = [path for path in shipped if "base" in yaml.safe_load(path.read_text())]
    assert len(benches) > 20
    for path in benches:
        assert plan_runs(load_bench_config(path)), path.name


def test_sweep_repeats_run_the_whole_sweep_again() -> None:
    bench = parse_bench_config(bench_data(methods=["entgan", "mdgan"], ablations=[],
                                          memory_sweep={"workers": [2, 4], "rounds": 3, "repeats": 2}))

    sweep = [run for run in plan_runs(bench) if run.group == "memory_sweep"]

    # Round-robin, so that drifts of the machine over the sweep touch every method alike.
    assert [run.key for run in sweep] == [
        "sweep-entgan-k2-r1", "sweep-entgan-k4-r1", "sweep-mdgan-k2-r1", "sweep-mdgan-k4-r1",
        "sweep-entgan-k2-r2", "sweep-entgan-k4-r2", "sweep-mdgan-k2-r2", "sweep-mdgan-k4-r2",
    ]
    assert sweep[0].config == sweep[4].config.model_copy(update={"name": sweep[0].config.name})
    assert len({run.config.name for run in sweep}) == len(sweep)  # each repeat has its own run directory


def test_quick_cuts_budgets_but_keeps_every_step() -> None:
    bench = parse_bench_config(bench_data(time_budget_s=100, memory_sweep={"workers": [2, 4], "rounds": 20}))

    quick = bench.quick()

    assert quick.time_budget_s == 15 and quick.evaluation_interval_s == 5
    assert quick.memory_sweep is not None and quick.memory_sweep.rounds == 3
    assert [run.key for run in plan_runs(quick)] == [run.key for run in plan_runs(bench)]
    assert plan_runs(quick)[0].config.stop.time_budget_s == 15


def test_only_selects_rows_and_rejects_unknown_names() -> None:
    bench = parse_bench_config(bench_data(memory_sweep={"workers": [2]}))

    assert [run.key for run in plan_runs(bench, only=["no-overlap"])] == ["no-overlap"]
    assert [run.key for run in plan_runs(bench, only=["entgan"], with_sweep=False)] == ["entgan"]
    with pytest.raises(ConfigError, match=r"--methods: \['mdgan'\] not in this bench"):
        plan_runs(bench, only=["mdgan"])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"methds": ["entgan"]}, "methds: unknown field"),
        ({"methods": ["entgan", "gan-of-theseus"]}, "methods.1: Input should be 'entgan'"),
        ({"target_fid": -1}, "target_fid: Input should be greater than 0"),
        ({"time_budget_s": None}, "time_budget_s: Input should be a valid number"),
        ({"methods": [], "ablations": []}, "at least one entry in methods or ablations, or a memory_sweep"),
        ({"ablations": [{"name": "entgan"}]}, "duplicated: ['entgan']"),
        ({"ablations": [{"name": "x", "overrides": {"control.worker_schedler.enabled": False}}]},
         "ablations.0.overrides: control.worker_schedler: unknown field"),
        ({"ablations": [{"name": "x", "overrides": {"control.overlap.enabled": "sometimes"}}]},
         "ablations.0.overrides: control.overlap.enabled: Input should be a valid boolean"),
        ({"ablations": [{"name": "x", "overrides": {"tasks.5.partition": "dirichlet"}}]},
         "ablations.0.overrides: 'tasks.5.partition': tasks.5 needs a list index below 2"),
        ({"memory_sweep": {"workers": [1, 4]}}, "memory_sweep.workers.0: 1 workers cannot serve 2 tasks"),
        ({"memory_sweep": {"workers": [2, 2]}}, "memory_sweep.workers: Value error, worker counts must be distinct"),
        ({"network": {"rate_mbit": 20, "burst_kbit": 8}}, "smaller than one packet of mtu 1500"),
        ({"network": {"rate_mbit": 0}}, "network.rate_mbit: Input should be greater than 0"),
        ({"stop_at_target": True, "target_confirmations": 2}, "stop_at_target needs target_confirmations: 1"),
    ],
)
def test_bad_bench_config_names_the_field(overrides: dict[str, Any], expected: str) -> None:
    message = config_error(bench_data(**overrides))

    assert message.startswith("bench.yaml: ")
    assert expected in message


def test_inline_base_errors_name_the_base_field() -> None:
    data = bench_data()
    data["base"] = {**data["base"], "tasks": [{"name": "a", "labels": [0], "wrkers": 2}]}

    assert "base.tasks.0.wrkers: unknown field" in config_error(data)


def test_base_from_a_run_yaml_relative_to_the_bench_file_with_overrides(tmp_path: Path) -> None:
    (tmp_path / "workloads").mkdir()
    (tmp_path / "workloads" / "tiny.yaml").write_text(yaml.safe_dump(tiny_config_data()))
    data = bench_data(base="workloads/tiny.yaml", base_overrides={"tasks.0.partition": "dirichlet"})
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(data))

    bench = load_bench_config(tmp_path / "bench.yaml")

    assert bench.base.tasks[0].partition == "dirichlet" and bench.base.tasks[1].partition == "iid"
    assert all(run.config.tasks[0].partition == "dirichlet" for run in plan_runs(bench))
    missing = config_error(bench_data(base="workloads/nowhere.yaml"), tmp_path)
    assert "bench.yaml: base: " in missing and "nowhere.yaml: config file not found" in missing


def test_apply_overrides_sets_nested_fields_and_list_items_without_touching_the_input() -> None:
    data = {"a": {"b": 1}, "items": [{"x": 1}, {"x": 2}], "empty": None}

    result = apply_overrides(data, {"a.b": 2, "items.1.x": 5, "empty.y": 3, "a.c": [1]})

    assert result == {"a": {"b": 2, "c": [1]}, "items": [{"x": 1}, {"x": 5}], "empty": {"y": 3}}
    assert data == {"a": {"b": 1}, "items": [{"x": 1}, {"x": 2}], "empty": None}
    with pytest.raises(ValueError, match="a.b is a value, not a section"):
        apply_overrides(data, {"a.b.c": 1})
    with pytest.raises(ValueError, match="not a dotted path"):
        apply_overrides(data, {"a..b": 1})


def test_split_workers_spreads_counts_over_tasks() -> None:
    assert split_workers(8, 2) == [4, 4]
    assert split_workers(5, 2) == [3, 2]
    assert split_workers(3, 3) == [1, 1, 1]
    with pytest.raises(ValueError, match="2 workers cannot serve 3 tasks"):
        split_workers(2, 3)


# --- time to target ---------------------------------------------------------------------------


def _stream(points: list[tuple[float, float | None]]) -> list[dict[str, Any]]:
    """Rounds every 0.5 s of training clock; an evaluation (with `fid/overall`) where FID is given."""
    rows = []
    for index, (clock, fid) in enumerate(points, start=1):
        row: dict[str, Any] = {"round": index, "train_clock_s": clock, "g_loss": 1.0}
        if fid is not None:
            row["fid/overall"] = fid
        rows.append(row)
    return rows


def test_time_to_target_is_the_first_evaluation_at_or_below_the_target() -> None:
    rows = _stream([(0.5, 700.0), (1.0, None), (1.5, 310.0), (2.0, None), (2.5, 300.0), (3.0, 120.0), (3.5, 400.0)])

    assert time_to_target(rows, 300.0) == TargetHit(train_clock_s=2.5, round=5, fid=300.0)  # equality counts
    assert time_to_target(rows, 200.0) == TargetHit(train_clock_s=3.0, round=6, fid=120.0)  # the first, not the best
    assert time_to_target(rows, 100.0) is None


def test_time_to_target_with_confirmations_ignores_a_lucky_dip() -> None:
    rows = _stream([(1.0, 500.0), (2.0, 90.0), (3.0, 250.0), (4.0, 95.0), (5.0, float("nan")), (6.0, 80.0),
                    (7.0, 70.0), (8.0, 60.0)])

    assert time_to_target(rows, 100.0, confirmations=1).train_clock_s == 2.0
    assert time_to_target(rows, 100.0, confirmations=2).train_clock_s == 6.0  # NaN at 5 s breaks the streak
    assert time_to_target(rows, 100.0, confirmations=3) == TargetHit(train_clock_s=6.0, round=6, fid=80.0)
    assert time_to_target(rows, 100.0, confirmations=4) is None
    with pytest.raises(ValueError):
        time_to_target(rows, 100.0, confirmations=0)


def test_comm_wait_share_leaves_out_the_set_up_exchange() -> None:
    rows = [
        {"round": 1, "train_clock_s": 1.0, "server/comm_wait_s": 5.0},  # 4.5 s of set-up transfers in here
        {"round": 2, "train_clock_s": 2.0, "server/comm_wait_s": 5.25},
        {"round": 3, "train_clock_s": 3.0, "server/comm_wait_s": 5.5},
    ]

    assert training_comm_wait_share(rows) == pytest.approx(0.25)
    assert training_comm_wait_share(rows[:1]) is None


# --- report from hand-made results ------------------------------------------------------------


def _result(label: str, group: str = "methods", workers: int = 3, **figures: Any) -> RunResult:
    defaults: dict[str, Any] = dict(
        rounds=10, train_clock_s=2.0, stopped_because="time_budget", final_fid=150.0, best_fid=140.0,
        fid_by_task={"low": 140.0, "high": 160.0}, fidelity_by_task={"low": 0.9, "high": 0.8},
        server_peak_rss_bytes=500 * 2**20, server_baseline_rss_bytes=400 * 2**20,
        server_rss_increase_bytes=100 * 2**20, server_bytes_sent=2**20, server_bytes_received=2**21,
        workers_bytes_sent=2**21, workers_bytes_received=2**20, server_comm_wait_s=0.5,
        server_comm_wait_share=0.25, curve=[(0.5, 400.0), (2.0, 150.0)],
    )
    defaults.update(figures)
    key = label if group != "memory_sweep" else f"sweep-{label}-k{workers}"
    key = f"{key}-s{figures['seed']}" if "seed" in figures else key
    return RunResult(key=key, group=group,
                     label=label, algorithm=label, workers=workers, status="ok", **defaults)


def _context() -> BenchContext:
    return BenchContext(command="entgan bench x.yaml", started="now", machine={
        "cpu": "test cpu", "usable_cpus": 2, "logical_cpus": 2, "memory_gib": 1.0, "platform": "test",
        "python": "3", "torch": "2", "load_average_at_start": None}, network=probe(None))


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads Linux's /proc/cpuinfo")
def test_cpu_info_field_reads_a_named_field_and_none_for_an_absent_one() -> None:
    vendor = cpu_info_field("vendor_id") or cpu_info_field("CPU implementer")
    assert vendor  # x86 names its vendor one way, ARM the other
    assert cpu_info_field("no such field") is None


def test_report_compares_every_row_with_the_reference(tmp_path: Path) -> None:
    bench = parse_bench_config(bench_data(methods=["entgan", "mdgan", "flgan"], ablations=[],
                                          memory_sweep={"workers": [2, 4], "methods": ["entgan", "mdgan"]}))
    results = [
        _result("entgan", target=TargetHit(10.0, 5, 290.0), server_rss_increase_bytes=60 * 2**20),
        _result("mdgan", target=TargetHit(40.0, 9, 280.0), server_rss_increase_bytes=120 * 2**20),
        RunResult(key="flgan", group="methods", label="flgan", algorithm="flgan", workers=3, status="failed",
                  error="exit status 1: boom"),
        _result("entgan", "memory_sweep", 2, server_rss_increase_bytes=50 * 2**20),
        _result("entgan", "memory_sweep", 4, server_rss_increase_bytes=60 * 2**20),
        _result("mdgan", "memory_sweep", 2, server_rss_increase_bytes=100 * 2**20),
        _result("mdgan", "memory_sweep", 4, server_rss_increase_bytes=240 * 2**20),
    ]

    data = report_data(bench, results, _context())
    markdown = render_markdown(bench, results, _context())

    assert data["comparison"]["methods"] == [
        {"label": "mdgan", "time_to_target_ratio": 0.25, "rss_increase_ratio": 0.5}]
    assert data["memory_sweep"]["reference_ratios"] == {"mdgan": {"2": 0.5, "4": 0.25}}
    assert data["failures"] == [{"key": "flgan", "error": "exit status 1: boom"}]
    assert "| entgan | 10.0 (round 5) | 150.0 |" in markdown
    assert "| flgan | **failed** |" in markdown and "- `flgan`: exit status 1: boom" in markdown
    assert "| mdgan | 0.25 | 0.50 |" in markdown  # entgan's time and memory over mdgan's
    assert "| entgan | 50.0 (500.0) | 60.0 (500.0) |" in markdown
    assert "| mdgan | 0.50 | 0.25 |" in markdown  # sweep ratios per K


def test_sweep_cells_are_the_median_of_their_repeats_and_a_failed_repeat_fails_the_cell(tmp_path: Path) -> None:
    bench = parse_bench_config(bench_data(methods=["entgan", "mdgan"], ablations=[],
                                          memory_sweep={"workers": [2, 4], "repeats": 3}))

    def repeat(label: str, workers: int, index: int, increase_mib: float) -> RunResult:
        result = _result(label, "memory_sweep", workers, server_rss_increase_bytes=int(increase_mib * 2**20),
                         server_peak_rss_bytes=int((400 + increase_mib) * 2**20))
        result.key = f"{result.key}-r{index}"
        return result

    results = [
        repeat("entgan", 2, 1, 14.0), repeat("entgan", 2, 2, 16.0), repeat("entgan", 2, 3, 13.0),
        repeat("mdgan", 2, 1, 20.0), repeat("mdgan", 2, 2, 15.0), repeat("mdgan", 2, 3, 16.0),
        repeat("entgan", 4, 1, 14.0), repeat("entgan", 4, 2, 14.0),
        RunResult(key="sweep-entgan-k4-r3", group="memory_sweep", label="entgan", algorithm="entgan", workers=4,
                  status="failed", error="exit status 1: boom"),
        repeat("mdgan", 4, 1, 21.0), repeat("mdgan", 4, 2, 21.0), repeat("mdgan", 4, 3, 21.0),
    ]

    sweep = report_data(bench, results, _context())["memory_sweep"]
    markdown = render_markdown(bench, results, _context())

    k2 = sweep["by_method"]["entgan"]["2"]
    assert k2["server_rss_increase_bytes"] == 14 * 2**20 and k2["server_peak_rss_bytes"] == 414 * 2**20
    assert [run["key"] for run in k2["runs"]] == ["sweep-entgan-k2-r1", "sweep-entgan-k2-r2", "sweep-entgan-k2-r3"]
    assert sweep["reference_ratios"]["mdgan"]["2"] == pytest.approx(14 / 16)  # medians, not the best or worst run
    failed = sweep["by_method"]["entgan"]["4"]
    assert failed["status"] == "failed" and failed["server_rss_increase_bytes"] is None
    assert failed["error"] == "exit status 1: boom" and sweep["reference_ratios"]["mdgan"]["4"] is None
    assert "| entgan | 14.0 (414.0) [14.0, 16.0, 13.0] | **failed** |" in markdown
    assert "the median of the repeats" in markdown


def test_network_probe_says_plainly_when_it_cannot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda tool: None if tool == "tc" else f"/usr/bin/{tool}")

    with pytest.raises(NetworkUnavailable, match="tc not found on PATH.*network.required: false"):
        probe(NetworkConfig(rate_mbit=20))
    status = probe(NetworkConfig(rate_mbit=20, required=False))

    assert not status.active
    assert status.describe().startswith("UNCONSTRAINED: 20 Mbit/s token bucket")
    assert "tc not found on PATH" in status.describe()


def test_required_network_that_cannot_be_made_stops_the_bench_before_any_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(bench_data(network={"rate_mbit": 20})))
    monkeypatch.setattr(shutil, "which", lambda tool: None)

    status = cli.main(["bench", str(tmp_path / "bench.yaml"), "--out", str(tmp_path / "out")])

    assert status == 2
    assert "unshare, ip, tc not found on PATH" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_wrap_shapes_only_a_private_loopback() -> None:
    command = wrap(["python", "-c", "pass"], NetworkConfig(rate_mbit=2.5, burst_kbit=64, latency_ms=20), euid=0)

    assert command[:3] == ["unshare", "--net", "--"]
    assert command[-3:] == ["python", "-c", "pass"]
    assert command[7:11] == ["2.5mbit", "64kbit", "20ms", "1500"]
    script = command[5]
    assert "dev lo " in script and script.count("dev ") == script.count("dev lo")  # no other interface
    assert wrap(["true"], NetworkConfig(rate_mbit=1), euid=1000)[:3] == ["unshare", "--map-root-user", "--net"]


def test_shaped_traffic_reads_the_last_tbf_counters() -> None:
    log = ("training...\n--- entgan bench: shaped loopback at exit ---\n"
           "qdisc tbf 8004: root refcnt 2 rate 16Mbit burst 4Kb lat 50ms \n"
           " Sent 2159635 bytes 2391 pkt (dropped 12, overlimits 3334 requeues 0) \n backlog 0b 0p requeues 0\n")

    assert shaped_traffic(log) == {"bytes": 2159635, "packets": 2391, "dropped": 12}
    assert shaped_traffic("no counters here") is None


# --- real benches -----------------------------------------------------------------------------


def _entgan(*args: str, cache_dir: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    environment = {**os.environ, "ENTGAN_CACHE_DIR": str(cache_dir)}
    return subprocess.run([sys.executable, "-m", "entgan.cli", *args], capture_output=True, text=True,
                          env=environment, cwd=REPOSITORY, timeout=timeout)


def _second_row() -> dict[str, Any]:
    """ren-serial when its module exists; otherwise EntGAN again with its control modules off."""
    if find_spec("entgan.algorithms.ren") is not None:
        return {"methods": ["entgan", "ren-serial"], "ablations": []}
    return {"methods": ["entgan"], "ablations": [
        {"name": "entgan-plain", "overrides": {"control.worker_scheduler.enabled": False}}]}


@pytest.mark.slow
def test_tiny_bench_writes_table_json_and_plots(tmp_path: Path, cache_dir: Path) -> None:
    data = bench_data(**_second_row(), memory_sweep={"workers": [2, 3], "rounds": 2, "methods": ["entgan"]})
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(data))
    out = tmp_path / "out"

    result = _entgan("bench", str(tmp_path / "bench.yaml"), "--out", str(out), cache_dir=cache_dir)

    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert {"name", "command", "machine", "network", "target_fid", "time_budget_s", "runs", "comparison",
            "memory_sweep", "failures", "base_config"} <= set(report)
    rows = report["runs"]["methods"] + report["runs"]["ablations"]
    assert len(rows) == 2 and report["failures"] == []
    for row in rows:
        assert row["status"] == "ok" and row["stopped_because"] == "time_budget"
        assert row["train_clock_s"] >= data["time_budget_s"]
        assert row["server_bytes_sent"] > 0 and row["server_bytes_received"] > 0
        assert row["workers_bytes_sent"] > 0 and row["workers_bytes_received"] > 0
        assert row["server_peak_rss_bytes"] > row["server_rss_increase_bytes"] > 0
        assert 0 <= row["server_comm_wait_share"] <= 1
        assert len(row["curve"]) >= 2 and set(row["fid_by_task"]) == {"low", "high"}
        assert set(row["fidelity_by_task"]) == {"low", "high"}
        clocks = [clock for clock, _ in row["curve"]]
        assert clocks == sorted(clocks)
        if row["target"] is not None:  # the reported hit is the first evaluation at or below the target
            first = next(clock for clock, fid in row["curve"] if fid <= data["target_fid"])
            assert row["target"]["train_clock_s"] == first
    sweep = report["memory_sweep"]
    assert sweep["workers"] == [2, 3] and set(sweep["by_method"]["entgan"]) == {"2", "3"}
    markdown = (out / "bench.md").read_text()
    for column in ("time to FID ≤ 300 (s)", "FID at budget", "server peak RSS (MiB)", "server RSS increase (MiB)",
                   "server sent (MiB)", "server received (MiB)", "workers sent (MiB)", "workers received (MiB)",
                   "server comm wait", "FID low", "fidelity high"):
        assert column in markdown
    assert "## Server memory against the number of workers" in markdown and "| entgan |" in markdown
    for plot in ("plots/fid_vs_time.png", "plots/server_memory_vs_workers.png"):
        assert (out / plot).stat().st_size > 0 and f"]({plot})" in markdown
    assert (out / "runs" / "entgan" / "metrics.jsonl").is_file()
    # One `tensorboard --logdir OUT` shows every run, named by its row, method and seed.
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    tensorboard = EventMultiplexer()
    tensorboard.AddRunsFromDirectory(str(out))
    tensorboard.Reload()
    planned = plan_runs(load_bench_config(tmp_path / "bench.yaml"))
    names = {f"runs/{run.key}/tb/{run.algorithm}-seed{run.config.seed}": run for run in planned}
    assert set(tensorboard.Runs()) == set(names) and len(names) == 4
    scalars = tensorboard.PluginRunToTagToContent("scalars")
    assert all("fid/overall" in scalars[name] for name in names)

    # A second invocation with --resume reuses every finished run instead of training again.
    started = time.perf_counter()
    again = _entgan("bench", str(tmp_path / "bench.yaml"), "--out", str(out), "--resume", cache_dir=cache_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("reusing the finished run") == 4
    assert time.perf_counter() - started < 60
    # ... and without --resume or --overwrite it refuses to touch the folder.
    refused = _entgan("bench", str(tmp_path / "bench.yaml"), "--out", str(out), cache_dir=cache_dir)
    assert refused.returncode == 2 and "--resume" in refused.stderr


def test_bad_bench_config_exits_2_before_any_run(tmp_path: Path, cache_dir: Path) -> None:
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(bench_data(methods=["entgan", "nope"])))

    result = _entgan("bench", str(tmp_path / "bench.yaml"), "--out", str(tmp_path / "out"), cache_dir=cache_dir)

    assert result.returncode == 2
    assert "bench.yaml" in result.stderr and "methods.1" in result.stderr
    assert not (tmp_path / "out").exists()


def _can_shape_loopback() -> str | None:
    """None when this machine can run the constrained-network tests, else the reason it cannot."""
    try:
        status = probe(NetworkConfig(rate_mbit=20, required=False))
    except OSError as error:
        return str(error)
    return None if status.active else status.detail


@pytest.mark.slow
def test_shaped_loopback_limits_the_rate() -> None:
    reason = _can_shape_loopback()
    if reason is not None:
        pytest.skip(f"cannot make a network namespace with a shaped loopback here: {reason}")
    payload = 2_000_000  # 16 Mbit: one second at 16 Mbit/s, far less unshaped
    sender = (
        "import socket, threading, time\n"
        "server = socket.socket(); server.bind(('127.0.0.1', 0)); server.listen(1)\n"
        f"def drain():\n    peer, _ = server.accept(); left = {payload}\n"
        "    while left > 0: left -= len(peer.recv(1 << 20))\n    peer.sendall(b'k')\n"
        "threading.Thread(target=drain).start()\n"
        "client = socket.create_connection(server.getsockname()); start = time.perf_counter()\n"
        f"client.sendall(b'x' * {payload}); client.recv(1); print(time.perf_counter() - start)\n"
    )
    command = wrap([sys.executable, "-c", sender], NetworkConfig(rate_mbit=16))

    result = subprocess.run(command, capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    seconds = float(result.stdout.splitlines()[0])
    assert 0.85 <= seconds <= 10, f"2 MB at 16 Mbit/s should take about 1 s, took {seconds:.2f} s"
    assert shaped_traffic(result.stdout)["bytes"] >= payload


@pytest.mark.slow
def test_bench_runs_a_method_behind_a_rate_limited_link(tmp_path: Path, cache_dir: Path) -> None:
    reason = _can_shape_loopback()
    if reason is not None:
        pytest.skip(f"cannot make a network namespace with a shaped loopback here: {reason}")
    data = bench_data(ablations=[], network={"rate_mbit": 20})
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(data))
    out = tmp_path / "out"

    result = _entgan("bench", str(tmp_path / "bench.yaml"), "--out", str(out), cache_dir=cache_dir)

    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert report["network"]["active"] is True
    row = report["runs"]["methods"][0]
    assert row["status"] == "ok"
    # Every byte the server and the workers exchanged crossed the shaped loopback (plus headers).
    assert row["shaped_link"]["bytes"] >= row["server_bytes_sent"] + row["server_bytes_received"]
    markdown = (out / "bench.md").read_text()
    assert "Network: 20 Mbit/s token bucket" in markdown and "UNCONSTRAINED" not in markdown
