"""The emulated cluster: torchrun across network namespaces, one shaped link per edge node.

The real-cluster tests need root (network namespaces, veth pairs, tc); elsewhere they skip and say
why. The unit tests at the top run everywhere.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from entgan.bench.cluster import (
    TRAFFIC_MARKER,
    bench_links,
    EmulatedCluster,
    TorchrunJob,
    leftovers_of,
    link_traffic_in_log,
    parse_link,
    unavailable_reason,
    wrap,
)
from entgan.bench.config import parse_bench_config
from entgan.bench.links import LinkProfile, PerNodeNetworkConfig, edge_uneven
from entgan.config import ConfigError, RunConfig
from entgan.engine.launch import launch_local
from entgan.rundir import RunDirectory

from conftest import due_ranks, tiny_config, tiny_config_data, worker_digests

SECRET = "a-job-secret-for-the-cluster-tests"
LINKS = [LinkProfile(uplink_mbit=5, downlink_mbit=20), LinkProfile(uplink_mbit=10, downlink_mbit=40),
         LinkProfile(uplink_mbit=20, downlink_mbit=80)]


def _cluster_reason() -> str | None:
    reason = unavailable_reason()
    if reason is None and subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        reason = "`ip netns` is unavailable"
    return reason


needs_cluster = pytest.mark.skipif(
    _cluster_reason() is not None, reason=f"emulated cluster unavailable: {_cluster_reason()}"
)


# --------------------------------------------------------------------------------------- unit
def test_edge_uneven_profiles_pair_workers_on_each_uplink() -> None:
    eight = edge_uneven(8)
    assert [link.uplink_mbit for link in eight] == [5, 5, 10, 10, 20, 20, 50, 50]
    assert all(link.downlink == 4 * link.uplink_mbit for link in eight)
    assert [link.uplink_mbit for link in edge_uneven(4)] == [5, 10, 20, 50]


def test_link_options_and_labels() -> None:
    assert parse_link("5") == LinkProfile(uplink_mbit=5)
    assert parse_link("5/20/30") == LinkProfile(uplink_mbit=5, downlink_mbit=20, latency_ms=30)
    assert parse_link("5/20").label() == "5/20 Mbit/s"
    assert LinkProfile(uplink_mbit=5, latency_ms=30).label() == "5/5 Mbit/s +30 ms"


def test_bench_network_modes_shared_and_per_node() -> None:
    base = tiny_config_data()
    bench = {"base": base, "methods": ["entgan"], "target_fid": 50, "time_budget_s": 5}
    shared = parse_bench_config({**bench, "network": {"rate_mbit": 20}})
    assert shared.network is not None and shared.network.mode == "shared"
    per_node = parse_bench_config({**bench, "network": {"mode": "per-node", "links": [{"uplink_mbit": 5}] * 3}})
    assert isinstance(per_node.network, PerNodeNetworkConfig) and per_node.network.links[0].downlink == 5
    with pytest.raises(ConfigError, match="one link profile per worker"):
        parse_bench_config({**bench, "network": {"mode": "per-node", "links": [{"uplink_mbit": 5}] * 2}})
    with pytest.raises(ConfigError, match="uplink_mbit"):
        parse_bench_config({**bench, "network": {"mode": "per-node", "links": [{"uplnk_mbit": 5}] * 3}})


def test_bench_command_becomes_the_cluster_command() -> None:
    config = PerNodeNetworkConfig(mode="per-node", links=LINKS)
    command = wrap(["python", "-m", "entgan.cli", "run", "c.yaml", "--run-dir", "r", "--overwrite"], config)
    assert command[1:5] == ["-m", "entgan.bench.cluster", "run", "c.yaml"]
    links = json.loads(command[command.index("--links-json") + 1])
    assert [LinkProfile.model_validate(link) for link in links] == LINKS


def test_link_traffic_sums_every_link_after_the_marker() -> None:
    log = "\n".join([
        "qdisc tbf 1: root\n Sent 999 bytes 9 pkt (dropped 9, overlimits 0 requeues 0)",  # before: not counted
        TRAFFIC_MARKER,
        "# rank 1 uplink", "qdisc tbf 1: root rate 5Mbit\n Sent 100 bytes 2 pkt (dropped 1, overlimits 0 requeues 0)",
        "# rank 1 downlink", "qdisc tbf 1: root rate 20Mbit\n Sent 300 bytes 4 pkt (dropped 0, overlimits 0 requeues 0)",
    ])
    assert link_traffic_in_log(log) == {"bytes": 400, "packets": 6, "dropped": 1}
    assert link_traffic_in_log("no marker") is None


def test_server_resumes_when_its_own_agent_restarts_it_as_a_membership_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from entgan.run import TORCHRUN_MARKER, _restarted_by_torchrun, _torchrun_identity

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert not _restarted_by_torchrun(tmp_path)  # a fresh start: no marker
    (tmp_path / TORCHRUN_MARKER).write_text(json.dumps(_torchrun_identity()))
    assert _restarted_by_torchrun(tmp_path)  # same job, same agent: a restart with the count unchanged
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-2")
    assert not _restarted_by_torchrun(tmp_path)  # another job: never resumed silently
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert _restarted_by_torchrun(tmp_path)  # restarted after a failure on this node


@pytest.mark.skipif(os.geteuid() == 0, reason="checks the refusal a non-root user gets")
def test_cluster_refuses_clearly_without_root() -> None:
    with pytest.raises(Exception, match="needs root"):
        with EmulatedCluster(1):
            pass


# ------------------------------------------------------------------------- real namespaces
_HOLD_A_CLUSTER = """
import signal, sys, time
# A process started from a background job inherits SIGINT ignored, and Python then raises no
# KeyboardInterrupt: give this one the default handler, as a user's terminal would.
signal.signal(signal.SIGINT, signal.default_int_handler)
from entgan.bench.cluster import EmulatedCluster
from entgan.bench.links import LinkProfile
with EmulatedCluster(2, [LinkProfile(uplink_mbit=5), LinkProfile(uplink_mbit=10)]) as cluster:
    cluster.start(cluster.nodes[1], ["sleep", "600"])  # a process inside a namespace, too
    print(cluster.owner, flush=True)
    time.sleep(600)
