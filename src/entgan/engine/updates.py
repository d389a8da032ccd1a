"""Updates a worker uploads, in an envelope the server checks before anything is averaged.

An update is a flat float32 vector of model tensors (e.g. a discriminator's trunk and one head)
plus a few float "extras" (the worker's round report). It travels as two messages:

    header  int64[7]  magic, version, round, sender rank, layout fingerprint, number of values,
                      codec of the values (`engine.compression.CODEC_NAMES`: 0 float32 as is,
                      1/2 float16/bfloat16, 3 int8, 4 top-k)
    body    float32[extras], values (float32, or the codec's packed bytes), uint8[32] HMAC over
            header + extras + values as sent

The header comes first on the kind's own tag, so the server can receive from whichever worker is
ready (any source) and then size the body buffer from the header: a wrongly shaped update is
received whole and refused, instead of breaking the receive. The layout fingerprint hashes the
tensors' names, shapes and dtypes, so an update built from another model is refused even when
its length happens to match. Refusals name the worker, the round and the reason; they never stop
the run and never touch the model.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from entgan.engine.compression import CODEC_NAMES, BFloat16, Codec, Float16, NoCompression, codec_id, codec_named
from entgan.engine.security import MAC_BYTES, mac_matches, message_mac
from entgan.engine.transport import BODY_SUFFIX, Transfer, Transport

MAGIC = 0x454E5447  # "ENTG"
VERSION = 1
HEADER_SIZE = 7
CAST_CODECS: tuple[Codec, ...] = (NoCompression(), Float16(), BFloat16())
"""The codecs every receiver knows; codecs with parameters (int8, top-k) are the method's to add."""
MAX_VALUES = 1 << 28
"""Largest body the server agrees to receive at all (1 GiB of float32); beyond it, the sender is
not speaking this protocol and the run stops with a clear error instead of allocating."""


class ProtocolError(RuntimeError):
    """A peer sent something that is not an update envelope; the exchange cannot go on."""


