"""The edge clock: how long each round would take on edge devices with their own cores and links.

A run recorded with `engine.timeline: true` leaves every rank's program as it ran (`engine.timeline`):
compute (thread CPU time, per phase), the tensor messages each transport call posted, and what
each wait waited for. The replay runs those programs again, in their recorded order, on the
devices and links of an `EdgeProfile` (`entgan.bench.profiles`), and reports the time at which the
server ended each round, counted from its training clock's start. It is FedScale's simulated
clock, computed from the run's own events instead of a cost formula, so it honours whatever each
method overlaps and waits for: the critical path through the ranks' events, not a sum.

Timing model
------------
- Compute: a stretch of a rank's main thread between two records takes its CPU time divided by
  the device's `speed`. Harness phases (evaluation, checkpoints) take no time, as on the
  training clock, unless `include_harness`.
- Matching: the n-th tensor rank A sends to B with a kind is the n-th tensor B receives from A
  with that kind (gloo's own rule: per pair and tag, in posting order).
- Rendezvous: as in gloo's TCP transport, data moves only once both sides have posted: the
  receiver's "ready" notice crosses the path first, so a tensor starts at
  max(send posted, receive posted + latency). An any-source receive takes whichever candidate's
  send notice lands first (start = max(send posted + latency, receive posted) + latency); the
  server then takes that worker's upload, so a straggler that the recorded run happened to serve
  first is served last on the edge (that upload's body, the same kind's `/body` message, is
  redirected to the worker chosen, until the next phase).
- Transmission: a tensor puts its bytes times the profile's `wire_overhead` (headers) on the
  links. One connection per ordered pair of ranks carries its tensors one after another
  (layer-by-layer streams arrive layer by layer). Concurrent transmissions share bandwidth
  max-min fairly (progressive filling) over the links they cross: the sender's uplink, the
  receiver's downlink and, where the profile has one, the shared link. A rate left out of the
  profile is unlimited; a tensor crossing no limited link transmits instantly.
- Completion: the send completes when the last byte has left (its wait may end then); the
  receive completes one path latency later (latency of the sender's link plus the receiver's).
  A wait ends when every work it names has completed; CPU spent inside it (arrival callbacks)
  runs after that.

What the model leaves out: protocol overhead beyond `wire_overhead` (gloo's preambles,
retransmissions), the notices' own transmission time, TCP's ramp-up, memory copies done by
gloo's I/O threads (not on the main thread's CPU clock), and intra-op threads or GPU kernels
(the CPU clock is the main thread's). Each rank's program keeps its recorded order: a method
that would decide differently on a faster or slower edge (e.g. a time-based schedule) is
replayed with the decisions it took on the recording machine.

Why an event loop of its own, not SimPy: the ranks' programs are straight-line (no decision
depends on the emulated time, except which upload an any-source receive takes), so a rank is a
cursor over its ops; and the links are fluid (every start or end of a transmission re-divides the
rates of all in flight), which SimPy's queueing `Resource`s do not model: it would take
interrupting every in-flight transfer process on each change. A small heap of timed callbacks plus
a max-min fair share is shorter and needs no dependency.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import defaultdict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from entgan.bench.profiles import EdgeProfile
from entgan.engine.timeline import CLOCK_START, HARNESS, RECEIVE, ROUND_END, SEND, base_kind, read_timeline

BYTES_PER_MBIT = 1e6 / 8
_EPSILON_S = 1e-12


# --- a rank's program ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Compute:
    cpu_s: float
    harness: bool = False


@dataclass(frozen=True)
class Post:
    works: tuple[int, ...]


@dataclass(frozen=True)
class Wait:
    works: tuple[int, ...]


@dataclass(frozen=True)
class Mark:
    label: str
    round: int


@dataclass(frozen=True)
class Phase:
    name: str
    round: int


Op = Compute | Post | Wait | Mark | Phase


@dataclass(frozen=True)
class Work:
    """One tensor message as one side posted it."""

    kind: str
    peer: int
    direction: int
    """`SEND` or `RECEIVE`."""
    nbytes: int
    expected: tuple[int, ...] | None = None
    """Candidate sources of an any-source receive (its `peer` is the one the recording got)."""


@dataclass
class Program:
    """One rank's ops in order, and the works its posts name."""

    rank: int
    ops: list[Op] = field(default_factory=list)
    works: dict[int, Work] = field(default_factory=dict)
    header: dict[str, Any] = field(default_factory=dict)

    def compute(self, cpu_s: float, harness: bool = False) -> Program:
        self.ops.append(Compute(cpu_s, harness))
        return self

    def post(self, kind: str, peer: int, direction: int, nbytes: int, expected: tuple[int, ...] | None = None) -> int:
        """Post one tensor message (a builder for hand-made programs); returns its id."""
        work_id = len(self.works)
        self.works[work_id] = Work(kind, peer, direction, nbytes, expected)
        self.ops.append(Post((work_id,)))
        return work_id

    def send(self, kind: str, dst: int, nbytes: int) -> int:
        return self.post(kind, dst, SEND, nbytes)

    def receive(self, kind: str, src: int, nbytes: int) -> int:
        return self.post(kind, src, RECEIVE, nbytes)

    def wait(self, *works: int) -> Program:
        self.ops.append(Wait(tuple(works)))
        return self

    def mark(self, label: str, round_index: int) -> Program:
        self.ops.append(Mark(label, round_index))
        return self

    def phase(self, name: str, round_index: int = -1) -> Program:
        self.ops.append(Phase(name, round_index))
        return self

    @property
    def bytes_sent(self) -> int:
        return sum(work.nbytes for work in self.works.values() if work.direction == SEND)

    @property
    def bytes_received(self) -> int:
        return sum(work.nbytes for work in self.works.values() if work.direction == RECEIVE)


