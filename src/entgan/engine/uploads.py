"""Worker-to-server exchange that every method with a server shares, kept here once:

- the handshake that tells the server each worker's task and sample count (the averaging weights);
- uploads in the engine's authenticated envelopes (`engine.updates`), received by the server in
  arrival order, with refused ones logged as run events and skipped (`ArrivingUpdates`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from entgan.engine.compression import Codec
from entgan.engine.context import SERVER_RANK, RunContext
from entgan.engine.updates import Refusal, SharedWindow, Update, UpdateLayout, UpdateReceiver


def send_hello(context: RunContext, num_samples: int) -> None:
    """Worker: tell the server which task it serves and how many samples it holds (averaging weights)."""
    hello = torch.tensor([context.task, num_samples], dtype=torch.int64, device=context.device)
    context.transport.send([hello], SERVER_RANK, "hello").wait()


def receive_hellos(context: RunContext) -> dict[int, int]:
    """Server: every worker's sample count, after checking it serves the task the config gives it."""
    counts: dict[int, int] = {}
    for rank in context.worker_ranks:
        hello = torch.zeros(2, dtype=torch.int64, device=context.device)
        context.transport.receive([hello], rank, "hello").wait()
        task, count = (int(value) for value in hello)
        if task != context.task_of(rank):
            raise RuntimeError(f"worker {rank} serves task {task}, the server's config says {context.task_of(rank)}")
        counts[rank] = count
    return counts


def update_receiver(
    context: RunContext,
    extras_size: int,
    layout_of: Callable[[int], UpdateLayout],
    values_storage: torch.Tensor | None = None,
    codecs: Sequence[Codec] = (),
    wire_storage: torch.Tensor | None = None,
    shared_window: SharedWindow | None = None,
) -> UpdateReceiver:
    """Server: the engine's checking receiver for uploads whose values follow `layout_of(rank)` and
    carry `extras_size` extra floats, bounded by `security.max_update_norm`; the values land in
    `values_storage` (decoded) and `wire_storage` (coded) where given, and workers may send them in
    `codecs`; `engine.upload_window` of them are received at once, the window's other slots in
    `shared_window` where given (`UpdateReceiver`)."""
    return UpdateReceiver(
        context.transport,
        context.session_keys,
        extras_size,
        layout_of=layout_of,
        max_norm=context.config.security.max_update_norm,
        values_storage=values_storage,
        codecs=codecs,
        wire_storage=wire_storage,
        window=context.config.engine.upload_window,
        shared_window=shared_window,
    )


class ArrivingUpdates:
    """Server: one `kind` upload from each worker, yielded in arrival order once accepted.

    Each upload is checked by `receiver` (`engine.updates`); a refused one is logged to the run's
    events and skipped, so what the method averages or back-propagates comes from accepted uploads
    only. Uploads are consumed one at a time: at most `engine.upload_window` of them held at once
    (however many workers there are), and none between rounds.
    """

    def __init__(self, context: RunContext, kind: str, receiver: UpdateReceiver) -> None:
        self.context = context
        self.kind = kind
        self.receiver = receiver
        self.refused = 0
        """Uploads refused in the round being received."""

    @classmethod
    def checked(
        cls, context: RunContext, kind: str, extras_size: int, layout_of: Callable[[int], UpdateLayout]
    ) -> ArrivingUpdates:
        """With a receiver of its own (`update_receiver`); `layout_of(rank)`: the layout of the
        values that worker `rank` uploads."""
        return cls(context, kind, update_receiver(context, extras_size, layout_of))

    def round(self, round_index: int, in_order: bool = False, ranks: Sequence[int] | None = None) -> Iterator[Update]:
        """This round's accepted uploads, as they arrive (or by rank with `in_order`), from `ranks`
        (default: every worker)."""
        self.refused = 0
        expected = list(self.context.worker_ranks if ranks is None else ranks)
        for received in self.receiver.receive_all(self.kind, expected, round_index, in_order=in_order):
            if isinstance(received, Refusal):
                self.context.log_event(received.as_event())
                self.refused += 1
                continue
            yield received
        self.receiver.release()
