"""An emulated cluster on one machine: one network namespace per node, each behind its own link.

Real edge nodes are separate hosts, each behind its own link. As root, this module makes that on
one machine and runs `torchrun` on every node, exactly as on real machines (README "Several
machines"):

    egn-<owner>-sw     the switch: a bridge `egn-br` with one veth port `egn-p<i>` per node
    egn-<owner>-n0     the server node: interface `egn-eth`, address 198.18.0.100
    egn-<owner>-n<i>   worker rank i (1..K): interface `egn-eth`, address 198.18.0.(100+i)

Addresses come from 198.18.0.0/15, the range RFC 2544 reserves for benchmarking, and exist only
inside these namespaces: every device, address, route and qdisc is made directly inside them, none
in the host's own namespace, and traffic between nodes never leaves them. Worker i's uplink is a
token-bucket filter (`tc ... tbf`) on its `egn-eth`, its downlink one on the switch's `egn-p<i>`;
a profile's latency adds `netem` delay in both directions where the kernel has sch_netem (and is
refused where it does not: see `netem_available`). The server's link is not shaped.

`<owner>` is the creating process's id and start time. A cluster removes itself on exit, on an
exception, on SIGINT (and SIGTERM/SIGHUP under this module's command line); a creator killed
outright leaves its namespaces behind, and the next cluster made on this machine finds them by
the `egn-` prefix and the dead owner and removes them (processes inside first), leaving the
clusters of live owners alone. Needs root; `unavailable_reason` says why not otherwise.

Command line (as root): `python -m entgan.bench.cluster run CONFIG --run-dir DIR --links edge-uneven`,
`... check`, `... clean`; see `main`.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from entgan.bench.links import LinkProfile, PerNodeNetworkConfig, edge_uneven

PREFIX = "egn-"
"""Every namespace and device this module makes starts with it (leftovers are found by it)."""
INTERFACE = "egn-eth"
"""Each node's interface, inside its namespace (same name on every node: GLOO_SOCKET_IFNAME)."""
BRIDGE = "egn-br"
SUBNET_PREFIX = "198.18.0."
SUBNET_BITS = 24
FIRST_HOST = 100
"""Server 198.18.0.100, worker i 198.18.0.(100+i): three-digit last octets sort as text in rank
order, which is how torchrun's c10d rendezvous assigns ranks (by each node's --local-addr)."""
MAX_WORKERS = 99
DEFAULT_PORT = 29400
TRAFFIC_MARKER = "--- entgan cluster: per-node links at exit ---"
_MIN_BURST_BYTES = 16384
"""tbf bucket: a burst below ~1 KB dropped even SYNs here; 16 KB (or 4 ms at the rate) is safe."""
_STOP_GRACE_S = 5.0
_COMMAND_TIMEOUT_S = 30.0


class ClusterError(RuntimeError):
    """A cluster command failed; the message holds the command and what it printed."""


class ClusterUnavailable(ClusterError):
    """This machine (or this user) cannot make the emulated cluster; the message says why."""


# ------------------------------------------------------------------------------ plumbing
def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _command(["ip", *args], check=check)


