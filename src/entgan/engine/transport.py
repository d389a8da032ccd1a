"""The one transport every algorithm uses: point-to-point tensors with byte and wait accounting.

Algorithms never touch sockets or `torch.distributed` directly for data exchange; they call this
layer, so that bytes-on-the-wire and time-waiting-on-communication figures are counted the same
way for every method and can be compared side by side.

Everything is asynchronous: a send or receive returns a `Transfer` whose `wait()` (or
`wait_tensor(i)`, for layer-by-layer use) blocks and books the blocked time as communication wait.
Message kinds map to gloo tags, so two kinds of message between the same pair never cross.
"""

from __future__ import annotations

import datetime
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist

# Stable tags per message kind (gloo honours tags; NCCL ignores them, and our send/receive order
# between any pair of ranks is symmetric, so it needs none).
MESSAGE_TAGS: dict[str, int] = {
    "hello": 1,
    "generator": 2,
    "discriminator": 3,
    "discriminator-update": 4,
    "gossip": 5,
    "feedback": 6,
    "fake-batch": 7,
    "control": 8,
    "auth": 9,
}

BODY_SUFFIX = "/body"
"""`<kind>/body` is the body of an enveloped `<kind>` message (see `engine.updates`): its own tag,
so an any-source receive of the next header can never match a body still in flight."""
_BODY_TAG_OFFSET = 64


def base_kind(kind: str) -> str:
    """The kind bytes are booked under: an envelope's header and body count as one message kind."""
    return kind.removesuffix(BODY_SUFFIX)


def _on_wire(tensor: torch.Tensor, wire_dtype: torch.dtype | None) -> torch.Tensor:
    """`tensor` as it travels: floating-point tensors in `wire_dtype` (a copy), the rest as is."""
    if wire_dtype is None or not tensor.is_floating_point() or tensor.dtype == wire_dtype:
        return tensor
    return tensor.to(wire_dtype)


def _wait(work: dist.Work, timeout: datetime.timedelta | None) -> None:
    if timeout is None:
        work.wait()
    else:
        work.wait(timeout)


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@dataclass
class TrafficCounters:
    """Bytes sent/received per message kind, and seconds spent blocked on communication."""

    sent: Counter[str] = field(default_factory=Counter)
    received: Counter[str] = field(default_factory=Counter)
    wait_seconds: float = 0.0

    @property
    def bytes_sent(self) -> int:
        return sum(self.sent.values())

    @property
    def bytes_received(self) -> int:
        return sum(self.received.values())

    def state_dict(self) -> dict[str, object]:
        return {"sent": dict(self.sent), "received": dict(self.received), "wait_seconds": self.wait_seconds}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.sent = Counter(state["sent"])  # type: ignore[arg-type]
        self.received = Counter(state["received"])  # type: ignore[arg-type]
        self.wait_seconds = float(state["wait_seconds"])  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = {
            "bytes_sent": float(self.bytes_sent),
            "bytes_received": float(self.bytes_received),
            "comm_wait_s": self.wait_seconds,
        }
        out.update({f"bytes_sent/{kind}": float(n) for kind, n in sorted(self.sent.items())})
        out.update({f"bytes_received/{kind}": float(n) for kind, n in sorted(self.received.items())})
        return out


class Transfer:
    """Handles of one logical message, possibly made of several tensors (one per layer).

    `wait_tensor(i)` blocks only until tensor i has arrived, which is what lets a worker start
    computing with the first layers of G while the last ones are still in flight.
    """

    def __init__(
        self,
        works: Sequence[dist.Work | None],
        counters: TrafficCounters,
        on_arrival: Sequence[Callable[[], None] | None] | None = None,
        timeout: datetime.timedelta | None = None,
    ) -> None:
        self._works = list(works)
        self._counters = counters
        self._timeout = timeout
        self._on_arrival = list(on_arrival) if on_arrival is not None else [None] * len(self._works)

    def __len__(self) -> int:
        return len(self._works)

    def wait_tensor(self, index: int) -> None:
        work = self._works[index]
        if work is None:
            return
        started = time.perf_counter()
        _wait(work, self._timeout)
        self._counters.wait_seconds += time.perf_counter() - started
        self._works[index] = None
        arrived = self._on_arrival[index]
        if arrived is not None:  # e.g. widen a half-precision wire copy into the model's tensor
            arrived()

    def wait(self) -> None:
        for index in range(len(self._works)):
            self.wait_tensor(index)

    @classmethod
    def combine(cls, *transfers: Transfer) -> Transfer:
        """One handle for several transfers of the same rank (e.g. an envelope's header and body)."""
        if not transfers:
            raise ValueError("nothing to combine")
        return cls(
            [work for transfer in transfers for work in transfer._works],
            transfers[0]._counters,
            [callback for transfer in transfers for callback in transfer._on_arrival],
            transfers[0]._timeout,
        )

    @property
    def done(self) -> bool:
        return all(work is None for work in self._works)


