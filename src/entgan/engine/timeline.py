"""A rank's timeline: what its main thread computed, posted and waited for, in order.

The edge clock (`entgan.bench.edge_clock`) replays the ranks' timelines on emulated edge devices
and links. For that it needs each rank's program as it ran, not just totals: which transfers a
rank posted after which compute, and which compute could not start before which transfer had
landed. The transport (`engine.transport`) and the round drivers (`engine.rounds`, `engine.roles`)
append to the timeline, so every method gets one without a line of its own.

Records, in the order they happened, each stamped with the wall clock (`time.perf_counter`) and
the main thread's CPU time (`time.thread_time`) when it was appended:

    ("phase", wall, cpu, name, round)          the compute from here on belongs to phase `name`
    ("mark", wall, cpu, label, round)          a point the replay reports (`ROUND_END`, `CLOCK_START`)
    ("post", wall, cpu, first, kind, works, expected)
                                               one transport call posted len(works) tensor
                                               messages, numbered first, first+1, ...; each work is
                                               (peer, SEND or RECEIVE, bytes); `expected` lists the
                                               candidate sources of an any-source receive, else None
    ("wait", wall, cpu, ids, wall_end, cpu_end)
                                               the thread blocked until the works `ids` completed;
                                               CPU spent inside (arrival callbacks) ends at cpu_end

The compute between two records is the difference of their CPU stamps: the rank's own work,
whatever other processes did to its wall clock on a shared machine. Appending is one tuple per
transport call or wait (one per tensor only in the works list); nothing is written until `flush`,
which appends the new records to `RUN_DIR/timeline/rank-K.jsonl` (at checkpoints, at the end, and
at a phase change once `FLUSH_EVERY` records are held), its own writing booked as harness.

A rank's CPU time is its main thread's: with `engine.threads_per_process` above 1 the intra-op
threads' work is not in it, and on a GPU the kernels run after the thread has moved on; the edge
clock is meant for single-threaded CPU ranks, the way the engine runs them by default.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

SEND = 1
RECEIVE = -1

BODY_SUFFIX = "/body"
"""`<kind>/body` is the body of an enveloped `<kind>` message (see `engine.updates`): its own tag,
so an any-source receive of the next header can never match a body still in flight."""


def base_kind(kind: str) -> str:
    """The kind an envelope's header and body share: bytes are booked under it, and the edge clock
    redirects a body to the worker whose header an any-source receive took."""
    return kind.removesuffix(BODY_SUFFIX)


HARNESS = "harness"
"""Phase of evaluation, checkpoints and the timeline's own writing: outside the training clock,
and outside the edge clock unless asked for."""
ROUND_END = "round-end"
"""Server mark: round `round` (1-based) has ended (its row is complete, before evaluation)."""
CLOCK_START = "clock-start"
"""Server mark: the training clock starts (after the method's setup)."""

FORMAT = 1
FLUSH_EVERY = 20_000
"""Records held in memory before a phase change writes them out (the writing booked as harness)."""


class Timeline:
    """One rank's append-only timeline (see the module docstring for the records)."""

    def __init__(self, rank: int, world_size: int, path: Path, first_round: int = 0, **header: Any) -> None:
        """`header`: more facts for the file's first line (e.g. the bytes moved before the timeline began)."""
        self.rank = rank
        self.path = Path(path)
        self.records: list[tuple[Any, ...]] = []
        """Records not yet written."""
        self._next_work = 0
        self._started_file = False
        self._phase: tuple[str, int] = ("launch", -1)
        self._header = {"timeline": FORMAT, "rank": rank, "world_size": world_size, "first_round": first_round, **header}
        self.phase("launch", -1)

    def phase(self, name: str, round_index: int) -> None:
        if len(self.records) >= FLUSH_EVERY and name != HARNESS:  # e.g. a long run without checkpoints
            self.flush()
        self._phase = (name, round_index)
        self.records.append(("phase", time.perf_counter(), time.thread_time(), name, round_index))

    def mark(self, label: str, round_index: int) -> None:
        self.records.append(("mark", time.perf_counter(), time.thread_time(), label, round_index))

    def post(self, kind: str, works: list[tuple[int, int, int]], expected: list[int] | None = None,
             stamp: tuple[float, float] | None = None) -> list[int]:
        """Record one transport call's tensor messages; returns their ids, in order."""
        first = self._next_work
        self._next_work += len(works)
        wall, cpu = stamp if stamp is not None else (time.perf_counter(), time.thread_time())
        self.records.append(("post", wall, cpu, first, kind, works, expected))
        return list(range(first, first + len(works)))

    def waited(self, ids: list[int], wall: float, cpu: float) -> None:
        """The thread blocked from (wall, cpu) until the works `ids` had completed (now)."""
        self.records.append(("wait", wall, cpu, ids, time.perf_counter(), time.thread_time()))

    def flush(self) -> None:
        """Append the records since the last flush to the rank's file (the header first) and drop
        them from memory. The writing itself is booked as harness, then the phase goes on."""
        resumed = self._phase
        if resumed[0] != HARNESS:
            self.records.append(("phase", time.perf_counter(), time.thread_time(), HARNESS, resumed[1]))
        lines = [] if self._started_file else [json.dumps(self._header)]
        lines.extend(json.dumps(record) for record in self.records)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a" if self._started_file else "w") as handle:
            handle.write("".join(line + "\n" for line in lines))
        self._started_file = True
        self.records = []
        if resumed[0] != HARNESS:
            self.records.append(("phase", time.perf_counter(), time.thread_time(), *resumed))


def stamp() -> tuple[float, float]:
    """Wall clock and thread CPU time now (as a post or a wait records them)."""
    return time.perf_counter(), time.thread_time()


def timeline_path(run_dir: Path, rank: int, first_round: int) -> Path:
    """`timeline/rank-K.jsonl` for a fresh start; a resumed process writes its own file,
    `timeline/rank-K.from-round-NNNN.jsonl`, so that every file is one process's program."""
    folder = Path(run_dir) / "timeline"
    if first_round == 0:
        return folder / f"rank-{rank}.jsonl"
    return folder / f"rank-{rank}.from-round-{first_round:04d}.jsonl"


def read_timeline(path: Path) -> tuple[dict[str, Any], list[list[Any]]]:
    """The header and records of one timeline file (a torn last line, from a crash, is dropped)."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: empty timeline")
    header = json.loads(lines[0])
    if header.get("timeline") != FORMAT:
        raise ValueError(f"{path}: not a timeline of format {FORMAT}")
    records = []
    for number, line in enumerate(lines[1:]):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) - 2:
                break
            raise
    return header, records
