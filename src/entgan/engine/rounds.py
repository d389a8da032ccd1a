"""One round, as the engine drives a method's hooks (`engine.method`) on each side.

`ServerRounds` receives every upload kind from the round's participants through checking
receivers (`engine.uploads`: authenticated, finite, bounded; refusals logged and skipped), hands
the accepted ones to the method, and assembles the round's row: the method's figures, the means
of its per-upload figures, refusals and the workers' reports. `WorkerRounds` meters the worker's
traffic (`engine.reports.TrafficMeter`), sends the method's uploads in envelopes with the report
riding on the last one, and keeps them in flight until the next round's uploads.

Both drivers mark each step of the round as a phase of the rank's timeline (`engine.timeline`),
where one is recorded, so the edge clock knows every method's rounds without the method's help.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from entgan.control.overlap import settle
from entgan.engine.context import SERVER_RANK, RunContext
from entgan.engine.method import ServerRole, Upload, UploadKind, WorkerRole
from entgan.engine.reports import FigureMeans, TrafficMeter, WorkerReport, summarise_reports
from entgan.engine.timeline import Timeline
from entgan.engine.transport import Transfer
from entgan.engine.updates import SharedWindow, Update, send_update
from entgan.engine.uploads import ArrivingUpdates, update_receiver


class ServerRounds:
    """Rank 0's side of every round, around the method's `ServerRole` (after its `setup`)."""

    def __init__(self, context: RunContext, server: ServerRole) -> None:
        self.context = context
        self.server = server
        kinds = list(server.upload_kinds)
        shared_window = SharedWindow(context.device)  # the kinds are received one after another
        self.arrivals = [
            ArrivingUpdates(
                context,
                kind.kind,
                update_receiver(
                    context,
                    len(kind.figures) + (WorkerReport.SIZE if position == len(kinds) - 1 else 0),
                    kind.layout_of,
                    kind.values_storage,
                    kind.codecs,
                    kind.wire_storage,
                    shared_window,
                ),
            )
            for position, kind in enumerate(kinds)
        ]

    def run(self, round_index: int, before_send_down: Callable[[], None] | None = None) -> dict[str, float]:
        """One round on the server; returns its row (before the engine's time and memory fields).

        `before_send_down` runs once the global models are final and before they go down: the
        engine evaluates there, so that workers waiting for the next round's models (or fakes)
        do not train on while the server evaluates."""
        server = self.server
        phase = phase_marker(self.context.transport.timeline)
        phase("open_round", round_index)
        participants = server.participants(round_index)
        server.open_round(round_index, participants)
        reports: dict[int, WorkerReport] = {}
        figures: dict[str, float] = {}
        refused = 0
        kinds = list(server.upload_kinds)
        for position, (kind, arrivals) in enumerate(zip(kinds, self.arrivals, strict=True)):
            phase(f"aggregate/{kind.kind}", round_index)
            means = FigureMeans(len(kind.figures))
            carries_report = position == len(kinds) - 1
            accepted = _accepted(
                arrivals.round(round_index, in_order=kind.in_order, ranks=participants), kind, means, reports, carries_report
            )
            server.aggregate(round_index, kind.kind, accepted)
            if next(accepted, None) is not None:
                raise RuntimeError(f"{type(server).__name__}.aggregate left '{kind.kind}' uploads unconsumed")
            refused += arrivals.refused
            figures.update(zip(kind.figures, means.means(), strict=True))
        phase("train_global", round_index)
        row = server.train_global(round_index)
        if before_send_down is not None:
            before_send_down()
        phase("send_down", round_index)
        server.send_down(round_index, server.participants(round_index + 1))
        if not kinds:
            return row
        return {**row, **figures, "refused_updates": float(refused), **summarise_reports(reports)}


def phase_marker(timeline: Timeline | None) -> Callable[[str, int], None]:
    """`timeline.phase`, or a no-op when no timeline is recorded."""
    return timeline.phase if timeline is not None else _no_phase


def _no_phase(name: str, round_index: int) -> None:
    pass


def _accepted(
    updates: Iterator[Update],
    kind: UploadKind,
    means: FigureMeans,
    reports: dict[int, WorkerReport],
    carries_report: bool,
) -> Iterator[Update]:
    """The accepted uploads, as the method sees them, with their figures and reports taken out."""
    width = len(kind.figures)
    for update in updates:
        own, report = update.extras.split([width, update.extras.numel() - width])
        if width:
            means.add(*own.tolist())
        if carries_report:
            reports[update.rank] = WorkerReport.from_tensor(report)
        yield update


class WorkerRounds:
    """A worker's side of every round, around the method's `WorkerRole` (after its `setup`)."""

    def __init__(self, context: RunContext, worker: WorkerRole) -> None:
        self.context = context
        self.worker = worker
        self.meter = TrafficMeter(context.transport.counters)
        self.uploads_in_flight: list[Transfer] = []

    def run(self, round_index: int) -> None:
        worker = self.worker
        phase = phase_marker(self.context.transport.timeline)
        if worker.participates(round_index):
            phase("local_round", round_index)
            figures = worker.local_round(round_index)
            phase("uploads", round_index)
            settle(*self.uploads_in_flight)  # their buffers may be reused by the uploads below
            self.uploads_in_flight = []
            report = self.meter.report(figures.d_loss, figures.real_realness, figures.fake_realness, figures.epsilon)
            self.meter.restart()  # the uploads below are booked in the next report
            self.send(list(worker.uploads(round_index)), report, round_index)
        if worker.participates(round_index + 1):
            phase("expect_down", round_index)
            worker.expect_down(round_index)

    def send(self, uploads: Sequence[Upload], report: WorkerReport, round_index: int) -> None:
        """Each upload in its checked envelope, the report riding on the last one."""
        key = self.context.session_keys[SERVER_RANK]
        for position, upload in enumerate(uploads):
            extras = torch.tensor(list(upload.figures), dtype=torch.float32)
            if position == len(uploads) - 1:
                extras = torch.cat([extras, report.to_tensor()])
            transfer = send_update(
                self.context.transport,
                key,
                upload.values,
                extras.to(self.context.device),
                upload.layout,
                round_index,
                SERVER_RANK,
                upload.kind,
                upload.codec,
            )
            if upload.wait_at_once:
                transfer.wait()
            else:
                self.uploads_in_flight.append(transfer)

    def finish(self) -> None:
        phase_marker(self.context.transport.timeline)("finish", -1)
        self.worker.finish()
        settle(*self.uploads_in_flight)
        self.uploads_in_flight = []
