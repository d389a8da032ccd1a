"""The server's upload window (`engine.upload_window`): up to W upload bodies in flight at once, on
a real four-process gloo group, with the same accepted values, refusals and (in order) the same
order as one at a time; and a tiny EntGAN run whose models do not depend on the window."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from entgan.engine.compression import build_codec
from entgan.engine.timeline import Timeline
from entgan.engine.transport import BODY_SUFFIX, Transport
from entgan.engine.updates import SharedWindow, UpdateLayout, UpdateReceiver, send_update

from conftest import gloo_transport, tiny_config

LAYOUT = UpdateLayout.of([("trunk.weight", torch.zeros(4, 5)), ("heads.0.bias", torch.zeros(2))])
KEYS = {1: b"a" * 32, 2: b"b" * 32, 3: b"c" * 32}
INT8 = build_codec("int8", int8_chunk_size=8)
TOPK = build_codec("topk", topk_ratio=0.5)
CODEC_OF_RANK = {1: INT8, 2: None, 3: TOPK}  # every slot sees coded and float32 bodies
WINDOWS = [(1, True), (3, True), (3, False), (2, False)]
"""(window, in_order) of each pass; each pass is two rounds."""
KIND = "discriminator-update"


def _values(rank: int, round_index: int) -> torch.Tensor:
    return torch.arange(22, dtype=torch.float32) * rank + round_index


def _worker(rank: int, transport: Transport) -> None:
    for round_index in range(2 * len(WINDOWS)):
        if rank == 1:
            time.sleep(0.3)  # the first rank listed comes last: arrival order differs from rank order
        forged = rank == 2 and round_index % 2 == 1
        key = b"x" * 32 if forged else KEYS[rank]
        send_update(transport, key, _values(rank, round_index), torch.full((3,), float(rank)), LAYOUT,
                    round_index, 0, KIND, codec=CODEC_OF_RANK[rank]).wait()
        transport.receive([torch.zeros(1)], 0, "control").wait()  # as a worker waits for the next models


def _server(transport: Transport, store_dir: str) -> None:
    passes = []
    shared = SharedWindow(torch.device("cpu"))  # one for every pass, as for a round's kinds
    for number, (window, in_order) in enumerate(WINDOWS):
        timeline = transport.timeline = Timeline(0, 4, Path(store_dir, f"timeline-{number}.jsonl"))
        receiver = UpdateReceiver(transport, KEYS, 3, layout_of=lambda _: LAYOUT, max_norm=None,
                                  values_storage=torch.zeros(22), codecs=[INT8, TOPK], window=window,
                                  shared_window=shared)
        rounds = []
        for round_index in (2 * number, 2 * number + 1):
            seen = []
            for received in receiver.receive_all(KIND, [1, 2, 3], round_index, in_order=in_order):
                if type(received).__name__ == "Refusal":
                    seen.append({"rank": received.rank, "refused": received.reason})
                else:
                    seen.append({"rank": received.rank, "values": received.values.tolist(),
                                 "extras": received.extras.tolist()})
            receiver.release()
            rounds.append(seen)
            transport.send_to_many([torch.zeros(1)], [1, 2, 3], "control").wait()
        passes.append({
            "rounds": rounds,
            "most_bodies_in_flight": _most_bodies_in_flight(timeline),
            "bodies_posted_for": _bodies_posted_for(timeline),
        })
    Path(store_dir, "result.json").write_text(json.dumps(passes))


def _most_bodies_in_flight(timeline: Timeline) -> int:
    """The most upload bodies the server had posted and not yet waited for, from its timeline."""
    bodies: set[int] = set()
    in_flight, most = set(), 0
    for record in timeline.records:
        if record[0] == "post" and record[4] == KIND + BODY_SUFFIX:
            posted = set(range(record[3], record[3] + len(record[5])))
            bodies |= posted
            in_flight.add(min(posted))
            most = max(most, len(in_flight))
        elif record[0] == "wait":
            waited = set(record[3]) & bodies
            in_flight = {first for first in in_flight if first not in waited}
    return most


def _bodies_posted_for(timeline: Timeline) -> list[int]:
    """The ranks whose upload bodies the server posted receives for, in the order it posted them."""
    return [record[5][0][0] for record in timeline.records if record[0] == "post" and record[4] == KIND + BODY_SUFFIX]


def _exchange(rank: int, store_dir: str) -> None:
    with gloo_transport(rank, store_dir, 4) as transport:
        if rank == 0:
            _server(transport, store_dir)
        else:
            _worker(rank, transport)


@pytest.mark.slow
def test_a_wider_window_receives_bodies_together_and_accepts_and_refuses_the_same(tmp_path: Path) -> None:
    mp.start_processes(_exchange, args=(str(tmp_path),), nprocs=4, start_method="spawn")
    passes = json.loads((tmp_path / "result.json").read_text())

    assert [p["most_bodies_in_flight"] for p in passes] == [1, 3, 3, 2]
    # Handed over in rank order, but posted as the headers came: the slow rank 1's body last
    # with room for all three, first (strictly in turn) with one slot.
    assert passes[0]["bodies_posted_for"] == [1, 2, 3] * 2
    assert [passes[1]["bodies_posted_for"][index] for index in (2, 5)] == [1, 1]
    for number, ((_, in_order), result) in enumerate(zip(WINDOWS, passes, strict=True)):
        for offset, seen in enumerate(result["rounds"]):
            round_index = 2 * number + offset
            by_rank = {entry["rank"]: entry for entry in seen}
            assert sorted(by_rank) == [1, 2, 3]
            if in_order:
                assert [entry["rank"] for entry in seen] == [1, 2, 3]
            else:
                assert seen[-1]["rank"] == 1  # taken as it arrived: the slow rank last
            for rank, codec in CODEC_OF_RANK.items():
                entry = by_rank[rank]
                if rank == 2 and offset == 1:
                    assert "HMAC" in entry["refused"]
                    continue
                values = _values(rank, round_index)
                expected = values if codec is None else codec.round_trip(values)
                assert entry["values"] == expected.tolist(), (number, rank)
                assert entry["extras"] == [float(rank)] * 3


def test_a_shared_window_slot_serves_every_kind_in_the_same_bytes() -> None:
    shared = SharedWindow(torch.device("cpu"))
    discriminator_change = shared.wire(1, 100)
    generator_change = shared.wire(1, 80)
    assert generator_change.data_ptr() == discriminator_change.data_ptr()
    assert shared.wire(2, 80).data_ptr() != generator_change.data_ptr()  # each slot its own bytes
    grown = shared.wire(1, 120)
    assert grown.numel() == 120 and shared.wire(1, 100).data_ptr() == grown.data_ptr()


def test_the_window_must_hold_at_least_one_upload() -> None:
    with pytest.raises(ValueError, match="at least 1, found 0"):
        UpdateReceiver(Transport.__new__(Transport), {}, 0, layout_of=lambda _: LAYOUT, max_norm=None, window=0)


@pytest.mark.slow
@pytest.mark.parametrize("coded", [True, False], ids=["coded", "float32"])
def test_entgan_trains_the_same_models_whatever_the_window(coded: bool, tmp_path: Path, cache_dir: Path) -> None:
    """EntGAN reads its uploads (D_k's and, with edge G, G_k's changes) in rank order, so the window
    may change when bodies cross, never what is summed: the runs end with the same G, to the bit.
    (float32: D_k's models, landing in the window's own buffers instead of the lent one.)"""
    from entgan.engine.launch import launch_local

    control = {"compression": {"enabled": True}, "edge_generator": {"enabled": True}} if coded else {}
    sums = []
    for window in (1, 3):
        config = tiny_config(rounds=3, control=control, engine={"upload_window": window})
        summary = launch_local(config, tmp_path / f"window-{window}", cache_dir=cache_dir, show_progress=False)
        assert summary["rounds"] == 3
        sums.append(summary["generator_sum"])
    assert sums[0] == sums[1]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["flgan", "mdgan"])
def test_methods_reading_uploads_as_they_arrive_run_with_a_window(
    algorithm: str, tmp_path: Path, cache_dir: Path
) -> None:
    """FL-GAN (G and D uploads) and MD-GAN (float32 feedback) on the same round loop, three uploads
    in flight: every round completes and nothing is refused."""
    from entgan.engine.launch import launch_local

    config = tiny_config(algorithm=algorithm, rounds=3, engine={"upload_window": 3})
    summary = launch_local(config, tmp_path / "run", cache_dir=cache_dir, show_progress=False)
    assert summary["rounds"] == 3
    assert summary["refused_updates"] == 0
