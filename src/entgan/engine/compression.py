"""Compression codecs for flat vectors moved between ranks, and a bandwidth-adaptive chooser.

The ideas come from DDP's communication hooks (`fp16_compress_hook` casts before sending) and from
PowerSGD / top-k sparsification with error feedback (what a lossy send leaves out is remembered by
the sender and sent later, so nothing is lost for good).

A `Codec` turns a float32 vector into a list of tensors whose shapes and dtypes depend only on the
vector's length (`payload_spec`), so the receiver can post its receives before anything arrives:

| codec  | payload for n values                          | bytes          | error per entry            |
|--------|-----------------------------------------------|----------------|----------------------------|
| `none` | the vector (float32)                          | 4n             | exact                      |
| `fp16` | the vector cast to float16                    | 2n             | <= 2^-11 |x| + 2^-25      |
| `bf16` | the vector cast to bfloat16                   | 2n             | <= 2^-8 |x| (wider range)  |
| `int8` | int8 codes + one float32 scale per chunk      | n + 4 n/chunk  | <= max|chunk| / 254        |
| `topk` | the k largest-magnitude values + their indices| 8k, k=ceil(rn) | the n-k dropped entries    |

A payload also packs into one uint8 tensor (`encode_packed`, `decode_packed`), so a model sent
layer by layer in any codec is still one message per layer; `encode_packed_into` and
`decode_packed_into` write into buffers a sender or receiver keeps (`engine.transport.WireBuffers`,
the update receiver), so a server that codes every round allocates nothing per round.

Codecs are stateless. Two link helpers carry the error feedback:
- `ErrorFeedback` (sender side, for streams of increments such as gradients): the residual of one
  send is added to the next increment, so the sum of decoded vectors tracks the sum of inputs;
- `ReplicaSender` / `ReplicaReceiver` (for a model's parameters, as in compressed gossip): both
  ends hold the same estimate of the sender's vector; each send carries the compressed difference
  between the true vector and that estimate, so whatever a send leaves out is still in the next
  difference (error feedback in state form, as in CHOCO-gossip), and the sender's estimate is the
  receiver's, bit for bit, because both apply the same decoded update.

`CodecChooser` picks, from a measured bandwidth (`BandwidthEstimate`, smoothed), the least lossy
codec whose payload crosses the link within a target time. Only the sender needs to choose: it
announces its codec in a one-number header (`codec_id` / `codec_named`), which both ends read from
the same table.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

if TYPE_CHECKING:
    from entgan.config import CompressionConfig


@dataclass(frozen=True)
class PayloadSlot:
    """Shape and dtype of one tensor of a payload (what a receiver allocates to receive it)."""

    numel: int
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


class Codec(ABC):
    """Encodes a 1-D float32 vector into fixed-size tensors and decodes it back."""

    name: ClassVar[str]

    @abstractmethod
    def payload_spec(self, numel: int) -> list[PayloadSlot]:
        """The payload's tensors for a vector of `numel` values (the same for every such vector)."""

    @abstractmethod
    def encode(self, vector: Tensor) -> list[Tensor]:
        """Payload tensors for `vector` (1-D, float32), matching `payload_spec(vector.numel())`."""

    @abstractmethod
    def decode(self, payload: Sequence[Tensor], numel: int) -> Tensor:
        """The float32 vector of `numel` values that `payload` stands for."""

    def payload_bytes(self, numel: int) -> int:
        """Bytes on the wire for one vector of `numel` values."""
        return sum(slot.nbytes for slot in self.payload_spec(numel))

    def empty_payload(self, numel: int, device: torch.device | None = None) -> list[Tensor]:
        """Receive buffers for the payload of a vector of `numel` values."""
        return [torch.empty(slot.numel, dtype=slot.dtype, device=device) for slot in self.payload_spec(numel)]

    def round_trip(self, vector: Tensor) -> Tensor:
        """decode(encode(vector)): what the receiver will see."""
        return self.decode(self.encode(vector), vector.numel())

    # A payload packed into one byte tensor travels as one message: a model sent layer by layer
    # stays one message per layer, whatever the codec, so a receiver can still use each layer as
    # soon as it has arrived.
    def encode_packed(self, vector: Tensor) -> Tensor:
        """The payload of `vector` as one uint8 tensor: its tensors' bytes, one after another."""
        return torch.cat([part.contiguous().view(torch.uint8) for part in self.encode(vector)])

    def encode_packed_into(self, vector: Tensor, out: Tensor) -> None:
        """`encode_packed` into `out` (uint8, `payload_bytes` long), e.g. a sender's wire buffer
        kept from round to round."""
        _check_packed_size(self, out, vector.numel())
        out.copy_(self.encode_packed(vector))

    def decode_packed(self, packed: Tensor, numel: int) -> Tensor:
        """The float32 vector that `encode_packed` turned into `packed`."""
        return self.decode(self._unpacked(packed, numel), numel)

    def decode_into(self, payload: Sequence[Tensor], out: Tensor) -> None:
        """Decode into `out` (1-D float32): the same values as `decode`, here with a full-size
        temporary; codecs override it to write in place (a server decodes every upload)."""
        out.copy_(self.decode(payload, out.numel()))

    def decode_packed_into(self, packed: Tensor, out: Tensor) -> None:
        """`decode_packed` into `out` (1-D float32)."""
        self.decode_into(self._unpacked(packed, out.numel()), out)

    def _unpacked(self, packed: Tensor, numel: int) -> list[Tensor]:
        _check_packed_size(self, packed, numel)
        parts, offset = [], 0
        for slot in self.payload_spec(numel):
            part = packed[offset : offset + slot.nbytes]
            if (packed.storage_offset() + offset) % slot.dtype.itemsize:  # a view must be aligned
                part = part.clone()
            parts.append(part.view(slot.dtype))
            offset += slot.nbytes
        return parts