Stretch = Literal["cpu", "wall"]


def program_from_records(
    rank: int, records: list[list[Any]], header: dict[str, Any] | None = None, stretch: Stretch = "cpu"
) -> Program:
    """A rank's program from its timeline records (`engine.timeline`).

    `stretch`: what a stretch of compute between two records costs: the thread's CPU time (the
    edge clock), or the wall time it took on the recording machine (to check the replay itself:
    replayed with unlimited links, a wall-stretched program gives back the recorded rounds, up to
    loopback transfer and wake-up delays)."""
    program = Program(rank, header=dict(header or {}))
    ops = program.ops
    previous: float | None = None  # where the last record left the stretch's clock
    in_harness = False
    column = 2 if stretch == "cpu" else 1
    for record in records:
        tag, at = record[0], float(record[column])
        if previous is not None and at > previous:
            ops.append(Compute(at - previous, in_harness))
        previous = at if previous is None else max(previous, at)
        if tag == "phase":
            in_harness = record[3] == HARNESS
            ops.append(Phase(str(record[3]), int(record[4])))
        elif tag == "mark":
            ops.append(Mark(str(record[3]), int(record[4])))
        elif tag == "post":
            first, kind, works, expected = int(record[3]), str(record[4]), record[5], record[6]
            candidates = tuple(int(source) for source in expected) if expected is not None else None
            for offset, (peer, direction, nbytes) in enumerate(works):
                program.works[first + offset] = Work(kind, int(peer), int(direction), int(nbytes), candidates)
            ops.append(Post(tuple(range(first, first + len(works)))))
        elif tag == "wait":
            ops.append(Wait(tuple(int(work) for work in record[3])))
            # What ran inside the wait after the data landed (arrival callbacks): CPU either way,
            # as the wall time inside a wait is mostly blocking.
            inside = float(record[5]) - float(record[2])
            if inside > 0:
                ops.append(Compute(inside, in_harness))
            previous = max(previous, float(record[5]) if stretch == "cpu" else float(record[4]))
        else:
            raise ValueError(f"rank {rank}: unknown timeline record '{tag}'")
    return program


def load_programs(run_dir: Path, first_round: int = 0, stretch: Stretch = "cpu") -> dict[int, Program]:
    """Every rank's program of the run's process group that started at `first_round` (0: the
    fresh start; a resumed group's files are `rank-K.from-round-NNNN.jsonl`), its compute
    stretches costed by `stretch` (`program_from_records`)."""
    folder = Path(run_dir) / "timeline"
    pattern = "rank-*.jsonl" if first_round == 0 else f"rank-*.from-round-{first_round:04d}.jsonl"
    programs = {}
    for path in sorted(folder.glob(pattern)):
        if first_round == 0 and ".from-round-" in path.name:
            continue
        header, records = read_timeline(path)
        rank = int(header["rank"])
        programs[rank] = program_from_records(rank, records, header, stretch)
    if not programs:
        raise FileNotFoundError(f"{folder}: no timelines (was the run recorded with engine.timeline: true?)")
    world_size = max(int(program.header.get("world_size", len(programs))) for program in programs.values())
    missing = sorted(set(range(world_size)) - set(programs))
    if missing:
        raise FileNotFoundError(f"{folder}: no timeline of rank(s) {missing}")
    return programs