def _tc(namespace: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _command(["tc", "-n", namespace, *args], check=check)


def _command(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S)
    if check and result.returncode != 0:
        message = " ".join((result.stderr or result.stdout).split()) or "no message"
        raise ClusterError(f"`{shlex.join(argv)}` failed (exit {result.returncode}): {message}")
    return result


def _start_ticks(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (with its pid, unique over the uptime)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_token(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{pid}x{_start_ticks(pid)}"


def _owner_alive(token: str) -> bool:
    pid, _, ticks = token.partition("x")
    return pid.isdigit() and _start_ticks(int(pid)) == ticks


def namespaces() -> list[str]:
    """Every named network namespace on this machine (`ip netns list`)."""
    result = _ip("netns", "list", check=False)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def leftover_namespaces() -> list[str]:
    """Namespaces with this module's prefix whose creating process is gone."""
    found = []
    for name in namespaces():
        if name.startswith(PREFIX):
            owner = name[len(PREFIX):].split("-", 1)[0]
            if not _owner_alive(owner):
                found.append(name)
    return found


def _root_namespace_leftovers() -> list[str]:
    """Devices with this module's prefix in the host's own namespace: never made there by this
    module (it creates every device inside its namespaces), listed so a check can prove it."""
    result = _ip("-o", "link", "show", check=False)
    names = [line.split(":")[1].strip().split("@")[0] for line in result.stdout.splitlines() if ":" in line]
    return [name for name in names if name.startswith(PREFIX)]


def _namespace_pids(name: str) -> list[int]:
    result = _ip("netns", "pids", name, check=False)
    return [int(word) for word in result.stdout.split() if word.isdigit()]


def remove_namespace(name: str) -> None:
    """Stop every process still inside namespace `name` (all started by this module), then delete
    it; its devices and their qdiscs go with it (a veth pair goes when either end's namespace does)."""
    if name not in namespaces():
        return
    for stop_signal in (signal.SIGTERM, signal.SIGKILL):
        pids = _namespace_pids(name)
        for pid in pids:
            try:
                os.kill(pid, stop_signal)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (_STOP_GRACE_S if stop_signal == signal.SIGTERM else 30.0)
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if Path(f"/proc/{pid}").exists() and not _zombie(pid)]
            time.sleep(0.05)
        if not pids:
            break
    _ip("netns", "delete", name)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def remove_leftovers() -> list[str]:
    """Remove what dead earlier clusters left behind (by prefix and dead owner); return the names."""
    removed = []
    for name in leftover_namespaces():
        remove_namespace(name)
        removed.append(name)
    for device in _root_namespace_leftovers():
        _ip("link", "delete", device, check=False)
        removed.append(device)
    return removed


def leftovers_of(owner: str | None = None) -> dict[str, list[str]]:
    """What is left on this machine with the prefix: namespaces (of `owner`, or of anyone) and
    devices in the host's namespace. Both empty after a cluster is removed."""
    prefix = PREFIX if owner is None else f"{PREFIX}{owner}-"
    return {
        "namespaces": [name for name in namespaces() if name.startswith(prefix)],
        "host_devices": _root_namespace_leftovers(),
    }


def unavailable_reason() -> str | None:
    """Why this process cannot make a cluster (None: it can; the trial in `probe` is the proof)."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return (f"making network namespaces, veth pairs and tc qdiscs needs root (running as uid {os.geteuid()}); "
                "run as root, e.g. with sudo")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found on PATH (install iproute2)"
    result = _ip("netns", "list", check=False)
    if result.returncode != 0:
        return f"`ip netns` does not work here: {' '.join(result.stderr.split())}"
    return None


_netem: bool | None = None


def netem_available() -> bool:
    """Whether this kernel has the netem qdisc (delay), tried on the loopback of a namespace of ours."""
    global _netem
    if _netem is None:
        probe_namespace = f"{PREFIX}{_owner_token()}-probe"
        _ip("netns", "add", probe_namespace)
        try:
            _netem = _tc(probe_namespace, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms", check=False).returncode == 0
        finally:
            remove_namespace(probe_namespace)
    return _netem


# ------------------------------------------------------------------------------ the cluster
@dataclass(frozen=True)
class Node:
    index: int
    """Node i runs rank i: 0 the server, 1..K the workers."""
    namespace: str
    address: str
    link: LinkProfile | None
    """None: unshaped (the server; workers when no profile is given)."""

    @property
    def switch_port(self) -> str:
        return f"{PREFIX}p{self.index}"


class EmulatedCluster:
    """1 server + `workers` nodes, each in its own network namespace, joined by one bridge.

    Use as a context manager: entering makes it (after removing dead clusters' leftovers), leaving
    removes it, whatever happened in between (an exception, KeyboardInterrupt). An `atexit` hook
    removes it too if the interpreter ends without leaving the block.
    """

    def __init__(self, workers: int, links: Sequence[LinkProfile | None] | None = None, *, queue_ms: float = 100.0) -> None:
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"an emulated cluster has 1 to {MAX_WORKERS} workers, asked for {workers}")
        links = list(links) if links is not None else [None] * workers
        if len(links) != workers:
            raise ValueError(f"one link profile per worker: {workers} workers, {len(links)} profiles")
        self.owner = _owner_token()
        self.switch = f"{PREFIX}{self.owner}-sw"
        self.queue_ms = queue_ms
        self.nodes = [
            Node(index, f"{PREFIX}{self.owner}-n{index}", f"{SUBNET_PREFIX}{FIRST_HOST + index}",
                 None if index == 0 else links[index - 1])
            for index in range(workers + 1)
        ]
        self.removed_leftovers: list[str] = []
        self._processes: list[subprocess.Popen[bytes]] = []
        self._made: list[str] = []

    @property
    def server(self) -> Node:
        return self.nodes[0]

    @property
    def workers(self) -> list[Node]:
        return self.nodes[1:]

    # --- life cycle ---
    def __enter__(self) -> EmulatedCluster:
        self.create()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.destroy()

    def create(self) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise ClusterUnavailable(reason)
        self.removed_leftovers = remove_leftovers()
        if any(node.link is not None and node.link.latency_ms > 0 for node in self.nodes) and not netem_available():
            raise ClusterUnavailable(
                "a link profile asks for latency_ms, and this kernel has no netem qdisc (sch_netem) to delay "
                "packets; only rates can be shaped here (set latency_ms: 0)"
            )
        atexit.register(self.destroy)
        try:
            self._build()
        except BaseException:
            self.destroy()
            raise

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        self._add_namespace(self.switch)
        _ip("-n", self.switch, "link", "add", BRIDGE, "type", "bridge")
        _ip("-n", self.switch, "link", "set", BRIDGE, "up")
        for node in self.nodes:
            self._add_namespace(node.namespace)
            # Both ends are made inside namespaces: the port in the switch's, its peer in the node's.
            _ip("-n", self.switch, "link", "add", node.switch_port, "type", "veth",
                "peer", "name", INTERFACE, "netns", node.namespace)
            _ip("-n", self.switch, "link", "set", node.switch_port, "master", BRIDGE, "up")
            _ip("-n", node.namespace, "addr", "add", f"{node.address}/{SUBNET_BITS}", "dev", INTERFACE)
            _ip("-n", node.namespace, "link", "set", INTERFACE, "up")
            if node.link is not None:
                self._shape(node.namespace, INTERFACE, node.link.uplink_mbit, node.link.latency_ms)
                self._shape(self.switch, node.switch_port, node.link.downlink, node.link.latency_ms)

    def _shape(self, namespace: str, device: str, rate_mbit: float, latency_ms: float) -> None:
        burst = max(_MIN_BURST_BYTES, int(rate_mbit * 1e6 / 8 * 0.004))
        tbf = ["tbf", "rate", f"{rate_mbit:g}mbit", "burst", str(burst), "latency", f"{self.queue_ms:g}ms"]
        if latency_ms > 0:
            _tc(namespace, "qdisc", "add", "dev", device, "root", "handle", "1:", "netem", "delay", f"{latency_ms:g}ms")
            _tc(namespace, "qdisc", "add", "dev", device, "parent", "1:", "handle", "2:", *tbf)
        else:
            _tc(namespace, "qdisc", "add", "dev", device, "root", "handle", "1:", *tbf)

    def destroy(self) -> None:
        """Stop every process started in the cluster, then delete its namespaces (with their devices
        and qdiscs). Safe to call more than once."""
        self.stop_processes()
        problems = []
        for name in reversed(self._made):
            try:
                remove_namespace(name)
            except ClusterError as error:
                problems.append(str(error))
        self._made = [name for name in self._made if name in namespaces()]
        atexit.unregister(self.destroy)
        if problems:
            raise ClusterError("could not remove the emulated cluster: " + "; ".join(problems))

    # --- processes ---
    def start(self, node: Node, argv: Sequence[str], *, env: dict[str, str] | None = None,
              output: IO[Any] | int | None = None) -> subprocess.Popen[bytes]:
        """Start `argv` inside `node`'s namespace, in a session of its own (stopped by `destroy`)."""
        process = subprocess.Popen(
            ["ip", "netns", "exec", node.namespace, *argv],
            env=env, stdout=output, stderr=subprocess.STDOUT if output is not None else None,
            start_new_session=True,
        )
        self._processes.append(process)
        return process

    def stop_processes(self) -> None:
        for process in self._processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        deadline = time.monotonic() + _STOP_GRACE_S
        for process in self._processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()
        self._processes = []

    def namespace_of(self, pid: int) -> str | None:
        """The named namespace process `pid` is in (`ip netns identify`), None if none or gone."""
        result = _ip("netns", "identify", str(pid), check=False)
        return result.stdout.strip() or None

    # --- links ---
    def set_link(self, rank: int, up: bool) -> None:
        """Cut (or restore) worker `rank`'s link at the switch, as if its cable were pulled."""
        _ip("-n", self.switch, "link", "set", self.nodes[rank].switch_port, "up" if up else "down")

    def link_traffic(self) -> list[dict[str, Any]]:
        """Bytes, packets and drops through each shaped worker link so far, both directions."""
        rows = []
        for node in self.workers:
            if node.link is None:
                continue
            row: dict[str, Any] = {"rank": node.index, "link": node.link.label()}
            for direction, namespace, device in (("up", node.namespace, INTERFACE), ("down", self.switch, node.switch_port)):
                qdisc = _tbf_counters(namespace, device)
                row.update({f"{direction}_{key}": value for key, value in qdisc.items()})
            rows.append(row)
        return rows

    def traffic_report(self) -> str:
        """The shaped links' counters in `tc -s` form, under TRAFFIC_MARKER (the bench sums them)."""
        lines = [TRAFFIC_MARKER]
        for node in self.workers:
            if node.link is None:
                continue
            for direction, namespace, device in (("uplink", node.namespace, INTERFACE), ("downlink", self.switch, node.switch_port)):
                shown = _tc(namespace, "-s", "qdisc", "show", "dev", device, check=False).stdout.strip()
                lines += [f"# rank {node.index} {direction} ({node.link.label()})", shown]
        return "\n".join(lines)

    # --- torchrun ---
    def torchrun_command(
        self, node: Node, config_path: Path, run_dir: Path, *, run_id: str, port: int = DEFAULT_PORT,
        max_restarts: int = 0, entry_args: Sequence[str] = (),
    ) -> list[str]:
        """The README's multi-machine command for `node`, as it runs inside the node's namespace.

        Beyond the README's line: `--local-addr` (ranks follow the sorted node addresses under the
        c10d rendezvous, so the server's must sort first; `--node-rank` is kept but that rendezvous
        ignores it) and `--rdzv-conf=is_host=1` on the server (which hosts the rendezvous store;
        torchrun's guess compares the endpoint with the host name's address, 127.0.0.1 here)."""
        command = [
            sys.executable, "-m", "torch.distributed.run",
            f"--nnodes={len(self.nodes)}", "--nproc-per-node=1", f"--node-rank={node.index}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={self.server.address}:{port}", f"--rdzv-id={run_id}",
            f"--local-addr={node.address}", f"--rdzv-conf=is_host={1 if node.index == 0 else 0}",
            f"--max-restarts={max_restarts}",
            "-m", "entgan.run", str(config_path), "--run-dir", str(run_dir), *entry_args,
        ]
        return command

    def start_torchrun(
        self, config_path: Path, run_dir: Path, log_dir: Path, *, secret: str | None = None,
        port: int = DEFAULT_PORT, max_restarts: int = 0, entry_args: Sequence[str] = (),
        server_output: IO[Any] | int | None = None, env: dict[str, str] | None = None,
    ) -> TorchrunJob:
        """Start torchrun on every node (server first); node i's output goes to log_dir/node-i.log
        (the server's to `server_output` if given). The job secret reaches every node the way the
        README says, in ENTGAN_JOB_SECRET (a fresh one unless given or already set)."""
        log_dir.mkdir(parents=True, exist_ok=True)
        base = dict(os.environ if env is None else env)
        secret = secret or base.get("ENTGAN_JOB_SECRET") or secrets.token_hex(32)
        environment = {
            **base,
            "ENTGAN_JOB_SECRET": secret,
            "GLOO_SOCKET_IFNAME": INTERFACE,
            # A fresh store for every group: the rendezvous store torchrun shares by default lives as
            # long as the job, and a restarted group read the old group's gloo addresses from it
            # ("Gloo connectFullMesh failed ... Connection refused" on every node after a SIGKILL).
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": base.get("OMP_NUM_THREADS", "1"),
        }
        run_id = f"entgan-{self.owner}"
        job = TorchrunJob(self, run_dir, log_dir)
        for node in self.nodes:
            command = self.torchrun_command(node, Path(config_path), Path(run_dir), run_id=run_id, port=port,
                                            max_restarts=max_restarts, entry_args=entry_args)
            log_path = log_dir / f"node-{node.index}.log"
            handle: IO[Any] | int | None
            if node.index == 0 and server_output is not None:
                handle = server_output
            else:
                handle = log_path.open("w")
                job.log_files.append(handle)
            if hasattr(handle, "write"):
                handle.write(f"$ ip netns exec {node.namespace} {shlex.join(command)}\n")
                handle.flush()
            job.processes.append(self.start(node, command, env=environment, output=handle))
        return job


@dataclass
class TorchrunJob:
    """The torchrun agents of one job, one per node (index = node = rank)."""

    cluster: EmulatedCluster
    run_dir: Path
    log_dir: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    log_files: list[IO[Any]] = field(default_factory=list)

    def returncodes(self) -> list[int | None]:
        return [process.poll() for process in self.processes]

    def wait(self, timeout_s: float | None = None, failure_grace_s: float = 120.0) -> list[int | None]:
        """Wait for every node; once one has failed, give the rest `failure_grace_s` to end (a
        failed server leaves the workers' agents waiting for a rendezvous), then stop them."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        failed_at: float | None = None
        while True:
            codes = self.returncodes()
            if all(code is not None for code in codes):
                break
            now = time.monotonic()
            if failed_at is None and any(code not in (None, 0) for code in codes):
                failed_at = now
            if (deadline is not None and now > deadline) or (failed_at is not None and now - failed_at > failure_grace_s):
                self.cluster.stop_processes()
                break
            time.sleep(0.2)
        for handle in self.log_files:
            handle.close()
        return self.returncodes()

    def rank_placement(self) -> dict[int, str | None]:
        """Rank -> namespace of its process (from the run directory's pids/rank-K files), for the
        ranks alive now: proof that rank i runs in node i's namespace."""
        placement: dict[int, str | None] = {}
        for path in sorted((self.run_dir / "pids").glob("rank-*")):
            try:
                pid = int(path.read_text())
            except (OSError, ValueError):
                continue
            placement[int(path.name.removeprefix("rank-"))] = self.cluster.namespace_of(pid)
        return placement

    def misplaced_ranks(self) -> list[str]:
        """Ranks not in their own node's namespace, in words (empty: every rank where it belongs)."""
        return [
            f"rank {rank} runs in {namespace}, not {self.cluster.nodes[rank].namespace}"
            for rank, namespace in self.rank_placement().items()
            if namespace is not None and rank < len(self.cluster.nodes) and namespace != self.cluster.nodes[rank].namespace
        ]


def _tbf_counters(namespace: str, device: str) -> dict[str, int]:
    result = _tc(namespace, "-s", "-j", "qdisc", "show", "dev", device, check=False)
    try:
        qdiscs = json.loads(result.stdout or "[]")
    except ValueError:
        return {}
    for qdisc in qdiscs:
        if qdisc.get("kind") == "tbf":
            return {"bytes": int(qdisc.get("bytes", 0)), "packets": int(qdisc.get("packets", 0)),
                    "dropped": int(qdisc.get("drops", 0))}
    return {}


# ------------------------------------------------------------------------------ bench use
_SENT = re.compile(r"qdisc tbf .*?\n\s*Sent (\d+) bytes (\d+) pkt \(dropped (\d+)", re.DOTALL)


def link_traffic_in_log(log_text: str) -> dict[str, int] | None:
    """Bytes, packets and drops through all of a run's shaped links (both directions), from the
    counters this module prints at the end of a run (`traffic_report`)."""
    _, marker, tail = log_text.rpartition(TRAFFIC_MARKER)
    if not marker:
        return None
    matches = _SENT.findall(tail)
    if not matches:
        return None
    return {key: sum(int(match[index]) for match in matches) for index, key in enumerate(("bytes", "packets", "dropped"))}


def probe(config: PerNodeNetworkConfig) -> str | None:
    """Make and remove a 1 + 1 node cluster with the first profile; None if that worked, else why."""
    try:
        with EmulatedCluster(1, config.links[:1], queue_ms=config.queue_ms):
            pass
    except (ClusterError, OSError, subprocess.SubprocessError) as error:
        return str(error)
    return None


def describe(config: PerNodeNetworkConfig) -> str:
    profiles = ", ".join(f"rank {rank}: {link.label()}" for rank, link in enumerate(config.links, start=1))
    return (f"one network namespace per node, each worker behind its own tbf-shaped link ({profiles}), "
            "torchrun with c10d rendezvous on every node")


def wrap(command: list[str], config: PerNodeNetworkConfig) -> list[str]:
    """An `entgan run CONFIG --run-dir DIR ...` command turned into this module's `run`: the same
    run, made by torchrun across an emulated cluster with `config`'s links."""
    try:
        start = command.index("run")
    except ValueError:
        raise ValueError(f"not an `entgan run` command: {shlex.join(command)}") from None
    links = json.dumps([link.model_dump(mode="json") for link in config.links])
    return [
        sys.executable, "-m", "entgan.bench.cluster", "run", *command[start + 1:],
        "--links-json", links, "--queue-ms", f"{config.queue_ms:g}", "--port", str(config.port),
    ]


def round_figures(run_dir: Path, log_path: Path | None = None) -> dict[str, float]:
    """A finished run's time and traffic per round.

    - `s_per_round`, `median_s_per_round`: the server's `round_s` over rounds 2..N (round 1 carries
      the first exchange);
    - `server_bytes_per_round`: the server's payload, sent + received, per round over rounds 2..N;
    - `sent_bytes_per_round`: the payload every rank sent over the whole run (set-up and
      worker-to-worker gossip included, from the summary and the workers' digests) per round;
    - `wire_bytes_per_round` (per-node runs, from the log): bytes through all worker links, both
      directions, per round; worker-to-worker traffic crosses two links, and headers and
      retransmissions count."""
    from statistics import mean, median

    from entgan.rundir import SUMMARY_FILE, RunDirectory

    run = RunDirectory(run_dir)
    rows = run.metrics()
    if len(rows) < 2:
        raise ValueError(f"{run_dir}: needs at least two rounds of metrics")
    steady = rows[1:]
    server = [row["server/bytes_sent"] + row["server/bytes_received"] for row in rows]
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    workers_sent = sum(json.loads(path.read_text()).get("bytes_sent", 0.0) for path in run.workers.glob("rank-*.json"))
    figures = {
        "rounds": float(len(rows)),
        "s_per_round": mean(row["round_s"] for row in steady),
        "median_s_per_round": median(row["round_s"] for row in steady),
        "server_bytes_per_round": (server[-1] - server[0]) / len(steady),
        "sent_bytes_per_round": (summary["server/bytes_sent"] + workers_sent) / len(rows),
    }
    if log_path is not None and log_path.is_file():
        wire = link_traffic_in_log(log_path.read_text(errors="replace"))
        if wire is not None:
            figures["wire_bytes_per_round"] = wire["bytes"] / len(rows)
    return figures


def edge_seconds_per_round(
    run_dir: Path, links: list[LinkProfile], worker_speeds: Sequence[float] = (1.0,)
) -> list[float | None]:
    """Mean seconds per round over rounds 2..N on the edge clock with these links (the run's
    workers behind them, as in the per-node runs), one figure per device speed (every worker's
    device at that many cores); None where the run has no timelines or its replay is incomplete."""
    from entgan.bench.edge_clock import load_programs, profile_for_network, replay

    if not (run_dir / "timeline").is_dir():
        return [None] * len(worker_speeds)
    network = PerNodeNetworkConfig(mode="per-node", links=links)
    programs = load_programs(run_dir)
    profile = profile_for_network(network, len(programs) - 1)
    figures: list[float | None] = []
    for speed in worker_speeds:
        devices = [device.model_copy(update={"speed": speed}) for device in profile.workers]
        clock = replay(programs, profile.model_copy(update={"workers": devices}))
        steady = clock.rounds[1:]
        figures.append(sum(entry.duration_s for entry in steady) / len(steady) if steady and clock.complete else None)
    return figures


def bench_links(out_dir: Path) -> list[LinkProfile] | None:
    """The per-node links a bench output folder's runs sat behind (its resolved `bench-config.yaml`),
    or None for a bench without a per-node network section."""
    import yaml

    from entgan.bench.runner import BENCH_MARKER

    marker = out_dir / BENCH_MARKER
    if not marker.is_file():
        return None
    network = (yaml.safe_load(marker.read_text()) or {}).get("network") or {}
    if network.get("mode") != "per-node":
        return None
    return PerNodeNetworkConfig.model_validate(network).links


def results_table(out_dir: Path, profile: str, worker_speeds: Sequence[float] = (1.0,)) -> str:
    """The README's per-node-link table for a bench output folder. The edge clock replays each run
    on the links the bench gave its workers (`bench_links`), where the runs recorded timelines; a
    folder without them (an older bench) is replayed on `edge_uneven` when `profile` is that. One
    edge-clock column per worker device speed: the emulated nodes share this machine's cores, so
    with n workers computing at once on c cores, speed c / n is the one to compare with."""
    from entgan.rundir import RunDirectory

    links = bench_links(out_dir)
    edge_columns = "".join(f" edge-clock s/round, devices at {speed:g} core |" for speed in worker_speeds)
    lines = [
        f"| method | link profile | measured s/round (mean; median) |{edge_columns} server sent + received, "
        "MB/round | all ranks sent, MB/round | through the links, MB/round |",
        "|---|---|---|" + "---|" * len(worker_speeds) + "---|---|---|",
    ]
    for run_dir in sorted(path for path in (out_dir / "runs").iterdir() if (path / "summary.json").is_file()):
        figures = round_figures(run_dir, out_dir / "logs" / f"{run_dir.name}.log")
        wire = figures.get("wire_bytes_per_round")
        run_links = links
        if run_links is None and profile == "edge-uneven":
            run_links = edge_uneven(RunDirectory(run_dir).config().num_workers)
        edges: list[float | None] = [None] * len(worker_speeds)
        if run_links is not None:
            edges = edge_seconds_per_round(run_dir, run_links, worker_speeds)
        edge_cells = "".join(" pending |" if edge is None else f" {edge:.2f} |" for edge in edges)
        lines.append(
            f"| {run_dir.name} | {profile} | {figures['s_per_round']:.2f}; {figures['median_s_per_round']:.2f} |{edge_cells} "
            f"{figures['server_bytes_per_round'] / 1e6:.2f} | {figures['sent_bytes_per_round'] / 1e6:.2f} | "
            f"{'–' if wire is None else f'{wire / 1e6:.2f}'} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------ command line
def parse_link(text: str) -> LinkProfile:
    """`UP`, `UP/DOWN` or `UP/DOWN/LATENCY_MS` (Mbit/s, Mbit/s, ms) -> a link profile."""
    parts = text.split("/")
    try:
        values = [float(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': expected UP[/DOWN[/LATENCY_MS]] in Mbit/s and ms") from None
    if not 1 <= len(values) <= 3:
        raise argparse.ArgumentTypeError(f"'{text}': expected UP[/DOWN[/LATENCY_MS]]")
    return LinkProfile(uplink_mbit=values[0], downlink_mbit=values[1] if len(values) > 1 else None,
                       latency_ms=values[2] if len(values) > 2 else 0.0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m entgan.bench.cluster", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="make the cluster, run CONFIG with torchrun on every node, remove it")
    run.add_argument("config")
    run.add_argument("--run-dir", required=True, help="the run directory (every node writes its own files there)")
    run.add_argument("--overwrite", action="store_true")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--link", action="append", type=parse_link, default=[],
                     help="UP[/DOWN[/LATENCY_MS]] for the next worker (rank order); repeat once per worker")
    run.add_argument("--links", choices=["edge-uneven", "none"], help="a named set of profiles, one per worker")
    run.add_argument("--links-json", help="the profiles as a JSON list (what `entgan bench` passes)")
    run.add_argument("--queue-ms", type=float, default=100.0, help="tbf queue limit (default 100 ms)")
    run.add_argument("--port", type=int, default=DEFAULT_PORT, help="rendezvous port on the server node")
    run.add_argument("--max-restarts", type=int, default=0, help="torchrun --max-restarts on every node")
    run.add_argument("--log-dir", help="node logs (default: RUN_DIR.nodes)")
    run.add_argument("--timeout", type=float, help="stop the job after this many seconds")
    commands.add_parser("check", help="say whether this machine can make a cluster, and what it can shape")
    commands.add_parser("clean", help="remove namespaces left by clusters whose creator died")
    table = commands.add_parser("table", help="time and bytes per round of a per-node bench's runs (markdown)")
    table.add_argument("out", help="the bench output folder")
    table.add_argument("--profile", default="edge-uneven", help="link profile name for the table")
    table.add_argument("--worker-speed", type=float, action="append", dest="worker_speeds",
                       help="an edge-clock column with every worker's device at this many cores "
                       "(repeatable; default 1)")
    return parser


def _links_for(args: argparse.Namespace, workers: int) -> list[LinkProfile | None]:
    if args.links_json:
        return [LinkProfile.model_validate(item) for item in json.loads(args.links_json)]
    if args.links == "edge-uneven":
        return list(edge_uneven(workers))
    if args.link:
        return list(args.link)
    return [None] * workers


def _raise_on_signal(signal_number: int, _frame: object) -> None:
    raise SystemExit(128 + signal_number)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "table":
        print(results_table(Path(args.out), args.profile, args.worker_speeds or (1.0,)))
        return 0
    if args.command == "clean":
        reason = unavailable_reason()
        if reason is not None:
            print(f"cluster: {reason}", file=sys.stderr)
            return 2
        removed = remove_leftovers()
        print(f"removed {len(removed)}: {' '.join(removed)}" if removed else "nothing left behind")
        return 0
    if args.command == "check":
        reason = unavailable_reason()
        if reason is not None:
            print(f"cluster: unavailable: {reason}")
            return 2
        trial = probe(PerNodeNetworkConfig(mode="per-node", links=[LinkProfile(uplink_mbit=10)]))
        print("namespaces, veth, bridge, tbf: " + ("ok" if trial is None else f"FAILED: {trial}"))
        print("netem (latency): " + ("ok" if netem_available() else "not in this kernel: rates only, no added delay"))
        return 0 if trial is None else 2
    return _command_run(args)


def _command_run(args: argparse.Namespace) -> int:
    from entgan.config import ConfigError, load_config

    for stop_signal in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop_signal, _raise_on_signal)
    try:
        config = load_config(args.config)
        links = _links_for(args, config.num_workers)
        cluster = EmulatedCluster(config.num_workers, links, queue_ms=args.queue_ms)
    except (ConfigError, ValueError) as error:
        print(f"cluster: error: {error}", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir)
    log_dir = Path(args.log_dir) if args.log_dir else run_dir.with_name(run_dir.name + ".nodes")
    entry_args = [flag for flag, wanted in (("--overwrite", args.overwrite), ("--no-progress", args.no_progress)) if wanted]
    try:
        with cluster:
            if cluster.removed_leftovers:
                print(f"cluster: removed leftovers of dead clusters: {' '.join(cluster.removed_leftovers)}", flush=True)
            for node in cluster.nodes:
                link = node.link.label() if node.link else "unshaped"
                print(f"cluster: node {node.index} ({'server' if node.index == 0 else 'worker'}) {node.namespace} "
                      f"{node.address} link {link}", flush=True)
            sys.stdout.flush()
            job = cluster.start_torchrun(Path(args.config), run_dir, log_dir, port=args.port, max_restarts=args.max_restarts,
                                         entry_args=entry_args, server_output=sys.stdout)
            codes = job.wait(timeout_s=args.timeout)
            print(cluster.traffic_report(), flush=True)
    except ClusterUnavailable as error:
        print(f"cluster: unavailable: {error}", file=sys.stderr)
        return 3
    except ClusterError as error:
        print(f"cluster: error: {error}", file=sys.stderr)
        return 1
    failed = [index for index, code in enumerate(codes) if code != 0]
    for index in failed:
        if index == 0:
            continue
        lines = (log_dir / f"node-{index}.log").read_text(errors="replace").splitlines()
        print(f"--- node {index} exit status {codes[index]}; last lines of {log_dir / f'node-{index}.log'} ---")
        print("\n".join(lines[-15:]))
    print(f"cluster: removed; node exit statuses {codes}", flush=True)
    if not failed:
        return 0
    return codes[0] if codes[0] not in (0, None) else 1


if __name__ == "__main__":
    sys.exit(main())