def _as_flat_float(vector: Tensor) -> Tensor:
    if vector.dim() != 1:
        raise ValueError(f"codecs take 1-D vectors, found shape {tuple(vector.shape)}")
    return vector.detach().to(torch.float32)


def _check_packed_size(codec: Codec, packed: Tensor, numel: int) -> None:
    expected = codec.payload_bytes(numel)
    if packed.dtype != torch.uint8 or packed.numel() != expected:
        raise ValueError(
            f"{codec.name} packed payload for {numel} values should be {expected} uint8 bytes, "
            f"found {packed.numel()} {packed.dtype}"
        )


def _check_payload(codec: Codec, payload: Sequence[Tensor], numel: int) -> None:
    spec = codec.payload_spec(numel)
    found = [(t.numel(), t.dtype) for t in payload]
    if found != [(slot.numel, slot.dtype) for slot in spec]:
        raise ValueError(f"{codec.name} payload for {numel} values should be {spec}, found {found}")


class NoCompression(Codec):
    """The vector itself, float32: exact."""

    name = "none"

    def payload_spec(self, numel: int) -> list[PayloadSlot]:
        return [PayloadSlot(numel, torch.float32)]

    def encode(self, vector: Tensor) -> list[Tensor]:
        return [_as_flat_float(vector).contiguous()]

    def decode(self, payload: Sequence[Tensor], numel: int) -> Tensor:
        _check_payload(self, payload, numel)
        return payload[0]

    def decode_into(self, payload: Sequence[Tensor], out: Tensor) -> None:
        _check_payload(self, payload, out.numel())
        out.copy_(payload[0])


class _HalfPrecision(Codec):
    """Cast to a 16-bit float (DDP's fp16 compress hook, for a vector): half the bytes."""

    dtype: ClassVar[torch.dtype]

    def payload_spec(self, numel: int) -> list[PayloadSlot]:
        return [PayloadSlot(numel, self.dtype)]

    def encode(self, vector: Tensor) -> list[Tensor]:
        return [_as_flat_float(vector).to(self.dtype)]

    def decode(self, payload: Sequence[Tensor], numel: int) -> Tensor:
        _check_payload(self, payload, numel)
        return payload[0].to(torch.float32)

    def decode_into(self, payload: Sequence[Tensor], out: Tensor) -> None:
        _check_payload(self, payload, out.numel())
        out.copy_(payload[0])  # widened as it is copied


class Float16(_HalfPrecision):
    """float16: 11 significant bits, but overflows beyond +-65504 (fine for differences and gradients)."""

    name = "fp16"
    dtype = torch.float16


class BFloat16(_HalfPrecision):
    """bfloat16: float32's range with 8 significant bits."""

    name = "bf16"
    dtype = torch.bfloat16


