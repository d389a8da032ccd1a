"""DANCE / AC-GAN on the real multi-process engine: a G-node and three gossiping D-nodes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from entgan.algorithms.dance import CompressedGossip
from entgan.api import load_generator
from entgan.config import DanceConfig, RunConfig
from entgan.engine.compression import build_codec
from entgan.engine.launch import launch_local
from entgan.engine.parameters import flatten, model_tensors
from entgan.models import build_discriminator
from entgan.rundir import RunDirectory

from conftest import gloo_transport, tiny_config

pytestmark = pytest.mark.slow

ROUNDS = 3
HEADER_BYTES = 8  # one int64: the codec the sender announces


def _dance_config(**dance: Any) -> RunConfig:
    return tiny_config(algorithm="acgan-dance", rounds=ROUNDS, baselines={"dance": dance})


def _worker_digests(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted((run_dir / "workers").glob("rank-*.json"))]


def _discriminator_size(config: RunConfig) -> int:
    model = build_discriminator(config.model, config.image_shape, len(config.tasks))
    return flatten(model_tensors(model)).numel()


def _assert_every_round_finite(run_dir: Path, workers: list[int]) -> None:
    rows = RunDirectory(run_dir).metrics()
    assert [row["round"] for row in rows] == list(range(1, ROUNDS + 1))
    for row in rows:
        for key in ("g_loss", "d_loss", "g_fake_realness", "d_real_realness"):
            assert math.isfinite(row[key]), (row["round"], key)
        assert row["g_steps"] == 1 and row["refused_updates"] == 0
        for rank in workers:  # each D-node's report came up with its feedback
            assert math.isfinite(row[f"worker{rank}/d_loss"])
            assert row[f"worker{rank}/bytes_received"] > 0  # at least the round's fake batches


def test_compressed_gossip_moves_fewer_bytes_and_the_run_checkpoints(tmp_path: Path, cache_dir: Path) -> None:
    plain_config = _dance_config(codec="none", topology="ring")
    sparse_config = _dance_config(codec="topk", topk_ratio=0.1, topology="ring")

    plain = launch_local(plain_config, tmp_path / "none", cache_dir=cache_dir, show_progress=False)
    sparse = launch_local(sparse_config, tmp_path / "topk", cache_dir=cache_dir, show_progress=False)

    for run_dir in (tmp_path / "none", tmp_path / "topk"):
        _assert_every_round_finite(run_dir, workers=[1, 2, 3])
    # On a ring every D-node sends one header and one payload per round, booked at wire size.
    numel = _discriminator_size(plain_config)
    for name, run_dir in (("none", tmp_path / "none"), ("topk", tmp_path / "topk")):
        expected = ROUNDS * (HEADER_BYTES + build_codec(name, topk_ratio=0.1).payload_bytes(numel))
        for digest in _worker_digests(run_dir):
            assert digest["bytes_sent/gossip"] == expected
            assert digest["bytes_received/gossip"] == expected
            assert digest[f"gossip_codec/{name}"] == ROUNDS
    plain_gossip = sum(d["bytes_sent/gossip"] for d in _worker_digests(tmp_path / "none"))
    sparse_gossip = sum(d["bytes_sent/gossip"] for d in _worker_digests(tmp_path / "topk"))
    assert sparse_gossip < plain_gossip / 4  # 8 bytes per kept entry, 1 in 10 kept, vs 4 per entry
    # The codec is on the D-node links only: the G-node's fake batches and feedback are unchanged.
    assert sparse["server/bytes_sent"] == plain["server/bytes_sent"] > 0
    assert sparse["server/bytes_received"] == plain["server/bytes_received"] > 0
    assert "server/bytes_sent/gossip" not in sparse
    # Compression changed what the D-nodes learned from each other, hence G's training signal.
    assert sparse["generator_sum"] != plain["generator_sum"]
    # The G-node's checkpoint loads as a generator.
    _, generator = load_generator(tmp_path / "topk")
    loaded_sum = float(sum(t.double().sum() for t in generator.state_dict().values()))
    assert loaded_sum == pytest.approx(sparse["generator_sum"])
    assert generator.sample(0, 4).shape == (4, 1, 28, 28)


def test_dcgan_run_with_adaptive_codec_and_random_pairs(tmp_path: Path, cache_dir: Path) -> None:
    config = tiny_config(
        algorithm="acgan-dance",
        rounds=ROUNDS,
        model={"family": "dcgan", "hidden_dim": 8},
        baselines={"dance": {"codec": "auto", "topology": "random-pairs"}},
    )

    summary = launch_local(config, tmp_path / "run", cache_dir=cache_dir, show_progress=False)

    _assert_every_round_finite(tmp_path / "run", workers=[1, 2, 3])
    digests = _worker_digests(tmp_path / "run")
    # Three D-nodes in random pairs: each round one pair gossips (two sends) and one sits out.
    sends = sum(value for d in digests for key, value in d.items() if key.startswith("gossip_codec/"))
    assert sends == 2 * ROUNDS
    # A link that was used has a measured bandwidth, from which its next codec was chosen.
    assert any(key.startswith("gossip_bandwidth_to_rank") for d in digests for key in d)
    checkpoint = torch.load(RunDirectory(tmp_path / "run").latest_checkpoint(), weights_only=True)
    assert checkpoint["algorithm"] == "acgan-dance"
    assert set(checkpoint["server"]) == {"generator", "generator_optimizer", "latent_stream"}  # the G-node holds no D
    assert math.isfinite(summary["final_eval"]["fid/overall"])


GOSSIP_NODES, GOSSIP_ROUNDS, GOSSIP_SIZE = 3, 30, 2000


def _start(rank: int) -> torch.Tensor:
    return torch.randn(GOSSIP_SIZE, generator=torch.Generator().manual_seed(rank)) * (rank + 1)


def _gossip_node(rank: int, tmp: str) -> None:
    """A D-node without a GAN: ring gossip of a fixed vector, x := (1 - m) x + m * peer estimate."""
    with gloo_transport(rank, tmp, GOSSIP_NODES) as transport:
        results = {}
        for codec in ("none", "int8", "topk"):
            config = DanceConfig(codec=codec, topk_ratio=0.1, topology="ring", mixing=0.5)
            gossip = CompressedGossip(config, transport, initial=torch.zeros(GOSSIP_SIZE))
            vector = _start(rank)
            for _ in range(GOSSIP_ROUNDS):
                estimate = gossip.exchange(vector, (rank + 1) % GOSSIP_NODES, (rank - 1) % GOSSIP_NODES)
                vector = (1 - config.mixing) * vector + config.mixing * estimate
            results[codec] = {"vector": vector.tolist(), "digest": gossip.digest()}
        results["bytes_sent/gossip"] = transport.counters.sent["gossip"]
        Path(tmp, f"node{rank}.json").write_text(json.dumps(results))


def test_compressed_gossip_reaches_consensus(tmp_path: Path) -> None:
    mp.start_processes(_gossip_node, args=(str(tmp_path),), nprocs=GOSSIP_NODES, start_method="spawn")
    nodes = [json.loads((tmp_path / f"node{rank}.json").read_text()) for rank in range(GOSSIP_NODES)]

    mean = sum(_start(rank) for rank in range(GOSSIP_NODES)) / GOSSIP_NODES
    spread = max(float((_start(rank) - mean).abs().max()) for rank in range(GOSSIP_NODES))
    for codec, tolerance_to_mean in (("none", 1e-5), ("int8", 0.01 * spread), ("topk", None)):
        vectors = [torch.tensor(node[codec]["vector"]) for node in nodes]
        disagreement = max(float((vector - vectors[0]).abs().max()) for vector in vectors)
        assert disagreement < 1e-3 * spread, codec
        if tolerance_to_mean is not None:  # exact gossip on a ring keeps the average exactly
            assert max(float((vector - mean).abs().max()) for vector in vectors) < tolerance_to_mean, codec
        for node in nodes:
            assert node[codec]["digest"][f"gossip_codec/{codec}"] == GOSSIP_ROUNDS
    expected = GOSSIP_ROUNDS * sum(
        HEADER_BYTES + build_codec(codec, topk_ratio=0.1).payload_bytes(GOSSIP_SIZE) for codec in ("none", "int8", "topk")
    )
    assert all(node["bytes_sent/gossip"] == expected for node in nodes)