@dataclass(frozen=True)
class UpdateLayout:
    """Names, shapes and dtypes of the tensors an update is made of, and their fingerprint."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @classmethod
    def of(cls, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> UpdateLayout:
        return cls(
            names=tuple(name for name, _ in named_tensors),
            shapes=tuple(tuple(tensor.shape) for _, tensor in named_tensors),
            dtypes=tuple(str(tensor.dtype) for _, tensor in named_tensors),
        )

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)

    @property
    def fingerprint(self) -> int:
        text = "\n".join(f"{n}:{list(s)}:{d}" for n, s, d in zip(self.names, self.shapes, self.dtypes, strict=True))
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1  # fits int64


@dataclass(frozen=True)
class Update:
    """An accepted update: who sent it, its values and its extras."""

    rank: int
    values: torch.Tensor
    extras: torch.Tensor


@dataclass(frozen=True)
class Refusal:
    """An update that was received whole and refused."""

    rank: int
    round_index: int
    reason: str

    def as_event(self) -> dict[str, object]:
        return {"event": "update_refused", "rank": self.rank, "round": self.round_index + 1, "reason": self.reason}


def send_update(
    transport: Transport,
    key: bytes,
    values: torch.Tensor,
    extras: torch.Tensor,
    layout: UpdateLayout,
    round_index: int,
    dst: int,
    kind: str,
    codec: Codec | None = None,
) -> Transfer:
    """Send one update (asynchronously); `values` and `extras` must not change before wait().

    With `codec`, the values travel as its packed payload (e.g. float16 halves the upload, top-k of
    a change sends a fraction of it); the receiver must know the codec (`UpdateReceiver`)."""
    codec = codec or NoCompression()
    flat = values.detach().reshape(-1)
    wire = flat.to(torch.float32) if isinstance(codec, NoCompression) else codec.encode_packed(flat)
    extras = extras.detach().reshape(-1).to(torch.float32)
    header = torch.tensor(
        [MAGIC, VERSION, round_index, transport.rank, layout.fingerprint, flat.numel(), codec_id(codec)],
        dtype=torch.int64,
    )
    mac = message_mac(key, header, extras, wire).to(wire.device)
    header_transfer = transport.send([header.to(wire.device)], dst, kind)
    body_transfer = transport.send([extras, wire, mac], dst, kind + BODY_SUFFIX)
    return Transfer.combine(header_transfer, body_transfer)


def update_problem(values: torch.Tensor, max_norm: float | None) -> str | None:
    """Why a vector of parameters must not be used (non-finite, or too large), or None if it may.

    One pass over the values in the common case: the float32 norm is non-finite exactly when a
    value is NaN/Inf or the squares overflow, and only then are the values inspected one by one
    (this check is on the server's critical path, once per update).
    """
    norm = float(torch.linalg.vector_norm(values, dtype=torch.float32))
    if not math.isfinite(norm):
        bad = int((~torch.isfinite(values)).sum())
        if bad:
            return f"holds {bad} non-finite value(s) (NaN or Inf)"
        norm = float(torch.linalg.vector_norm(values.double()))  # finite, only huge
    if max_norm is not None and norm > max_norm:
        return f"has an L2 norm of {norm:.4g}, which exceeds security.max_update_norm = {max_norm:.4g}"
    return None


def envelope_problem(
    key: bytes,
    header: torch.Tensor,
    extras: torch.Tensor,
    wire: torch.Tensor,
    mac: torch.Tensor,
    rank: int,
    round_index: int,
    layout: UpdateLayout,
) -> str | None:
    """Why the server must refuse an update received from `rank` in round `round_index` before
    even decoding its values (forged, replayed, or built from another model), or None."""
    if not mac_matches(key, mac, header, extras, wire):
        return "its HMAC does not verify under the worker's session key (forged or corrupted)"
    _, _, sent_round, sender, fingerprint, count, _ = (int(v) for v in header.tolist())
    if sender != rank or sent_round != round_index:
        return f"it claims rank {sender}, round {sent_round + 1} (replayed or misrouted)"
    if count != layout.numel:
        return f"it holds {count} values; the model's update has {layout.numel} (shapes differ)"
    if fingerprint != layout.fingerprint:
        return "its layer names, shapes or dtypes differ from the model's"
    return None


def refusal_reason(
    key: bytes,
    header: torch.Tensor,
    extras: torch.Tensor,
    values: torch.Tensor,
    mac: torch.Tensor,
    rank: int,
    round_index: int,
    layout: UpdateLayout,
    max_norm: float | None,
) -> str | None:
    """Why the server must refuse an update of float32 `values` as received, or None: the
    envelope's checks, then the values' own (`update_problem`)."""
    reason = envelope_problem(key, header, extras, values, mac, rank, round_index, layout)
    if reason is None and values.numel() != layout.numel:
        reason = f"it holds {values.numel()} values; the model's update has {layout.numel} (shapes differ)"
    if reason is not None:
        return reason
    problem = update_problem(values, max_norm)
    return None if problem is None else f"it {problem}"


def _in_storage(storage: torch.Tensor | None, count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`count` values of `dtype` viewed at the start of `storage` where they fit, else a new tensor."""
    size = count * dtype.itemsize
    if storage is not None and size <= storage.numel() * storage.element_size():
        return storage.view(torch.uint8)[:size].view(dtype)
    return torch.empty(count, dtype=dtype, device=device)


class SharedWindow:
    """Coded bytes of the upload window's slots beyond the first, shared by the receivers of a
    round's upload kinds (`engine.rounds`). The server receives one kind after the other, so each
    slot's bytes serve every kind in turn: the window costs (window - 1) of the largest coded
    upload, not that for each kind."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._storage: dict[int, torch.Tensor] = {}

    def wire(self, slot_index: int, nbytes: int) -> torch.Tensor:
        """`nbytes` of slot `slot_index`'s bytes (grown, never shrunk, as kinds ask)."""
        storage = self._storage.get(slot_index)
        if storage is None or storage.numel() < nbytes:
            storage = self._storage[slot_index] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return storage[:nbytes]


@dataclass(eq=False)
class _Slot:
    """One place for an upload body in flight at the server: its buffers."""

    extras: torch.Tensor
    mac: torch.Tensor
    wire: torch.Tensor | None = None
    """Its own coded bytes (not with a shared window beyond the first slot); grown, never shrunk,
    as updates' sizes ask."""
    float_values: torch.Tensor | None = None
    """Where a float32 body lands when the window is wider than one (with one, it lands in the
    receiver's values buffer); dropped between rounds, as that buffer is."""


@dataclass
class _Posted:
    """An upload whose header has arrived and whose body is being received into slot `slot_index`
    (its extras and MAC there, its values in `wire`)."""

    slot_index: int
    rank: int
    header: torch.Tensor
    codec: Codec
    count: int
    wire: torch.Tensor
    transfer: Transfer


class UpdateReceiver:
    """The server's side: receive updates in arrival order and accept or refuse each.

    Up to `window` bodies are received at once: each worker's upload crosses its own link, so a
    server that took one body at a time would make a round's uploads cross the edge one after
    another, the slowest link's included (gloo moves a message only once its receive is posted).
    Bodies are checked, decoded and handed over one at a time, in the order their headers came,
    so at most `window` coded payloads (plus one decoded update) are in memory whatever K is.
    """

    def __init__(
        self,
        transport: Transport,
        keys: dict[int, bytes],
        extras_size: int,
        layout_of: Callable[[int], UpdateLayout],
        max_norm: float | None,
        values_storage: torch.Tensor | None = None,
        codecs: Sequence[Codec] = (),
        wire_storage: torch.Tensor | None = None,
        window: int = 1,
        shared_window: SharedWindow | None = None,
    ) -> None:
        """`values_storage`: memory the decoded float32 values may occupy when they fit, e.g. a
        buffer the caller uses for something else between receives; without it the receiver
        allocates its own. `wire_storage`: the same for the first slot's coded bytes. `codecs`: the
        ones beyond `CAST_CODECS` that workers may announce. `window`: bodies received at once;
        `shared_window`: where the other slots' coded bytes live (else each slot's own)."""
        for name, storage in (("values_storage", values_storage), ("wire_storage", wire_storage)):
            if storage is not None and (storage.dim() != 1 or not storage.is_contiguous()):
                raise ValueError(f"{name} must be one contiguous flat tensor")
        if window < 1:
            raise ValueError(f"the upload window must be at least 1, found {window}")
        self.transport = transport
        self.keys = keys
        self.extras_size = extras_size
        self.layout_of = layout_of
        self.max_norm = max_norm
        self.values_storage = values_storage
        self.wire_storage = wire_storage
        self.codecs = [*CAST_CODECS, *codecs]
        self.window = window
        self.shared_window = shared_window
        device = transport.device
        self._slots = [
            _Slot(
                extras=torch.empty(extras_size, dtype=torch.float32, device=device),
                mac=torch.empty(MAC_BYTES, dtype=torch.uint8, device=device),
            )
            for _ in range(window)
        ]
        self._values: torch.Tensor | None = None

    def _wire(self, slot_index: int, nbytes: int) -> torch.Tensor:
        """Where slot `slot_index` receives a coded body of `nbytes`: the first slot in the lent
        `wire_storage` where it fits, the others in the shared window where there is one; else the
        slot's own bytes, grown as sizes ask."""
        if slot_index > 0 and self.shared_window is not None:
            return self.shared_window.wire(slot_index, nbytes)
        slot = self._slots[slot_index]
        if slot.wire is None or slot.wire.numel() < nbytes:
            storage = self.wire_storage if slot_index == 0 else None
            slot.wire = _in_storage(storage, nbytes, torch.uint8, self.transport.device)
        return slot.wire[:nbytes]

    def _values_buffer(self, count: int) -> torch.Tensor:
        if self._values is None or self._values.numel() != count:
            self._values = _in_storage(self.values_storage, count, torch.float32, self.transport.device)
        return self._values

    def _float_landing(self, slot_index: int, count: int) -> torch.Tensor:
        """Where a float32 body lands: straight in the values buffer with a window of one; with a
        wider window in the slot's own buffer (the values buffer is being decoded into meanwhile)."""
        if self.window == 1:
            return self._values_buffer(count)
        slot = self._slots[slot_index]
        if slot.float_values is None or slot.float_values.numel() != count:
            slot.float_values = torch.empty(count, dtype=torch.float32, device=self.transport.device)
        return slot.float_values

    def release(self) -> None:
        """Drop the values buffers until the next update: between rounds the memory is the model's
        to use (e.g. for gradients), not held for an update that is not coming yet. (The wire
        buffers, a compressed fraction of it, are kept: allocated anew each round they would
        fragment the heap. `values_storage` stays the caller's.)"""
        self._values = None
        for slot in self._slots:
            slot.float_values = None

    def receive_all(
        self, kind: str, expected: Sequence[int], round_index: int, in_order: bool = False
    ) -> Iterator[Update | Refusal]:
        """One update from each of `expected`, accepted or refused, in the order their headers
        arrive (with `in_order`, in the order listed), with up to `window` bodies in flight.

        Headers are taken as they arrive and bodies posted for them while there is room, whatever
        the order the updates are handed over in, so a worker that computes slowly does not hold
        back the links of those listed after it. With `in_order` the last free slot is kept for
        the next rank due: a header that comes before it with no other slot free waits, tiny, until
        a body leaves (with a window of one, the bodies are posted strictly in turn). Each yielded
        update's values are valid until the next one is asked for."""
        waiting = list(expected)  # ranks whose header has not arrived
        held: dict[int, torch.Tensor] = {}  # headers in hand whose bodies have no slot yet
        posted: dict[int, _Posted] = {}  # bodies in flight by rank, in the order they were posted
        due = deque(expected)
        while waiting or held or posted:
            while True:
                free = self.window - len(posted)
                next_due = due[0] if in_order and due[0] not in posted else None
                room = free - (next_due is not None)  # slots for a rank other than the next due
                ready = next(
                    (rank for rank in held if (rank == next_due and free > 0) or (rank != next_due and room > 0)),
                    None,
                )
                if ready is not None:
                    posted[ready] = self._post_body(kind, ready, held.pop(ready), self._free_slot(posted))
                elif waiting and (room > 0 or (next_due is not None and next_due not in held and free > 0)):
                    header = torch.zeros(HEADER_SIZE, dtype=torch.int64, device=self.transport.device)
                    rank = self.transport.receive_from_any(header, kind, waiting)
                    waiting.remove(rank)
                    held[rank] = header
                else:
                    break
            rank = due[0] if in_order else next(iter(posted))
            due.remove(rank)
            upload = posted.pop(rank)
            upload.transfer.wait()
            yield self._checked(upload, round_index)

    def _free_slot(self, posted: dict[int, _Posted]) -> int:
        busy = {upload.slot_index for upload in posted.values()}
        return min(index for index in range(self.window) if index not in busy)

    def _post_body(self, kind: str, rank: int, header: torch.Tensor, slot_index: int) -> _Posted:
        """Post the receive of `rank`'s body, whose `header` has arrived, into slot `slot_index`."""
        slot = self._slots[slot_index]
        fields = [int(v) for v in header.tolist()]
        magic, version, count, announced = fields[0], fields[1], fields[5], fields[6]
        if magic != MAGIC or version != VERSION or not 0 <= count <= MAX_VALUES or not 0 <= announced < len(CODEC_NAMES):
            raise ProtocolError(
                f"rank {rank} sent a '{kind}' message that is not an update envelope (header {fields}); "
                "is it running the same EntGAN version?"
            )
        try:
            codec = codec_named(announced, self.codecs)
        except ValueError as error:
            raise ProtocolError(f"rank {rank}'s '{kind}' update: {error}") from None
        if isinstance(codec, NoCompression):  # float32 as is: received straight into a values buffer
            wire = self._float_landing(slot_index, count)
        else:
            wire = self._wire(slot_index, codec.payload_bytes(count))
        transfer = self.transport.receive([slot.extras, wire, slot.mac], rank, kind + BODY_SUFFIX)
        return _Posted(slot_index, rank, header, codec, count, wire, transfer)

    def _checked(self, posted: _Posted, round_index: int) -> Update | Refusal:
        """A received upload, refused with the reason or accepted with its decoded values."""
        rank, codec, wire, slot = posted.rank, posted.codec, posted.wire, self._slots[posted.slot_index]
        reason = envelope_problem(
            self.keys[rank], posted.header, slot.extras, wire, slot.mac, rank, round_index, self.layout_of(rank)
        )
        if reason is not None:
            return Refusal(rank, round_index, reason)
        if isinstance(codec, NoCompression):
            values = wire
        else:
            values = self._values_buffer(posted.count)
            codec.decode_packed_into(wire, values)
        problem = update_problem(values, self.max_norm)
        if problem is not None:
            return Refusal(rank, round_index, f"it {problem}")
        return Update(rank, values, slot.extras.clone())