# --- the replay's answer -------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundTime:
    round: int
    """1-based, as in metrics.jsonl."""
    end_s: float
    """Edge clock when the server ended the round, from the start of its training clock."""
    duration_s: float
    """Since the previous round's end (the first round: since the clock's start)."""


@dataclass(frozen=True)
class EdgeClock:
    rounds: list[RoundTime]
    complete: bool
    """False when some rank's program could not be replayed to its end (timelines cut short)."""
    finished_s: dict[int, float]
    """When each rank's program ended (or stalled), on the replay's own time axis."""

    def at_round(self, round_number: int) -> float | None:
        """Edge clock at the end of round `round_number`, or None if it was not replayed."""
        for entry in self.rounds:
            if entry.round == round_number:
                return entry.end_s
        return None

    @property
    def total_s(self) -> float:
        return self.rounds[-1].end_s if self.rounds else 0.0


# --- the replay ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Device:
    speed: float
    uplink: float
    """Bytes per second (inf: unlimited)."""
    downlink: float
    latency_s: float


def _devices(profile: EdgeProfile, ranks: list[int]) -> dict[int, _Device]:
    devices = {}
    for rank in ranks:
        device = profile.device(rank)
        up, down = device.uplink_mbit, device.downlink
        devices[rank] = _Device(
            speed=device.speed,
            uplink=up * BYTES_PER_MBIT if up is not None else math.inf,
            downlink=down * BYTES_PER_MBIT if down is not None else math.inf,
            latency_s=device.latency_ms / 1000,
        )
    return devices


@dataclass
class _Posted:
    rank: int
    work: int
    at: float


@dataclass
class _Message:
    src: int
    dst: int
    nbytes: int
    send: _Posted
    receive: _Posted


@dataclass
class _Flow:
    message: _Message
    remaining: float
    links: tuple[Any, ...]
    rate: float = 0.0
    finish: float = math.inf


@dataclass
class _Channel:
    queue: deque[_Message] = field(default_factory=deque)
    busy: bool = False


@dataclass
class _AnyReceive:
    rank: int
    work: int
    logged_src: int
    candidates: set[int]
    at: float
    matched: bool = False


@dataclass
class _RankState:
    program: Program
    device: _Device
    pc: int = 0
    waiting: set[int] | None = None
    finished: bool = False
    alias: dict[tuple[str, int], int] = field(default_factory=dict)
    """(base kind, peer the recording used) -> peer the replay uses, after an any-source receive of
    that kind chose another: only that upload's own messages follow it, not what the phase sends
    next (EntGAN's server sends the averaged D in the phase it receives the uploads in)."""
    any_groups: dict[str, tuple[set[int], set[int]]] = field(default_factory=dict)
    """Kind -> (candidates not yet taken in the replay, expected set of the last recorded receive)."""


