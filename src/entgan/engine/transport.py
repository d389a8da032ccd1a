"""The one transport every algorithm uses: point-to-point tensors with byte and wait accounting.

Algorithms never touch sockets or `torch.distributed` directly for data exchange; they call this
layer, so that bytes-on-the-wire and time-waiting-on-communication figures are counted the same
way for every method and can be compared side by side.

Everything is asynchronous: a send or receive returns a `Transfer` whose `wait()` (or
`wait_tensor(i)`, for layer-by-layer use) blocks and books the blocked time as communication wait.
Message kinds map to gloo tags, so two kinds of message between the same pair never cross.

With a `Timeline` attached (`engine.timeline`), every call also records the tensor messages it
posted and every wait what it waited for, for the edge clock's replay (`entgan.bench.edge_clock`).
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

from entgan.engine.compression import Codec
from entgan.engine.timeline import BODY_SUFFIX, RECEIVE, SEND, Timeline, base_kind, stamp

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

_BODY_TAG_OFFSET = 64


def _encoded(tensor: torch.Tensor, codec: Codec | None) -> torch.Tensor:
    """`tensor` as it travels: a floating-point tensor as `codec`'s packed payload (a new tensor),
    anything else (integer buffers, or no codec) as is."""
    if codec is None or not tensor.is_floating_point():
        return tensor
    return codec.encode_packed(tensor.reshape(-1))


class WireBuffers:
    """A sender's encoded copies of a model's tensors, allocated once and re-encoded in place for
    each send: a server that sends its models every round allocates nothing per round (fresh
    encodings freed at uneven times fragment the C heap, which shows as resident memory)."""

    def __init__(self, tensors: Sequence[torch.Tensor], codec: Codec) -> None:
        self.codec = codec
        sizes = [codec.payload_bytes(t.numel()) if t.is_floating_point() else 0 for t in tensors]
        # One block, each tensor's payload a slice of it (at 4-byte offsets, so scales stay aligned).
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + -(-size // 4) * 4)
        device = tensors[0].device if tensors else None
        self.storage = torch.empty(offsets[-1], dtype=torch.uint8, device=device)
        """Every payload's bytes: between sends (once the last has completed) the owner may lend it
        out, e.g. to receive into."""
        self.buffers = [
            self.storage[start : start + size] if t.is_floating_point() else None
            for t, start, size in zip(tensors, offsets, sizes)
        ]

    def encoded(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """`tensors` as they travel: the floating-point ones encoded into their buffers (which
        must not be re-encoded before the previous send using them has completed)."""
        payloads = []
        for tensor, buffer in zip(tensors, self.buffers, strict=True):
            if buffer is None:
                payloads.append(tensor.detach())
            else:
                self.codec.encode_packed_into(tensor.detach().reshape(-1), buffer)
                payloads.append(buffer)
        return payloads


def _decode_into(buffer: torch.Tensor, wire: torch.Tensor, codec: Codec) -> None:
    codec.decode_packed_into(wire, buffer.view(-1))


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
        timeline: Timeline | None = None,
        ids: Sequence[int | tuple[int, ...]] | None = None,
    ) -> None:
        self._works = list(works)
        self._counters = counters
        self._timeout = timeout
        self._on_arrival = list(on_arrival) if on_arrival is not None else [None] * len(self._works)
        self._timeline = timeline
        self._ids = list(ids) if ids is not None else []
        """The timeline's ids of each work's messages (several where a backend coalesced them)."""

    def __len__(self) -> int:
        return len(self._works)

    def wait_tensor(self, index: int) -> None:
        if self._works[index] is not None:
            self._wait_for([index])

    def wait(self) -> None:
        pending = [index for index, work in enumerate(self._works) if work is not None]
        if pending:
            self._wait_for(pending)

    def _wait_for(self, indices: list[int]) -> None:
        """Block until the works at `indices` (all still pending) complete: booked as one wait."""
        began = stamp() if self._timeline is not None else None
        for index in indices:
            work = self._works[index]
            assert work is not None
            started = time.perf_counter()
            _wait(work, self._timeout)
            self._counters.wait_seconds += time.perf_counter() - started
            self._works[index] = None
            arrived = self._on_arrival[index]
            if arrived is not None:  # e.g. decode a compressed wire copy into the model's tensor
                arrived()
        if self._timeline is not None and began is not None:
            ids: list[int] = []
            for index in indices:
                entry = self._ids[index]
                if isinstance(entry, tuple):
                    ids.extend(entry)
                else:
                    ids.append(entry)
            self._timeline.waited(ids, *began)

    @classmethod
    def combine(cls, *transfers: Transfer) -> Transfer:
        """One handle for several transfers of the same rank (e.g. an envelope's header and body)."""
        if not transfers:
            raise ValueError("nothing to combine")
        recorded = all(t._timeline is not None and len(t._ids) == len(t._works) for t in transfers)
        return cls(
            [work for transfer in transfers for work in transfer._works],
            transfers[0]._counters,
            [callback for transfer in transfers for callback in transfer._on_arrival],
            transfers[0]._timeout,
            transfers[0]._timeline if recorded else None,
            [entry for transfer in transfers for entry in transfer._ids] if recorded else None,
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
        Set to the per-round timeout when the rounds start (`engine.roles.start_round_timeouts`):
        gloo applies a group's timeout changed after creation to collectives but not to
        point-to-point waits, so each wait carries its own."""
        self.timeline: Timeline | None = None
        """Where posts and waits are recorded for the edge clock (None: not recorded)."""

    def _transfer(
        self,
        works: Sequence[dist.Work | None],
        on_arrival: Sequence[Callable[[], None] | None] | None = None,
        kind: str = "",
        messages: list[tuple[int, int, int]] | None = None,
    ) -> Transfer:
        """The handle of `works`; with a timeline, `messages` (peer, SEND/RECEIVE, bytes), one per
        work in order, are recorded as posted now."""
        if self.timeline is None or messages is None:
            return Transfer(works, self.counters, on_arrival, self.timeout)
        ids: list[int | tuple[int, ...]] = list(self.timeline.post(kind, messages))
        if len(ids) != len(works):  # a backend that coalesces a batch into one work (NCCL)
            ids = [tuple(ids)] * len(works)
        return Transfer(works, self.counters, on_arrival, self.timeout, self.timeline, ids)

    def _tag(self, kind: str) -> int:
        base, body, _ = kind.partition(BODY_SUFFIX)
        try:
            return MESSAGE_TAGS[base] + (_BODY_TAG_OFFSET if body else 0)
        except KeyError:
            raise ValueError(f"unknown message kind '{kind}'; known: {sorted(MESSAGE_TAGS)}") from None

    def send(self, tensors: Iterable[torch.Tensor], dst: int, kind: str) -> Transfer:
        """Send tensors in order (asynchronously); the caller must not modify them before wait()."""
        tag = self._tag(kind)
        works, messages = [], []
        for tensor in tensors:
            works.append(dist.isend(tensor.detach().contiguous(), dst=dst, tag=tag))
            size = tensor_bytes(tensor)
            self.counters.sent[base_kind(kind)] += size
            messages.append((dst, SEND, size))
        return self._transfer(works, kind=kind, messages=messages)

    def receive(
        self, buffers: Iterable[torch.Tensor], src: int, kind: str, codec: Codec | None = None
    ) -> Transfer:
        """Receive into the given buffers in order (asynchronously), e.g. a model's own tensors.

        With `codec`, floating-point tensors arrive as its packed payloads into a wire buffer and
        are decoded into their buffer as each one is waited for (so layer-by-layer use still works);
        the sender must use the same codec."""
        tag = self._tag(kind)
        works, on_arrival, messages = [], [], []
        for buffer in buffers:
            if not buffer.is_contiguous():
                raise ValueError("receive buffers must be contiguous")
            if codec is not None and buffer.is_floating_point():
                wire = torch.empty(codec.payload_bytes(buffer.numel()), dtype=torch.uint8, device=buffer.device)
                on_arrival.append(partial(_decode_into, buffer, wire, codec))
            else:
                wire = buffer
                on_arrival.append(None)
            works.append(dist.irecv(wire, src=src, tag=tag))
            size = tensor_bytes(wire)
            self.counters.received[base_kind(kind)] += size
            messages.append((src, RECEIVE, size))
        return self._transfer(works, on_arrival, kind, messages)

    def send_to_many(
        self,
        tensors: Sequence[torch.Tensor],
        dsts: Sequence[int],
        kind: str,
        codec: Codec | None = None,
        wire: WireBuffers | None = None,
    ) -> Transfer:
        """Send the same tensors to several ranks, layer-major: every rank gets layer 0 first.

        With `codec` (e.g. int8), floating-point tensors travel as its packed payloads, each
        encoded once for every destination (into `wire`'s buffers where given, else into new
        tensors); the receiver must use `receive(..., codec=)` with the same codec. Bytes are
        counted as they travel."""
        if wire is not None and wire.codec is not codec:
            raise ValueError(f"wire buffers encode with {wire.codec.name}, the send asks for {getattr(codec, 'name', None)}")
        tag = self._tag(kind)
        works, messages = [], []
        payloads = wire.encoded(tensors) if wire is not None else [_encoded(t.detach(), codec) for t in tensors]
        for payload in payloads:
            payload = payload.contiguous()
            size = tensor_bytes(payload)
            for dst in dsts:
                works.append(dist.isend(payload, dst=dst, tag=tag))
                self.counters.sent[base_kind(kind)] += size
                messages.append((dst, SEND, size))
        return self._transfer(works, kind=kind, messages=messages)

    def receive_from_any(self, buffer: torch.Tensor, kind: str, expected: Sequence[int]) -> int:
        """Receive one message into `buffer` from whichever of `expected` sends first; return its rank.

        On gloo this is a true any-source receive, so updates are consumed in arrival order. Other
        backends have no any-source receive, so the first still-expected rank is read.
        """
        began = stamp() if self.timeline is not None else None
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
        size = tensor_bytes(buffer)
        self.counters.received[base_kind(kind)] += size
        if self.timeline is not None and began is not None:  # posted and waited for in one call
            candidates = list(expected) if self._can_receive_from_any else None
            ids = self.timeline.post(kind, [(int(source), RECEIVE, size)], candidates, stamp=began)
            self.timeline.waited(ids, *began)
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
        messages = [(send_to, SEND, tensor_bytes(outgoing)), (receive_from, RECEIVE, tensor_bytes(incoming))]
        return self._transfer(works, kind=kind, messages=messages)

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
        messages = [(send_to, SEND, tensor_bytes(tensor)) for tensor in outgoing]
        messages += [(receive_from, RECEIVE, tensor_bytes(buffer)) for buffer in incoming]
        return self._transfer(works, kind=kind, messages=messages)