class Int8Quantisation(Codec):
    """Symmetric 8-bit quantisation with one float32 scale per chunk of `chunk_size` values.

    Each value becomes round(x / s) in [-127, 127] with s = max|x| over its chunk / 127, so the
    error is at most s / 2 = max|chunk| / 254. Smaller chunks follow the local magnitude more
    closely at 4 bytes per chunk; `chunk_size=None` is one scale for the whole vector.
    """

    name = "int8"
    LEVELS: ClassVar[int] = 127
    ROWS_AT_ONCE: ClassVar[int] = 16
    """Chunks encoded per step (16 x 1,024 values: 64 KB of float temporaries)."""

    def __init__(self, chunk_size: int | None = 1024) -> None:
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"int8 chunk size must be positive, found {chunk_size}")
        self.chunk_size = chunk_size

    def _chunk(self, numel: int) -> int:
        return max(1, numel if self.chunk_size is None else min(self.chunk_size, numel))

    def _num_chunks(self, numel: int) -> int:
        return math.ceil(numel / self._chunk(numel)) if numel else 0

    def payload_spec(self, numel: int) -> list[PayloadSlot]:
        # Scales first: packed, they sit at the start of the bytes, aligned for a float32 view.
        return [PayloadSlot(self._num_chunks(numel), torch.float32), PayloadSlot(numel, torch.int8)]

    def _blocks(self, vector: Tensor) -> Tensor:
        """`vector` as (chunks, chunk) rows, zero-padded to whole chunks (a copy only if padded)."""
        numel = vector.numel()
        chunk = self._chunk(numel)
        padding = self._num_chunks(numel) * chunk - numel
        if padding:
            vector = torch.nn.functional.pad(vector, (0, padding))
        return vector.view(-1, chunk)

    def encode(self, vector: Tensor) -> list[Tensor]:
        vector = _as_flat_float(vector)
        packed = torch.empty(self.payload_bytes(vector.numel()), dtype=torch.uint8, device=vector.device)
        self.encode_packed_into(vector, packed)
        return self._unpacked(packed, vector.numel())

    def encode_packed_into(self, vector: Tensor, out: Tensor) -> None:
        """Written straight into `out`'s bytes, `ROWS_AT_ONCE` chunks at a time: the only
        temporaries are a few hundred KB at most, the same every call, so a sender that keeps its
        wire buffers allocates nothing that outlives the call or scatters the heap."""
        vector = _as_flat_float(vector)
        numel = vector.numel()
        _check_packed_size(self, out, numel)
        if numel == 0:
            return
        chunk = self._chunk(numel)
        chunks = self._num_chunks(numel)
        scales = out[: 4 * chunks].view(torch.float32)
        codes = out[4 * chunks :].view(torch.int8)
        for first in range(0, chunks, self.ROWS_AT_ONCE):
            last = min(first + self.ROWS_AT_ONCE, chunks)
            part = vector[first * chunk : min(last * chunk, numel)]
            blocks = self._blocks(part)
            lowest, highest = blocks.aminmax(dim=1)
            row_scales = scales[first:last]
            torch.maximum(highest, lowest.neg_(), out=row_scales)
            row_scales.div_(self.LEVELS).masked_fill_(row_scales == 0, 1.0)  # all-zero chunk: any scale
            quotients = torch.div(blocks, row_scales[:, None]).round_().clamp_(-self.LEVELS, self.LEVELS)
            codes[first * chunk : first * chunk + part.numel()].copy_(quotients.view(-1)[: part.numel()])

    def decode(self, payload: Sequence[Tensor], numel: int) -> Tensor:
        out = torch.empty(numel, dtype=torch.float32, device=payload[0].device)
        self.decode_into(payload, out)
        return out

    def decode_into(self, payload: Sequence[Tensor], out: Tensor) -> None:
        numel = out.numel()
        _check_payload(self, payload, numel)
        scales, codes = payload
        out.copy_(codes)  # widened in place: no float32 temporary
        chunk = self._chunk(numel)
        whole = numel // chunk if numel else 0
        if whole:
            out[: whole * chunk].view(whole, chunk).mul_(scales[:whole, None])
        if whole * chunk < numel:
            out[whole * chunk :].mul_(scales[whole])