class _Replay:
    def __init__(self, programs: Mapping[int, Program], profile: EdgeProfile, include_harness: bool) -> None:
        devices = _devices(profile, sorted(programs))
        self.ranks = {rank: _RankState(program, devices[rank]) for rank, program in programs.items()}
        self.shared = profile.shared_link_mbit * BYTES_PER_MBIT if profile.shared_link_mbit is not None else math.inf
        self.overhead = profile.wire_overhead
        self.include_harness = include_harness
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._sequence = itertools.count()
        self.done: set[tuple[int, int]] = set()
        self.sends: dict[tuple[int, int, str], deque[_Posted]] = defaultdict(deque)
        self.receives: dict[tuple[int, int, str], deque[_Posted]] = defaultdict(deque)
        self.any_receives: dict[tuple[int, str], _AnyReceive] = {}
        self.channels: dict[tuple[int, int], _Channel] = defaultdict(_Channel)
        self.flows: list[_Flow] = []
        self.marks: list[tuple[int, str, int, float]] = []
        self.finished_at: dict[int, float] = {}

    # time
    def at(self, time: float, action: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._heap, (time, next(self._sequence), action, args))

    def _advance_network(self, time: float) -> None:
        elapsed = time - self.now
        if elapsed > 0:
            for flow in self.flows:
                flow.remaining = max(0.0, flow.remaining - flow.rate * elapsed)
        self.now = max(self.now, time)

    def run(self) -> None:
        for rank in sorted(self.ranks):
            self.at(0.0, self._advance, rank)
        while True:
            next_event = self._heap[0][0] if self._heap else math.inf
            next_flow = min((flow.finish for flow in self.flows), default=math.inf)
            if next_event == math.inf and next_flow == math.inf:
                break
            if next_flow <= next_event:
                self._advance_network(next_flow)
                ended = [flow for flow in self.flows if flow.finish <= self.now + _EPSILON_S]
                self.flows = [flow for flow in self.flows if flow.finish > self.now + _EPSILON_S]
                self._reshare()
                for flow in ended:
                    self._transmitted(flow.message)
            else:
                time, _, action, args = heapq.heappop(self._heap)
                self._advance_network(time)
                action(*args)
        for rank, state in self.ranks.items():
            self.finished_at.setdefault(rank, self.now)

    # ranks
    def _advance(self, rank: int) -> None:
        state = self.ranks[rank]
        ops = state.program.ops
        while state.pc < len(ops):
            op = ops[state.pc]
            state.pc += 1
            if isinstance(op, Compute):
                seconds = 0.0 if op.harness and not self.include_harness else op.cpu_s / state.device.speed
                if seconds > 0:
                    self.at(self.now + seconds, self._advance, rank)
                    return
            elif isinstance(op, Post):
                for work in op.works:
                    self._post(state, work)
            elif isinstance(op, Wait):
                pending = {work for work in op.works if (rank, work) not in self.done}
                if pending:
                    state.waiting = pending
                    return
            elif isinstance(op, Mark):
                self.marks.append((rank, op.label, op.round, self.now))
            elif isinstance(op, Phase):
                state.alias.clear()
        state.finished = True
        self.finished_at[rank] = self.now

    def _complete(self, rank: int, work: int) -> None:
        self.done.add((rank, work))
        state = self.ranks[rank]
        if state.waiting is not None and work in state.waiting:
            state.waiting.discard(work)
            if not state.waiting:
                state.waiting = None
                self._advance(rank)

    # matching
    def _latency(self, a: int, b: int) -> float:
        return self.ranks[a].device.latency_s + self.ranks[b].device.latency_s

    def _post(self, state: _RankState, work_id: int) -> None:
        rank = state.program.rank
        work = state.program.works[work_id]
        posted = _Posted(rank, work_id, self.now)
        if work.expected is not None and work.direction == RECEIVE:
            self._post_any(state, work, posted)
            return
        peer = state.alias.get((base_kind(work.kind), work.peer), work.peer)
        if work.direction == SEND:
            key = (rank, peer, work.kind)
            if self.receives[key]:
                self._match(posted, self.receives[key].popleft(), work.nbytes)
                return
            self.sends[key].append(posted)
            waiting = self.any_receives.get((peer, work.kind))
            if waiting is not None and not waiting.matched and rank in waiting.candidates:
                self.at(self.now + self._latency(rank, peer), self._notice, waiting, key)
        else:
            key = (peer, rank, work.kind)
            if self.sends[key]:
                self._match(self.sends[key].popleft(), posted, work.nbytes)
                return
            self.receives[key].append(posted)

    def _post_any(self, state: _RankState, work: Work, posted: _Posted) -> None:
        assert work.expected is not None
        expected = set(work.expected)
        group = state.any_groups.get(work.kind)
        if group is None or not expected < group[1]:
            group = (set(expected), expected)  # a new round of uploads: every candidate again
        else:
            group = (group[0], expected)
        state.any_groups[work.kind] = group
        waiting = _AnyReceive(posted.rank, posted.work, work.peer, group[0], self.now)
        self.any_receives[(posted.rank, work.kind)] = waiting
        for source in sorted(group[0]):
            key = (source, posted.rank, work.kind)
            if self.sends[key]:
                notice = max(self.now, self.sends[key][0].at + self._latency(source, posted.rank))
                self.at(notice, self._notice, waiting, key)

    def _notice(self, waiting: _AnyReceive, key: tuple[int, int, str]) -> None:
        """A send's notice reached an any-source receive: the first one takes it."""
        if waiting.matched or not self.sends[key]:
            return
        source, receiver, kind = key
        waiting.matched = True
        del self.any_receives[(receiver, kind)]
        waiting.candidates.discard(source)
        state = self.ranks[receiver]
        state.alias[(base_kind(kind), waiting.logged_src)] = source
        send = self.sends[key].popleft()
        nbytes = self.ranks[source].program.works[send.work].nbytes
        # The receive is taken now; its ready notice goes back to the sender.
        self._match(send, _Posted(receiver, waiting.work, self.now), nbytes)

    def _match(self, send: _Posted, receive: _Posted, nbytes: int) -> None:
        src, dst = send.rank, receive.rank
        ready = max(send.at, receive.at + self._latency(src, dst))
        self.at(ready, self._ready, _Message(src, dst, nbytes, send, receive))

    # links
    def _ready(self, message: _Message) -> None:
        channel = self.channels[(message.src, message.dst)]
        channel.queue.append(message)
        if not channel.busy:
            self._next_on(channel)

    def _next_on(self, channel: _Channel) -> None:
        if not channel.queue:
            channel.busy = False
            return
        message = channel.queue.popleft()
        channel.busy = True
        links = tuple(
            link
            for link, capacity in (
                (("up", message.src), self.ranks[message.src].device.uplink),
                (("down", message.dst), self.ranks[message.dst].device.downlink),
                (("shared",), self.shared),
            )
            if math.isfinite(capacity)
        )
        if not links or message.nbytes == 0:
            self.at(self.now, self._transmitted, message)
            return
        self.flows.append(_Flow(message, message.nbytes * self.overhead, links))
        self._reshare()

    def _capacity(self, link: tuple[Any, ...]) -> float:
        if link[0] == "up":
            return self.ranks[link[1]].device.uplink
        if link[0] == "down":
            return self.ranks[link[1]].device.downlink
        return self.shared

    def _reshare(self) -> None:
        """Max-min fair rates over the links (progressive filling), and each flow's finish time."""
        left = {link: self._capacity(link) for flow in self.flows for link in flow.links}
        unfixed = list(self.flows)
        while unfixed:
            users: dict[Any, int] = defaultdict(int)
            for flow in unfixed:
                for link in flow.links:
                    users[link] += 1
            bottleneck = min(users, key=lambda link: left[link] / users[link])
            share = left[bottleneck] / users[bottleneck]
            fixed = [flow for flow in unfixed if bottleneck in flow.links]
            for flow in fixed:
                flow.rate = share
                for link in flow.links:
                    left[link] = max(0.0, left[link] - share)
            unfixed = [flow for flow in unfixed if bottleneck not in flow.links]
        for flow in self.flows:
            flow.finish = self.now + flow.remaining / flow.rate if flow.rate > 0 else math.inf

    def _transmitted(self, message: _Message) -> None:
        self._complete(message.send.rank, message.send.work)
        self.at(self.now + self._latency(message.src, message.dst), self._complete, message.receive.rank,
                message.receive.work)
        self._next_on(self.channels[(message.src, message.dst)])