"""


def _hold_a_cluster() -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen([sys.executable, "-c", _HOLD_A_CLUSTER], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert process.stdout is not None
    owner = process.stdout.readline().strip()
    assert owner, "the cluster was not made"
    return process, owner


@needs_cluster
def test_sigint_removes_the_cluster_and_a_killed_creators_leftovers_are_removed_next_time() -> None:
    host_qdiscs = _host_qdiscs()
    process, owner = _hold_a_cluster()
    assert len(leftovers_of(owner)["namespaces"]) == 4  # switch, server, 2 workers
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)
    assert leftovers_of(owner) == {"namespaces": [], "host_devices": []}

    crashed, crashed_owner = _hold_a_cluster()
    crashed.kill()  # no chance to clean up
    crashed.wait(timeout=60)
    assert len(leftovers_of(crashed_owner)["namespaces"]) == 4
    with EmulatedCluster(1) as cluster:  # the next cluster finds them (dead owner) and removes them
        assert len([name for name in cluster.removed_leftovers if crashed_owner in name]) == 4
        assert leftovers_of(crashed_owner)["namespaces"] == []
    assert leftovers_of(cluster.owner)["namespaces"] == []
    assert _host_qdiscs() == host_qdiscs


def _comparable(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row without what legitimately differs between two runs: time (keys ending `_s`),
    memory (rss, hwm), and received/cumulative traffic (a resumed group re-sends the models once)."""
    return {
        key: value for key, value in row.items()
        if not key.endswith("_s") and "rss" not in key and "hwm" not in key and not key.startswith("server/bytes")
        and not key.endswith("bytes_received")
    }


def _host_qdiscs() -> str:
    return subprocess.run(["tc", "qdisc", "show"], capture_output=True, text=True).stdout


def _write(config: RunConfig, path: Path) -> Path:
    path.write_text(config.to_yaml())
    return path


def _final_g_everywhere(run_dir: Path, config: RunConfig, summary: dict[str, Any]) -> None:
    digests = worker_digests(run_dir)
    assert sorted(digest["rank"] for digest in digests) == list(range(1, config.world_size))
    due = due_ranks(config, summary["rounds"])  # the workers due in the next round hold the final G
    assert due
    for digest in digests:
        if digest["rank"] in due:
            assert digest["generator_sum"] == pytest.approx(summary["generator_sum"], rel=1e-9, abs=1e-9)


def _start(cluster: EmulatedCluster, config: RunConfig, tmp_path: Path, cache_dir: Path, max_restarts: int = 0) -> TorchrunJob:
    """torchrun on every node of `cluster` for `config`, into tmp_path/run (node logs in tmp_path/nodes)."""
    return cluster.start_torchrun(_write(config, tmp_path / "c.yaml"), tmp_path / "run", tmp_path / "nodes",
                                  secret=SECRET, env={**os.environ, "ENTGAN_CACHE_DIR": str(cache_dir)},
                                  max_restarts=max_restarts, entry_args=["--no-progress"])