class TopKSparsification(Codec):
    """The k = ceil(ratio * n) largest-magnitude values and their int32 indices; the rest are zero.

    Lossy on its own (what is dropped is gone), so it is meant to be used on a link with error
    feedback (`ErrorFeedback`, `ReplicaSender`), which sends the dropped part later.
    """

    name = "topk"

    def __init__(self, ratio: float) -> None:
        if not 0 < ratio <= 1:
            raise ValueError(f"top-k ratio must be in (0, 1], found {ratio}")
        self.ratio = ratio

    def count(self, numel: int) -> int:
        return min(numel, math.ceil(self.ratio * numel))

    def payload_spec(self, numel: int) -> list[PayloadSlot]:
        if numel >= 2**31:
            raise ValueError(f"top-k indices are int32: at most 2^31 - 1 values, found {numel}")
        k = self.count(numel)
        return [PayloadSlot(k, torch.float32), PayloadSlot(k, torch.int32)]

    def encode(self, vector: Tensor) -> list[Tensor]:
        vector = _as_flat_float(vector)
        indices = vector.abs().topk(self.count(vector.numel()), sorted=False).indices
        return [vector[indices].contiguous(), indices.to(torch.int32)]

    def decode(self, payload: Sequence[Tensor], numel: int) -> Tensor:
        _check_payload(self, payload, numel)
        values, indices = payload
        dense = torch.zeros(numel, dtype=torch.float32, device=values.device)
        dense[indices.long()] = values
        return dense

    def decode_into(self, payload: Sequence[Tensor], out: Tensor) -> None:
        _check_payload(self, payload, out.numel())
        values, indices = payload
        out.zero_()
        out[indices.long()] = values


CODEC_NAMES: tuple[str, ...] = ("none", "fp16", "bf16", "int8", "topk")
"""Every codec, by name; a codec's position here is its id in a link header."""


def build_codec(name: str, topk_ratio: float = 0.1, int8_chunk_size: int | None = 1024) -> Codec:
    """The codec called `name`, with its parameters."""
    if name == "none":
        return NoCompression()
    if name == "fp16":
        return Float16()
    if name == "bf16":
        return BFloat16()
    if name == "int8":
        return Int8Quantisation(int8_chunk_size)
    if name == "topk":
        return TopKSparsification(topk_ratio)
    raise ValueError(f"codec must be one of {list(CODEC_NAMES)}, found {name!r}")


def codec_id(codec: Codec) -> int:
    """The number a link header carries to announce `codec`."""
    return CODEC_NAMES.index(codec.name)


def codec_named(identifier: int, codecs: Sequence[Codec]) -> Codec:
    """The codec among `codecs` that header value `identifier` announces."""
    if not 0 <= identifier < len(CODEC_NAMES):
        raise ValueError(f"link header announces codec id {identifier}, known ids are 0..{len(CODEC_NAMES) - 1}")
    name = CODEC_NAMES[identifier]
    for codec in codecs:
        if codec.name == name:
            return codec
    raise ValueError(f"link header announces codec {name!r}, this end only knows {[c.name for c in codecs]}")


@dataclass(frozen=True)
class LinkCodecs:
    """The codecs of a method's coded transfers (`control.compression` for EntGAN,
    `baselines.flgan.compression` for FL-GAN): models in `model`; with `uploads: changes`, each
    model's change since the sync in `change`, up and to peers, with error feedback on the uploads."""

    model: Codec | None = None
    change: Codec | None = None

    @classmethod
    def from_config(cls, compression: CompressionConfig) -> LinkCodecs:
        if not compression.enabled:
            return cls()
        model = build_codec(compression.codec, int8_chunk_size=compression.int8_chunk_size)
        if compression.uploads != "changes":
            return cls(model)
        return cls(model, build_codec(compression.change_codec, compression.topk_ratio, compression.int8_chunk_size))

    def at_start(self, resumed: bool) -> Codec | None:
        """How the models go down at the start: exact, or on a resume coded as every round's, so
        the workers due next hold what they would have received and the run goes on as it was."""
        return self.model if resumed else None

    @property
    def changes(self) -> bool:
        """Whether uploads (and gossip) carry changes since the sync instead of models."""
        return self.change is not None

    @property
    def upload(self) -> Codec | None:
        """How an upload (a change, or a model) travels; None: float32."""
        return self.change if self.change is not None else self.model


# ---------------------------------------------------------------- error feedback on a link