def wire_overhead(mtu: int = 1500) -> float:
    """Bytes a shaper counts per payload byte of TCP/IPv4 (with timestamps) at `mtu`."""
    return (mtu + 14) / (mtu - 52)


def profile_for_network(network: Any, workers: int) -> EdgeProfile:
    """The edge profile that mirrors a bench's real `network` (to validate the clock against it):
    every rank at the recorded speed; a shared token bucket as one shared link; per-node links as
    the workers' own uplinks, downlinks and latencies (the server's link unshaped, as there)."""
    from entgan.bench.config import NetworkConfig
    from entgan.bench.links import PerNodeNetworkConfig
    from entgan.bench.profiles import DeviceProfile

    if isinstance(network, NetworkConfig):
        return EdgeProfile(shared_link_mbit=network.rate_mbit, wire_overhead=wire_overhead(network.mtu))
    if isinstance(network, PerNodeNetworkConfig):
        links = [network.links[index % len(network.links)] for index in range(workers)]
        devices = [
            DeviceProfile(uplink_mbit=link.uplink_mbit, downlink_mbit=link.downlink, latency_ms=link.latency_ms)
            for link in links
        ]
        return EdgeProfile(workers=devices, wire_overhead=wire_overhead())
    raise TypeError(f"not a bench network: {network!r}")


def replay(
    programs: Mapping[int, Program], profile: EdgeProfile, include_harness: bool = False, server: int = 0
) -> EdgeClock:
    """Replay the ranks' programs on `profile`'s devices and links; the server's round ends on the
    edge clock, counted from its `CLOCK_START` mark (or from the replay's start without one)."""
    run = _Replay(programs, profile, include_harness)
    run.run()
    marks = [(label, round_number, time) for rank, label, round_number, time in run.marks if rank == server]
    start = next((time for label, _, time in marks if label == CLOCK_START), 0.0)
    rounds, previous = [], start
    for label, round_number, time in marks:
        if label == ROUND_END:
            rounds.append(RoundTime(round_number, time - start, time - previous))
            previous = time
    complete = all(state.finished for state in run.ranks.values())
    return EdgeClock(rounds, complete, {rank: time - start for rank, time in run.finished_at.items()})


def replay_run(run_dir: Path, profile: EdgeProfile, include_harness: bool = False) -> EdgeClock:
    """The edge clock of a recorded run (its fresh start's process group)."""
    return replay(load_programs(run_dir), profile, include_harness)