class Transport:
    """Point-to-point exchange of tensor lists between ranks, counted per message kind."""

    def __init__(self, rank: int, world_size: int, device: torch.device) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.counters = TrafficCounters()
        self._can_receive_from_any = dist.get_backend() == "gloo"
        self.timeout: datetime.timedelta | None = None
        """How long any one wait may block before it raises (None: the process group's timeout).
        Set after start-up to the per-round timeout: gloo applies a group's timeout changed after
        creation to collectives but not to point-to-point waits, so each wait carries its own."""

    def _transfer(
        self, works: Sequence[dist.Work | None], on_arrival: Sequence[Callable[[], None] | None] | None = None
    ) -> Transfer:
        return Transfer(works, self.counters, on_arrival, self.timeout)

    def _tag(self, kind: str) -> int:
        base, body, _ = kind.partition(BODY_SUFFIX)
        try:
            return MESSAGE_TAGS[base] + (_BODY_TAG_OFFSET if body else 0)
        except KeyError:
            raise ValueError(f"unknown message kind '{kind}'; known: {sorted(MESSAGE_TAGS)}") from None

    def send(self, tensors: Iterable[torch.Tensor], dst: int, kind: str) -> Transfer:
        """Send tensors in order (asynchronously); the caller must not modify them before wait()."""
        tag = self._tag(kind)
        works = []
        for tensor in tensors:
            works.append(dist.isend(tensor.detach().contiguous(), dst=dst, tag=tag))
            self.counters.sent[base_kind(kind)] += tensor_bytes(tensor)
        return self._transfer(works)

    def receive(
        self, buffers: Iterable[torch.Tensor], src: int, kind: str, wire_dtype: torch.dtype | None = None
    ) -> Transfer:
        """Receive into the given buffers in order (asynchronously), e.g. a model's own tensors.

        With `wire_dtype`, floating-point tensors arrive in that precision into a wire copy and are
        widened into the buffer as each one is waited for (so layer-by-layer use still works)."""
        tag = self._tag(kind)
        works, on_arrival = [], []
        for buffer in buffers:
            if not buffer.is_contiguous():
                raise ValueError("receive buffers must be contiguous")
            if wire_dtype is not None and buffer.is_floating_point() and buffer.dtype != wire_dtype:
                wire = torch.empty_like(buffer, dtype=wire_dtype)
                on_arrival.append(partial(buffer.copy_, wire))
            else:
                wire = buffer
                on_arrival.append(None)
            works.append(dist.irecv(wire, src=src, tag=tag))
            self.counters.received[base_kind(kind)] += tensor_bytes(wire)
        return self._transfer(works, on_arrival)

    def send_to_many(
        self, tensors: Sequence[torch.Tensor], dsts: Sequence[int], kind: str, wire_dtype: torch.dtype | None = None
    ) -> Transfer:
        """Send the same tensors to several ranks, layer-major: every rank gets layer 0 first.

        With `wire_dtype` (e.g. float16), floating-point tensors travel in that precision; the
        receiver must use `receive(..., wire_dtype=)` with the same dtype."""
        tag = self._tag(kind)
        works = []
        for tensor in tensors:
            payload = _on_wire(tensor.detach(), wire_dtype).contiguous()
            for dst in dsts:
                works.append(dist.isend(payload, dst=dst, tag=tag))
                self.counters.sent[base_kind(kind)] += tensor_bytes(payload)
        return self._transfer(works)

    def receive_from_any(self, buffer: torch.Tensor, kind: str, expected: Sequence[int]) -> int:
        """Receive one message into `buffer` from whichever of `expected` sends first; return its rank.

        On gloo this is a true any-source receive, so updates are consumed in arrival order. Other
        backends have no any-source receive, so the first still-expected rank is read.
        """
        started = time.perf_counter()
        if self._can_receive_from_any:
            work = dist.irecv(buffer, src=None, tag=self._tag(kind))
            _wait(work, self.timeout)
            source = work._source_rank()
            if source not in expected:
                raise RuntimeError(f"rank {self.rank} got an unexpected '{kind}' message from rank {source}")
        else:
            source = expected[0]
            _wait(dist.irecv(buffer, src=source, tag=self._tag(kind)), self.timeout)
        self.counters.wait_seconds += time.perf_counter() - started
        self.counters.received[base_kind(kind)] += tensor_bytes(buffer)
        return int(source)

    def exchange(
        self, outgoing: torch.Tensor, send_to: int, incoming: torch.Tensor, receive_from: int, kind: str
    ) -> Transfer:
        """Send one tensor and receive one, posted together (safe on NCCL for rings and pairs)."""
        tag = self._tag(kind)
        operations = [
            dist.P2POp(dist.isend, outgoing.contiguous(), send_to, tag=tag),
            dist.P2POp(dist.irecv, incoming, receive_from, tag=tag),
        ]
        works = dist.batch_isend_irecv(operations)
        self.counters.sent[base_kind(kind)] += tensor_bytes(outgoing)
        self.counters.received[base_kind(kind)] += tensor_bytes(incoming)
        return self._transfer(works)

    def exchange_many(
        self,
        outgoing: Sequence[torch.Tensor],
        send_to: int,
        incoming: Sequence[torch.Tensor],
        receive_from: int,
        kind: str,
    ) -> Transfer:
        """`exchange` for messages of several tensors (e.g. a codec's payload: values + indices),
        all posted together. Each tensor is counted at its own size, so an encoded message is
        booked at its compressed size on the wire."""
        tag = self._tag(kind)
        operations = [dist.P2POp(dist.isend, tensor.detach().contiguous(), send_to, tag=tag) for tensor in outgoing]
        for buffer in incoming:
            if not buffer.is_contiguous():
                raise ValueError("receive buffers must be contiguous")
            operations.append(dist.P2POp(dist.irecv, buffer, receive_from, tag=tag))
        works = dist.batch_isend_irecv(operations) if operations else []
        self.counters.sent[base_kind(kind)] += sum(tensor_bytes(tensor) for tensor in outgoing)
        self.counters.received[base_kind(kind)] += sum(tensor_bytes(buffer) for buffer in incoming)
        return self._transfer(works)