class ErrorFeedback:
    """Sender side of a link carrying increments (e.g. gradients): nothing is dropped for good.

    Each send encodes increment + residual and keeps as the new residual what the receiver will
    not see; so after any number of sends, sum(decoded) = sum(increments) - residual, and the
    residual stays bounded for a contractive codec (top-k keeps the largest entries).
    """

    def __init__(self, numel: int, device: torch.device | None = None) -> None:
        self.residual = torch.zeros(numel, dtype=torch.float32, device=device)

    def encode(self, increment: Tensor, codec: Codec) -> list[Tensor]:
        corrected = _as_flat_float(increment) + self.residual
        payload = codec.encode(corrected)
        self.residual = corrected - codec.decode(payload, corrected.numel())
        return payload

    def corrected(self, increment: Tensor, codec: Codec) -> Tensor:
        """increment + residual, the vector to send in `codec` (by a caller that encodes it
        itself, e.g. in an update envelope); what the codec will leave out of it becomes the
        residual."""
        corrected = _as_flat_float(increment) + self.residual
        self.residual = corrected - codec.round_trip(corrected)
        return corrected


class ReplicaReceiver:
    """Receiver side of a parameter link: its estimate of the sender's vector.

    Starts from the vector both ends held when the link opened (e.g. the model every rank got at
    initialisation) and applies each decoded difference.
    """

    def __init__(self, initial: Tensor) -> None:
        self.estimate = _as_flat_float(initial).clone()

    def decode(self, payload: Sequence[Tensor], codec: Codec) -> Tensor:
        self.estimate += codec.decode(payload, self.estimate.numel())
        return self.estimate


class ReplicaSender:
    """Sender side of a parameter link: sends compressed differences to the receiver's estimate.

    It mirrors the receiver's estimate exactly (same start, same decoded updates), so each send
    carries current - estimate: the part earlier sends left out included (error feedback), and
    no rounding drift builds up between the two ends.
    """

    def __init__(self, initial: Tensor) -> None:
        self.mirror = ReplicaReceiver(initial)

    def encode(self, current: Tensor, codec: Codec) -> list[Tensor]:
        payload = codec.encode(_as_flat_float(current) - self.mirror.estimate)
        self.mirror.decode(payload, codec)
        return payload


# ---------------------------------------------------------------- bandwidth-adaptive choice


class BandwidthEstimate:
    """Smoothed bandwidth of a link in bytes/s, from the time transfers of known size took.

    An exponential moving average: estimate := (1 - smoothing) * estimate + smoothing * sample, the
    first sample taken as is. Unknown (None) until the first transfer is observed.
    """

    def __init__(self, smoothing: float = 0.5) -> None:
        if not 0 < smoothing <= 1:
            raise ValueError(f"bandwidth smoothing must be in (0, 1], found {smoothing}")
        self.smoothing = smoothing
        self.bytes_per_second: float | None = None

    MIN_SECONDS: ClassVar[float] = 1e-6
    """Floor on a transfer's duration: a clock that reads 0 would give infinite bandwidth."""

    def observe(self, num_bytes: int, seconds: float) -> None:
        if num_bytes <= 0:
            return
        sample = num_bytes / max(seconds, self.MIN_SECONDS)
        if self.bytes_per_second is None:
            self.bytes_per_second = sample
        else:
            self.bytes_per_second += self.smoothing * (sample - self.bytes_per_second)


class CodecChooser:
    """Picks the least lossy codec whose payload crosses the link within `target_seconds`.

    `ladder` lists codecs from least to most compressed (e.g. none, fp16, int8, topk); the first
    whose payload fits the target at the measured bandwidth wins. When none fits, the most
    compressed one is used; while the bandwidth is still unknown, the least compressed one (the
    first exchange measures the link).
    """

    def __init__(self, ladder: Sequence[Codec], target_seconds: float) -> None:
        if not ladder:
            raise ValueError("the codec ladder is empty")
        if target_seconds <= 0:
            raise ValueError(f"target time per exchange must be positive, found {target_seconds}")
        self.ladder = list(ladder)
        self.target_seconds = target_seconds

    def choose(self, numel: int, bytes_per_second: float | None) -> Codec:
        if bytes_per_second is None:
            return self.ladder[0]
        budget = bytes_per_second * self.target_seconds
        for codec in self.ladder:
            if codec.payload_bytes(numel) <= budget:
                return codec
        return self.ladder[-1]
