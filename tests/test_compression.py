"""Compression codecs, error feedback on a link, and the bandwidth-adaptive codec chooser."""

from __future__ import annotations

import math

import pytest
import torch

from entgan.engine.compression import (
    CODEC_NAMES,
    BandwidthEstimate,
    CodecChooser,
    ErrorFeedback,
    Int8Quantisation,
    ReplicaReceiver,
    ReplicaSender,
    TopKSparsification,
    build_codec,
    codec_id,
    codec_named,
)


def _vector(numel: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("numel", [1, 7, 1000, 5003])
def test_payload_matches_spec_and_byte_count(name: str, numel: int) -> None:
    codec = build_codec(name, topk_ratio=0.1, int8_chunk_size=256)

    payload = codec.encode(_vector(numel))

    spec = codec.payload_spec(numel)
    assert [(t.numel(), t.dtype) for t in payload] == [(slot.numel, slot.dtype) for slot in spec]
    assert sum(t.numel() * t.element_size() for t in payload) == codec.payload_bytes(numel)
    assert [(t.numel(), t.dtype) for t in codec.empty_payload(numel)] == [(t.numel(), t.dtype) for t in payload]


@pytest.mark.parametrize(
    ("name", "expected_bytes"),
    [
        ("none", 4 * 10_000),
        ("fp16", 2 * 10_000),
        ("bf16", 2 * 10_000),
        ("int8", 10_000 + 4 * math.ceil(10_000 / 1024)),
        ("topk", 8 * 1_000),  # ratio 0.1: 1,000 float32 values + 1,000 int32 indices
    ],
)
def test_payload_bytes(name: str, expected_bytes: int) -> None:
    assert build_codec(name, topk_ratio=0.1, int8_chunk_size=1024).payload_bytes(10_000) == expected_bytes


def test_none_is_exact() -> None:
    vector = _vector(1000)
    assert torch.equal(build_codec("none").round_trip(vector), vector)


def test_fp16_is_exact_on_values_it_represents_and_within_its_bound_otherwise() -> None:
    codec = build_codec("fp16")
    representable = torch.tensor([0.0, 1.0, -2.5, 0.125, 1024.0, 65504.0])
    assert torch.equal(codec.round_trip(representable), representable)

    vector = torch.cat([_vector(2000, scale=1e-3), _vector(2000, seed=1, scale=100.0), torch.tensor([3e-7, -1e-8])])
    error = (codec.round_trip(vector) - vector).abs()
    assert torch.all(error <= 2**-11 * vector.abs() + 2**-25)
    assert error.max() > 0  # it does round: the bound is what is being tested


def test_bf16_keeps_range_within_its_relative_bound() -> None:
    vector = torch.cat([_vector(2000, scale=1e-30), _vector(2000, seed=1, scale=1e30)])
    error = (build_codec("bf16").round_trip(vector) - vector).abs()
    assert torch.all(error <= 2**-8 * vector.abs())


@pytest.mark.parametrize("chunk_size", [None, 1, 64, 1024])
def test_int8_error_is_at_most_half_a_step_of_its_chunk(chunk_size: int | None) -> None:
    codec = Int8Quantisation(chunk_size)
    vector = torch.cat([_vector(3000, scale=0.01), _vector(1000, seed=1, scale=10.0), torch.zeros(100)])

    decoded = codec.round_trip(vector)

    chunk = len(vector) if chunk_size is None else chunk_size
    for start in range(0, len(vector), chunk):
        part = slice(start, start + chunk)
        peak = vector[part].abs().max()
        assert torch.all((decoded[part] - vector[part]).abs() <= peak / 254 * (1 + 1e-5))
    assert torch.equal(decoded[-100:], torch.zeros(100))  # an all-zero chunk stays zero
    assert decoded.abs().max() <= vector.abs().max() * (1 + 1e-6)


def test_int8_chunks_follow_local_magnitude() -> None:
    small_then_large = torch.cat([_vector(1024, scale=1e-3), _vector(1024, seed=1, scale=10.0)])

    per_tensor = (Int8Quantisation(None).round_trip(small_then_large) - small_then_large)[:1024].abs().max()
    per_chunk = (Int8Quantisation(1024).round_trip(small_then_large) - small_then_large)[:1024].abs().max()

    assert per_chunk < per_tensor / 100


def test_topk_keeps_exactly_the_largest_magnitudes() -> None:
    vector = _vector(1000)
    codec = TopKSparsification(0.05)

    decoded = codec.round_trip(vector)

    kept = decoded != 0
    assert int(kept.sum()) == 50
    assert torch.equal(decoded[kept], vector[kept])
    assert vector[kept].abs().min() >= vector[~kept].abs().max()


def test_topk_with_error_feedback_transmits_everything_eventually() -> None:
    numel, sends = 500, 400
    codec = TopKSparsification(0.05)
    link = ErrorFeedback(numel)
    inputs = torch.zeros(numel)
    received = torch.zeros(numel)

    for step in range(sends):
        increment = _vector(numel, seed=step)
        inputs += increment
        received += codec.decode(link.encode(increment, codec), numel)

    # What has not arrived is exactly the residual, and it stays small next to what has.
    assert torch.allclose(received + link.residual, inputs, atol=1e-3)
    assert link.residual.norm() < 0.25 * inputs.norm()
    # Without feedback, top-k alone loses the dropped 95% for good.
    lossy = sum(codec.round_trip(_vector(numel, seed=step)) for step in range(sends))
    assert (lossy - inputs).norm() > 4 * (received - inputs).norm()


@pytest.mark.parametrize("name", ["topk", "int8", "fp16"])
def test_replica_link_converges_to_the_sent_vector_and_both_ends_agree(name: str) -> None:
    codec = build_codec(name, topk_ratio=0.1, int8_chunk_size=64)
    initial = _vector(300)
    sender, receiver = ReplicaSender(initial), ReplicaReceiver(initial)
    target = initial + _vector(300, seed=1)

    for _ in range(60):  # the vector stops changing: the estimate must catch up with it
        estimate = receiver.decode(sender.encode(target, codec), codec)

    assert torch.equal(sender.mirror.estimate, receiver.estimate)
    assert torch.allclose(estimate, target, atol=1e-5)


def test_codec_header_round_trip() -> None:
    codecs = [build_codec(name) for name in CODEC_NAMES]
    for codec in codecs:
        assert codec_named(codec_id(codec), codecs) is codec
    with pytest.raises(ValueError, match="codec id 99"):
        codec_named(99, codecs)
    with pytest.raises(ValueError, match="only knows"):
        codec_named(codec_id(codecs[-1]), codecs[:1])


def test_bad_codec_parameters_are_named() -> None:
    with pytest.raises(ValueError, match="codec must be one of"):
        build_codec("zip")
    with pytest.raises(ValueError, match="top-k ratio"):
        TopKSparsification(0.0)
    with pytest.raises(ValueError, match="chunk size"):
        Int8Quantisation(0)
    with pytest.raises(ValueError, match="1-D"):
        build_codec("none").encode(torch.zeros(2, 2))


def test_bandwidth_estimate_is_a_moving_average() -> None:
    estimate = BandwidthEstimate(smoothing=0.5)
    assert estimate.bytes_per_second is None
    estimate.observe(1000, 1.0)
    assert estimate.bytes_per_second == 1000
    estimate.observe(3000, 1.0)
    assert estimate.bytes_per_second == 2000
    estimate.observe(1000, 0.0)  # a zero-length clock reading is floored, not a division error
    assert math.isfinite(estimate.bytes_per_second) and estimate.bytes_per_second > 1e8


def test_chooser_picks_the_least_lossy_codec_that_fits_the_target() -> None:
    numel = 100_000  # none 400 kB, fp16 200 kB, int8 ~100 kB, topk(0.1) 80 kB
    ladder = [build_codec(name, topk_ratio=0.1) for name in ("none", "fp16", "int8", "topk")]
    chooser = CodecChooser(ladder, target_seconds=0.1)

    def choice(bytes_per_second: float | None) -> str:
        return chooser.choose(numel, bytes_per_second).name

    assert choice(None) == "none"  # unknown link: send plainly, and measure
    assert choice(1e9) == "none"  # loopback-like
    assert choice(4e6) == "none"  # 400 kB in exactly 0.1 s
    assert choice(3e6) == "fp16"
    assert choice(1.2e6) == "int8"
    assert choice(0.9e6) == "topk"
    assert choice(1e3) == "topk"  # nothing fits: the most compressed
    with pytest.raises(ValueError, match="target time"):
        CodecChooser(ladder, target_seconds=0)


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("numel", [0, 1, 1023, 1024, 3001])
def test_a_packed_payload_is_one_byte_tensor_of_the_payload_size_and_decodes_the_same(name: str, numel: int) -> None:
    codec = build_codec(name, topk_ratio=0.3, int8_chunk_size=64)
    vector = torch.randn(numel, generator=torch.Generator().manual_seed(numel))

    packed = codec.encode_packed(vector)

    assert packed.dtype == torch.uint8 and packed.numel() == codec.payload_bytes(numel)
    assert torch.equal(codec.decode_packed(packed, numel), codec.round_trip(vector))
    # Received into the middle of a larger buffer (an unaligned float32 slot): the same values.
    shifted = torch.cat([torch.zeros(3, dtype=torch.uint8), packed])[3:]
    assert torch.equal(codec.decode_packed(shifted, numel), codec.round_trip(vector))


def test_a_packed_payload_of_the_wrong_size_is_refused_by_name() -> None:
    codec = build_codec("int8")
    with pytest.raises(ValueError, match="int8 packed payload for 10 values should be 14"):
        codec.decode_packed(torch.zeros(12, dtype=torch.uint8), 10)


def test_int8_of_a_change_is_far_closer_than_int8_of_the_model() -> None:
    # Why EntGAN uploads D_k's change since the sync: the same bytes, an error scaled to the change.
    generator = torch.Generator().manual_seed(0)
    model = torch.randn(4096, generator=generator)
    change = 1e-3 * torch.randn(4096, generator=generator)
    codec = build_codec("int8")
    error_whole = (codec.round_trip(model + change) - (model + change)).abs().max()
    error_change = (model + codec.round_trip(change) - (model + change)).abs().max()
    assert error_change < error_whole / 100


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("numel", [0, 5, 64, 1000])
def test_decoding_into_a_buffer_writes_what_decode_returns(name: str, numel: int) -> None:
    codec = build_codec(name, topk_ratio=0.3, int8_chunk_size=64)
    vector = torch.randn(numel, generator=torch.Generator().manual_seed(1))
    out = torch.full((numel,), float("nan"))

    codec.decode_packed_into(codec.encode_packed(vector), out)

    assert torch.equal(out, codec.round_trip(vector))


def test_int8_encodes_a_few_chunks_at_a_time_to_the_same_bytes_as_in_one_pass() -> None:
    vector = _vector(16 * 1024 * 3 + 17, seed=4)  # three whole steps and a ragged tail
    stepwise = Int8Quantisation()
    one_pass = Int8Quantisation()
    one_pass.ROWS_AT_ONCE = 10**6

    assert torch.equal(stepwise.encode_packed(vector), one_pass.encode_packed(vector))
