"""A rate-limited link for a run: a private network namespace whose loopback is shaped with `tc`.

Every rank of an embedded run talks over loopback (gloo is pinned to `lo`, rendezvous goes through
a file), so a run started inside a fresh network namespace sees only that namespace's loopback.
Shaping it with a token-bucket filter makes the given rate one link shared by all ranks. Nothing
outside the namespace is touched: no other interface, no address, no host-wide setting; the
namespace disappears with the run's last process.

The namespace is made with `unshare --net` (as root), or `unshare --map-root-user --net` (an
unprivileged user namespace, where the kernel allows them). When neither works, `probe` says why.

`network.mode: per-node` (a `PerNodeNetworkConfig`) is handed to `entgan.bench.cluster`: one
namespace and one shaped link per node, the run started with torchrun on every node.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from entgan.bench.config import NetworkConfig
from entgan.bench.links import PerNodeNetworkConfig

# Runs inside the new namespace: bring loopback up with the configured MTU, attach the token
# bucket, run the command, then print the bucket's counters (so the log shows the traffic that
# went through the shaped link) and pass on the command's exit status.
_NAMESPACE_SCRIPT = (
    'ip link set dev lo mtu "$4" up && '
    'tc qdisc add dev lo root tbf rate "$1" burst "$2" latency "$3" || exit 97; '
    "shift 4; "
    '"$@"; status=$?; '
    'echo "--- entgan bench: shaped loopback at exit ---"; tc -s qdisc show dev lo; '
    "exit $status"
)
_SETUP_FAILED = 97


class NetworkUnavailable(RuntimeError):
    """The constrained network cannot be set up here; the message says why, for the user."""


@dataclass(frozen=True)
class NetworkStatus:
    """What the bench could do about the requested network, in words fit for the report."""

    requested: NetworkConfig | PerNodeNetworkConfig | None
    active: bool
    detail: str

    def describe(self) -> str:
        if self.requested is None:
            return "unconstrained (loopback, no rate limit)"
        if isinstance(self.requested, PerNodeNetworkConfig):
            from entgan.bench.cluster import describe

            if self.active:
                return describe(self.requested)
            return f"UNCONSTRAINED: per-node links were requested but could not be set up: {self.detail}"
        link = _link_words(self.requested)
        if self.active:
            return f"{link}, shared by all ranks of a run ({self.detail})"
        return f"UNCONSTRAINED: {link} was requested but could not be set up: {self.detail}"


def _link_words(config: NetworkConfig) -> str:
    return (
        f"{config.rate_mbit:g} Mbit/s token bucket (burst {config.burst_kbit:g} kbit, queue limit "
        f"{config.latency_ms:g} ms, MTU {config.mtu}) on a private loopback"
    )


def namespace_command(euid: int) -> list[str]:
    """`unshare` for a new network namespace: directly as root, in a user namespace otherwise."""
    return ["unshare", "--net"] if euid == 0 else ["unshare", "--map-root-user", "--net"]


def wrap(command: list[str], config: NetworkConfig | PerNodeNetworkConfig, euid: int | None = None) -> list[str]:
    """`command`, to be run in a fresh network namespace behind the shaped loopback (per-node:
    across an emulated cluster, with torchrun on every node)."""
    if isinstance(config, PerNodeNetworkConfig):
        from entgan.bench import cluster

        return cluster.wrap(command, config)
    euid = os.geteuid() if euid is None else euid
    return [
        *namespace_command(euid),
        "--",
        "sh",
        "-c",
        _NAMESPACE_SCRIPT,
        "entgan-netns",
        f"{config.rate_mbit:g}mbit",
        f"{config.burst_kbit:g}kbit",
        f"{config.latency_ms:g}ms",
        str(config.mtu),
        *command,
    ]


def probe(config: NetworkConfig | PerNodeNetworkConfig | None) -> NetworkStatus:
    """Try the namespace and the shaping once with a no-op command; report what works.

    Raises NetworkUnavailable if it does not work and the config says the network is required.
    """
    if config is None:
        return NetworkStatus(None, active=False, detail="no network section")
    if isinstance(config, PerNodeNetworkConfig):
        return _probe_per_node(config)
    problem = _missing_tools() or _trial(config)
    if problem is None:
        how = "root" if os.geteuid() == 0 else "unprivileged user namespace"
        return NetworkStatus(config, active=True, detail=f"network namespace via unshare as {how}")
    if config.required:
        raise NetworkUnavailable(
            f"network: cannot emulate the constrained link: {problem}. Run as root (or where unprivileged "
            f"user namespaces are allowed), or set network.required: false to run unconstrained."
        )
    return NetworkStatus(config, active=False, detail=problem)


def _probe_per_node(config: PerNodeNetworkConfig) -> NetworkStatus:
    from entgan.bench import cluster

    problem = cluster.unavailable_reason() or cluster.probe(config)
    if problem is None:
        return NetworkStatus(config, active=True, detail="emulated cluster")
    if config.required:
        raise NetworkUnavailable(
            f"network: cannot make the per-node cluster: {problem}. Run as root, or set network.required: false "
            "to run unconstrained."
        )
    return NetworkStatus(config, active=False, detail=problem)


def _missing_tools() -> str | None:
    missing = [tool for tool in ("unshare", "ip", "tc") if shutil.which(tool) is None]
    return f"{', '.join(missing)} not found on PATH" if missing else None


def _trial(config: NetworkConfig) -> str | None:
    try:
        result = subprocess.run(wrap(["true"], config), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unshare could not be run: {error}"
    if result.returncode == 0:
        return None
    output = " ".join((result.stderr or result.stdout).split())
    if result.returncode == _SETUP_FAILED:
        return f"the namespace was made but its loopback could not be shaped: {output or 'no message'}"
    return f"unshare --net failed (exit {result.returncode}): {output or 'no message'}"


_SENT = re.compile(r"qdisc tbf .*?\n\s*Sent (\d+) bytes (\d+) pkt \(dropped (\d+)", re.DOTALL)


def shaped_traffic(log_text: str) -> dict[str, int] | None:
    """Bytes, packets and drops that went through the shaped loopback, read from a run's log
    (per-node runs: through all the workers' links, both directions)."""
    from entgan.bench.cluster import link_traffic_in_log

    per_node = link_traffic_in_log(log_text)
    if per_node is not None:
        return per_node
    matches = _SENT.findall(log_text)
    if not matches:
        return None
    sent, packets, dropped = (int(value) for value in matches[-1])
    return {"bytes": sent, "packets": packets, "dropped": dropped}
