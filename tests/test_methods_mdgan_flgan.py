"""MD-GAN and FL-GAN: the math of MD-GAN's error feedback and swaps, then real multi-process runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from entgan.gan import generator_loss
from entgan.algorithms.local_training import error_feedback
from entgan.algorithms.mdgan import average_gradients, backpropagate_feedback, swap_partners, swap_period
from entgan.api import load_generator
from entgan.config import ModelConfig
from entgan.engine.launch import launch_local
from entgan.models import build_discriminator, build_generator
from entgan.rundir import RunDirectory

from conftest import tiny_config

IMAGE_SHAPE = (1, 28, 28)
TINY_MODEL = ModelConfig(family="mlp", latent_dim=8, hidden_dim=16, task_embedding_dim=4)


# ---------------------------------------------------------------------- MD-GAN math, one process
def test_feedback_backpropagated_through_g_is_the_gradient_of_the_mean_generator_loss() -> None:
    torch.manual_seed(0)
    generator = build_generator(TINY_MODEL, IMAGE_SHAPE, num_tasks=2)
    tasks = [0, 0, 1]  # worker n serves tasks[n]
    discriminators = [build_discriminator(TINY_MODEL, IMAGE_SHAPE, num_tasks=2).eval() for _ in tasks]
    latents = [torch.randn(5, TINY_MODEL.latent_dim) for _ in tasks]

    # Distributed: each worker returns F_n on its batch; the server back-propagates every F_n.
    generator.zero_grad(set_to_none=True)
    for discriminator, z, task in zip(discriminators, latents, tasks, strict=True):
        fakes = generator(z, task)
        feedback, _, _ = error_feedback(discriminator, fakes, task)
        assert all(p.grad is None for p in discriminator.parameters())  # D is not trained by feedback
        backpropagate_feedback(fakes, feedback)
    average_gradients(generator, len(tasks))
    distributed = [p.grad.clone() for p in generator.parameters()]

    # One process: the mean of the workers' G losses, differentiated directly.
    generator.zero_grad(set_to_none=True)
    for discriminator in discriminators:
        discriminator.requires_grad_(False)
    losses = [
        generator_loss(discriminator, generator(z, task), task)[0]
        for discriminator, z, task in zip(discriminators, latents, tasks, strict=True)
    ]
    (sum(losses) / len(losses)).backward()
    direct = [p.grad for p in generator.parameters()]

    assert any(g.abs().sum() > 0 for g in direct)
    for got, expected in zip(distributed, direct, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_swap_partners_form_the_same_derangement_on_every_worker() -> None:
    for workers in range(2, 7):
        for swap_index in range(20):
            partners = swap_partners(workers, seed=3, swap_index=swap_index)
            assert sorted(partners) == list(range(workers))  # everyone sends one D and receives one
            assert all(target != source for source, target in enumerate(partners))  # nobody keeps its own
            assert partners == swap_partners(workers, seed=3, swap_index=swap_index)  # no coordinator needed
    draws = {tuple(swap_partners(5, seed=3, swap_index=index)) for index in range(20)}
    assert len(draws) > 1  # a fresh random pairing at each swap, not a fixed ring
    with pytest.raises(ValueError, match="at least 2 workers"):
        swap_partners(1, seed=3, swap_index=0)


def test_swap_period_counts_epochs_of_the_mean_shard() -> None:
    assert swap_period(1.0, [40, 40, 80], batch_size=16) == 3  # mean shard 53.3 samples / 16 per round
    assert swap_period(0.6, [40, 40, 80], batch_size=16) == 2
    assert swap_period(2.0, [64, 64], batch_size=64) == 2
    assert swap_period(0.01, [40], batch_size=16) == 1  # never more often than every round


# ---------------------------------------------------------------------- real runs
def _worker_digests(run_dir: Path) -> dict[int, dict]:
    digests = [json.loads(path.read_text()) for path in (run_dir / "workers").glob("rank-*.json")]
    return {digest["rank"]: digest for digest in digests}


def _check_rows_and_checkpoint(run_dir: Path, summary: dict, rounds: int) -> list[dict]:
    rows = RunDirectory(run_dir).metrics()
    assert [row["round"] for row in rows] == list(range(1, rounds + 1))
    for row in rows:
        for key in ("g_loss", "d_loss", "d_real_realness", "g_fake_realness"):
            assert math.isfinite(row[key]), (row["round"], key)
        for rank in (1, 2, 3):
            # A report counts the traffic since the worker's previous upload, that upload included.
            assert row[f"worker{rank}/bytes_sent"] > 0 or row["round"] == 1
            assert row[f"worker{rank}/bytes_received"] > 0 or row["round"] == 1
        assert row["refused_updates"] == 0
    assert "fid/overall" in rows[-1]
    _, generator = load_generator(run_dir)
    assert float(sum(t.double().sum() for t in generator.state_dict().values())) == pytest.approx(
        summary["generator_sum"], rel=1e-9, abs=1e-9
    )
    return rows


@pytest.mark.slow
def test_mdgan_run_moves_fakes_and_feedback_and_swaps_discriminators_every_e_epochs(
    tmp_path: Path, cache_dir: Path
) -> None:
    # Shards of 40, 40 and 80 images at 16 per round: 0.6 epochs of the mean shard = 2 rounds.
    config = tiny_config(algorithm="mdgan", rounds=4, baselines={"mdgan": {"swap_every_epochs": 0.6}})
    run_dir = tmp_path / "run"

    summary = launch_local(config, run_dir, cache_dir=cache_dir, show_progress=False)

    rows = _check_rows_and_checkpoint(run_dir, summary, rounds=4)
    assert all(row["g_steps"] == 1 for row in rows)  # one G step per round, from all the feedback
    batch_bytes = 16 * 28 * 28 * 4
    assert summary["server/bytes_sent/fake-batch"] == 4 * 3 * 2 * batch_bytes  # rounds x workers x (X(d), X(g))
    assert summary["server/bytes_received/feedback"] >= 4 * 3 * batch_bytes  # dL/dx for every X(g) image
    assert "server/bytes_sent/generator" not in summary  # G's parameters never leave the server

    digests = _worker_digests(run_dir)
    assert sorted(digests) == [1, 2, 3]
    for digest in digests.values():
        assert digest["swap_period"] == 2
        assert (digest["swaps"], digest["first_swap_round"], digest["last_swap_round"]) == (2, 2, 4)
        assert digest["bytes_sent/gossip"] == digest["bytes_received/gossip"] > 0
    # The swap after the last round (the second swap) is traceable: the D that worker n sent is
    # exactly the D that worker pi(n) ends with.
    partners = swap_partners(3, seed=config.seed, swap_index=1)
    for index, target in enumerate(partners):
        sent = digests[index + 1]["last_sent_discriminator_sum"]
        assert digests[target + 1]["discriminator_sum"] == pytest.approx(sent, rel=1e-12, abs=1e-12)
        assert digests[index + 1]["discriminator_sum"] != pytest.approx(sent, rel=1e-9)


@pytest.mark.slow
def test_flgan_run_averages_g_and_d_and_workers_end_with_the_servers_models(tmp_path: Path, cache_dir: Path) -> None:
    config = tiny_config(algorithm="flgan", rounds=3, baselines={"flgan": {"local_steps": 2}})
    run_dir = tmp_path / "run"

    summary = launch_local(config, run_dir, cache_dir=cache_dir, show_progress=False)

    rows = _check_rows_and_checkpoint(run_dir, summary, rounds=3)
    assert all(row["g_steps"] == 2 for row in rows)  # one engine round = one sync period of E local steps
    for kind in ("bytes_received/generator", "bytes_received/discriminator-update",
                 "bytes_sent/generator", "bytes_sent/discriminator"):
        assert summary[f"server/{kind}"] > 0
    checkpoint = torch.load(RunDirectory(run_dir).latest_checkpoint(), weights_only=True)
    server_d_sum = float(sum(t.double().sum() for t in checkpoint["server"]["discriminator"].values()))
    for digest in _worker_digests(run_dir).values():
        # After the final synchronisation every G_k is the server's G, every D_k the server's D.
        assert digest["generator_sum"] == pytest.approx(summary["generator_sum"], rel=1e-9, abs=1e-9)
        assert digest["discriminator_sum"] == pytest.approx(server_d_sum, rel=1e-9, abs=1e-9)
    torch.manual_seed(config.seed)
    initial = build_generator(config.model, config.image_shape, len(config.tasks))
    initial_sum = float(sum(t.double().sum() for t in initial.state_dict().values()))
    assert summary["generator_sum"] != pytest.approx(initial_sum, rel=1e-6)  # the average did move G


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["mdgan", "flgan"])
def test_dcgan_models_run(tmp_path: Path, cache_dir: Path, algorithm: str) -> None:
    """Convolutional nets with BatchNorm in G (running statistics generated / averaged)."""
    config = tiny_config(
        algorithm=algorithm,
        rounds=2,
        model={"family": "dcgan", "hidden_dim": 8},
        baselines={"flgan": {"local_steps": 1}},
        eval={"every": 2},
        checkpoint={"every": 0},
    )

    summary = launch_local(config, tmp_path / "run", cache_dir=cache_dir, show_progress=False)

    rows = RunDirectory(tmp_path / "run").metrics()
    assert [row["round"] for row in rows] == [1, 2]
    assert all(math.isfinite(row["g_loss"]) and math.isfinite(row["d_loss"]) for row in rows)
    assert math.isfinite(summary["final_eval"]["fid/overall"])