def _after_rounds(run_dir: Path, rounds_done: int, action: Callable[[], None], record: dict[str, Any]) -> None:
    """Once the run has logged `rounds_done` rounds, note how many it has and do `action`."""
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        rows = RunDirectory(run_dir).metrics() if (run_dir / "metrics.jsonl").exists() else []
        if len(rows) >= rounds_done:
            record["round"] = len(rows)
            action()
            record["done"] = True
            return
        time.sleep(0.05)


def _watch_placement(job: TorchrunJob, seen: dict[str, Any]) -> None:
    """Once every rank has started, record which namespace each rank's process is in."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not seen:
        placement = job.rank_placement()
        if len(placement) == len(job.cluster.nodes) and all(placement.values()):
            seen.update({"placement": placement, "misplaced": job.misplaced_ranks()})
            return
        time.sleep(0.2)


@pytest.mark.slow
@needs_cluster
def test_torchrun_across_namespaces_runs_20_rounds_and_leaves_nothing(tmp_path: Path, cache_dir: Path) -> None:
    config = tiny_config(rounds=20, checkpoint={"every": 5}, eval={"every": 10})
    run_dir = tmp_path / "run"
    host_qdiscs = _host_qdiscs()
    seen: dict[str, Any] = {}
    with EmulatedCluster(3, LINKS) as cluster:
        owner = cluster.owner
        assert len(leftovers_of(owner)["namespaces"]) == 5  # switch + server + 3 workers
        job = _start(cluster, config, tmp_path, cache_dir)
        watcher = threading.Thread(target=_watch_placement, args=(job, seen), daemon=True)
        watcher.start()
        codes = job.wait(timeout_s=600)
        watcher.join(timeout=5)
        traffic = cluster.link_traffic()

    assert codes == [0, 0, 0, 0], [(path.name, path.read_text()[-2000:]) for path in sorted((tmp_path / "nodes").glob("*"))]
    assert seen and seen["misplaced"] == [], seen  # rank i ran in node i's namespace
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 20
    assert [row["round"] for row in RunDirectory(run_dir).metrics()] == list(range(1, 21))
    _final_g_everywhere(run_dir, config, summary)
    assert [row["rank"] for row in traffic] == [1, 2, 3]
    assert all(row["up_bytes"] > 0 and row["down_bytes"] > 0 for row in traffic), traffic
    # Nothing left behind: no namespace (their veths and qdiscs went with them), nothing on the host.
    assert leftovers_of(owner) == {"namespaces": [], "host_devices": []}
    assert _host_qdiscs() == host_qdiscs


def _checkpoints_load(run_dir: Path) -> None:
    for path in sorted((run_dir / "checkpoints").glob("*.pt")):
        state = torch.load(path, map_location="cpu", weights_only=False)
        assert state["round"] >= 1, path


@pytest.mark.slow
@needs_cluster
def test_sigkilled_worker_in_its_namespace_restarts_the_group_under_torchrun(tmp_path: Path, cache_dir: Path) -> None:
    config = tiny_config(rounds=24, checkpoint={"every": 3}, eval={"every": 6})
    straight = tmp_path / "straight"
    launch_local(config, straight, cache_dir=cache_dir, show_progress=False)  # the uninterrupted run
    run_dir = tmp_path / "run"
    killed: dict[str, Any] = {}
    with EmulatedCluster(3, LINKS) as cluster:
        job = _start(cluster, config, tmp_path, cache_dir, max_restarts=1)

        def kill_rank_2() -> None:
            os.kill(RunDirectory(run_dir).pid(2), signal.SIGKILL)

        killer = threading.Thread(target=_after_rounds, args=(run_dir, 10, kill_rank_2, killed), daemon=True)
        killer.start()
        codes = job.wait(timeout_s=600)
        killer.join(timeout=5)
        owner = cluster.owner

    logs = {path.name: path.read_text()[-3000:] for path in sorted((tmp_path / "nodes").glob("*"))}
    assert killed.get("done"), "the worker was never killed"
    assert codes == [0, 0, 0, 0], logs
    assert "(exitcode: -9)" in logs["node-2.log"], logs  # its torchrun agent saw the SIGKILL, and restarted
    summary = json.loads((run_dir / "summary.json").read_text())
    resumed = [event for event in RunDirectory(run_dir).events() if event["event"] == "resumed"]
    assert len(resumed) == 1 and summary["resumed_from_round"] == resumed[0]["round"]
    assert killed["round"] - 3 - 1 <= resumed[0]["round"] <= killed["round"]
    rows_straight, rows = RunDirectory(straight).metrics(), RunDirectory(run_dir).metrics()
    assert [row["round"] for row in rows] == list(range(1, 25))
    for a, b in zip(rows_straight, rows, strict=True):
        assert _comparable(b) == pytest.approx(_comparable(a), rel=1e-5, abs=1e-6), f"round {a['round']}"
    straight_summary = json.loads((straight / "summary.json").read_text())
    assert summary["generator_sum"] == pytest.approx(straight_summary["generator_sum"], rel=1e-6)
    _final_g_everywhere(run_dir, config, summary)
    _checkpoints_load(run_dir)
    assert leftovers_of(owner) == {"namespaces": [], "host_devices": []}


@pytest.mark.slow
@needs_cluster
def test_a_link_down_past_the_timeouts_times_out_restarts_and_loses_nothing(tmp_path: Path, cache_dir: Path) -> None:
    # Past both timeouts: under torch 2.13 a gloo send/receive is bounded by the process group's
    # start-up timeout, not by engine.round_timeout_s (README "Several machines").
    config = tiny_config(rounds=24, checkpoint={"every": 3}, eval={"every": 6},
                         engine={"start_timeout_s": 30, "round_timeout_s": 4})
    down_s = 40.0
    straight = tmp_path / "straight"
    launch_local(config, straight, cache_dir=cache_dir, show_progress=False)
    run_dir = tmp_path / "run"
    cut: dict[str, Any] = {}
    with EmulatedCluster(3, LINKS) as cluster:
        job = _start(cluster, config, tmp_path, cache_dir, max_restarts=1)

        def cut_rank_3() -> None:  # at the switch, as if its cable were pulled, then put back
            cluster.set_link(3, up=False)
            time.sleep(down_s)
            cluster.set_link(3, up=True)

        cutter = threading.Thread(target=_after_rounds, args=(run_dir, 8, cut_rank_3, cut), daemon=True)
        cutter.start()
        codes = job.wait(timeout_s=600)
        cutter.join(timeout=60)
        owner = cluster.owner

    logs = {path.name: path.read_text() for path in sorted((tmp_path / "nodes").glob("*"))}
    assert cut.get("done"), "the link was never cut and restored"
    assert codes == [0, 0, 0, 0], {name: text[-3000:] for name, text in logs.items()}
    # A clear timeout: the server's wait for the cut-off worker ended with gloo's timeout message.
    assert "Timed out waiting" in logs["node-0.log"], logs["node-0.log"][-3000:]
    resumed = [event for event in RunDirectory(run_dir).events() if event["event"] == "resumed"]
    assert len(resumed) == 1 and cut["round"] - 3 - 1 <= resumed[0]["round"] <= cut["round"] + 1
    rows = RunDirectory(run_dir).metrics()
    assert [row["round"] for row in rows] == list(range(1, 25))
    for a, b in zip(RunDirectory(straight).metrics(), rows, strict=True):
        assert _comparable(b) == pytest.approx(_comparable(a), rel=1e-5, abs=1e-6), f"round {a['round']}"
    _checkpoints_load(run_dir)  # no checkpoint torn by the cut
    _final_g_everywhere(run_dir, config, json.loads((run_dir / "summary.json").read_text()))
    assert leftovers_of(owner) == {"namespaces": [], "host_devices": []}


def test_the_per_node_table_replays_each_run_on_the_links_its_bench_gave_it(tmp_path: Path) -> None:
    import yaml

    from entgan.bench.config import load_bench_config
    from entgan.bench.runner import BENCH_MARKER

    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    for name in ("per-node-edge-generator", "edge-generator"):
        out = tmp_path / name
        out.mkdir()
        bench = load_bench_config(benchmarks / f"{name}.yaml")
        (out / BENCH_MARKER).write_text(yaml.safe_dump(bench.model_dump(mode="json"), sort_keys=False))
    links = bench_links(tmp_path / "per-node-edge-generator")
    assert links is not None
    assert [link.uplink_mbit for link in links] == [5, 10, 20, 50] * 2
    assert [link.downlink_mbit for link in links] == [20, 40, 80, 200] * 2
    assert bench_links(tmp_path / "edge-generator") is None  # no per-node network section
    assert bench_links(tmp_path / "missing") is None
