"""MD-GAN and FL-GAN: the math of MD-GAN's error feedback and swaps, then real multi-process runs."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from entgan.gan import generator_loss
from entgan.algorithms.local_training import discriminator_step, error_feedback, generator_step, local_game_step
from entgan.algorithms.mdgan import (
    average_gradients,
    deal_batches,
    default_batches_per_task,
    swap_partners,
    swap_period,
)
from entgan.gan.feedback import FakesAwaitingFeedback
from entgan.api import load_generator
from entgan.config import ModelConfig
from entgan.engine.launch import launch_local
from entgan.models import build_discriminator, build_generator
from entgan.rundir import RunDirectory

from conftest import tiny_config

IMAGE_SHAPE = (1, 28, 28)
TINY_MODEL = ModelConfig(family="mlp", latent_dim=8, hidden_dim=16, task_embedding_dim=4)


# ---------------------------------------------------------------------- MD-GAN math, one process
@pytest.mark.parametrize("graphs", ["held", "recomputed"])
def test_feedback_backpropagated_through_g_is_the_gradient_of_the_mean_generator_loss(graphs: str) -> None:
    torch.manual_seed(0)
    generator = build_generator(TINY_MODEL, IMAGE_SHAPE, num_tasks=2)
    tasks = [0, 0, 1]  # worker n serves tasks[n]
    discriminators = [build_discriminator(TINY_MODEL, IMAGE_SHAPE, num_tasks=2) for _ in tasks]
    latents = [torch.randn(5, TINY_MODEL.latent_dim) for _ in tasks]

    # Distributed: each worker returns F_n on its batch; the server back-propagates every F_n.
    generator.zero_grad(set_to_none=True)
    for discriminator, z, task in zip(discriminators, latents, tasks, strict=True):
        fakes = FakesAwaitingFeedback(generator, z, task, graphs)  # type: ignore[arg-type]
        assert fakes.holds_graph == (graphs == "held")
        feedback, _, _ = error_feedback(discriminator, fakes.images, task)
        assert all(p.grad is None for p in discriminator.parameters())  # D is not trained by feedback
        assert discriminator.training  # put back in train mode after the eval-mode feedback
        fakes.backpropagate(feedback)
        with pytest.raises(RuntimeError, match="already"):
            fakes.backpropagate(feedback)  # nothing of the batch is kept once used
    average_gradients(generator, len(tasks))
    distributed = [p.grad.clone() for p in generator.parameters()]

    # One process: the mean of the workers' G losses (D in eval mode), differentiated directly.
    generator.zero_grad(set_to_none=True)
    for discriminator in discriminators:
        discriminator.requires_grad_(False).eval()
    losses = [
        generator_loss(discriminator, generator(z, task), task)[0]
        for discriminator, z, task in zip(discriminators, latents, tasks, strict=True)
    ]
    (sum(losses) / len(losses)).backward()
    direct = [p.grad for p in generator.parameters()]

    assert any(g.abs().sum() > 0 for g in direct)
    for got, expected in zip(distributed, direct, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_feedback_is_computed_with_dropout_off() -> None:
    torch.manual_seed(1)
    discriminator = build_discriminator(TINY_MODEL, IMAGE_SHAPE, num_tasks=2)
    assert any(isinstance(module, torch.nn.Dropout) and module.p > 0 for module in discriminator.modules())
    fakes = torch.rand(6, *IMAGE_SHAPE) * 2 - 1
    feedback, loss, _ = error_feedback(discriminator, fakes, task=1)

    images = fakes.clone().requires_grad_(True)
    discriminator.eval()
    eval_loss, _ = generator_loss(discriminator, images, 1)
    (eval_feedback,) = torch.autograd.grad(eval_loss, images)
    torch.testing.assert_close(feedback, eval_feedback, rtol=0, atol=0)
    assert loss == pytest.approx(eval_loss.item(), rel=1e-6)

    # The train-mode gradient (what the feedback was before) carries dropout's random masks.
    discriminator.train()
    train_loss, _ = generator_loss(discriminator, images, 1)
    (train_feedback,) = torch.autograd.grad(train_loss, images)
    assert not torch.allclose(train_feedback, eval_feedback)


def test_local_game_step_runs_g_once_and_trains_g_on_its_tasks_fakes_only() -> None:
    """One forward of G serves the D step and the G step (the textbook loop, FL-GAN's and EntGAN's
    edge steps); the G step is the one a separate pass over this task's fakes alone would take."""
    torch.manual_seed(3)
    generator = build_generator(TINY_MODEL, IMAGE_SHAPE, num_tasks=2)
    discriminator = build_discriminator(TINY_MODEL, IMAGE_SHAPE, num_tasks=2)
    reference, initial = (copy.deepcopy(generator), copy.deepcopy(discriminator)), copy.deepcopy(generator)
    real, latents = torch.rand(6, *IMAGE_SHAPE) * 2 - 1, torch.randn(6, TINY_MODEL.latent_dim)
    tasks = torch.tensor([1, 1, 0, 1, 0, 1])  # task 1's worker; task 0's fakes are negatives for its head
    forwards = []
    generator.register_forward_hook(lambda module, args, output: forwards.append(output.shape[0]))

    def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=0.1)

    torch.manual_seed(4)  # D's dropout masks, the same in both passes
    _, _, fakes = local_game_step(generator, discriminator, (sgd(generator), sgd(discriminator)), real, latents, tasks, 1)

    assert forwards == [6] and not fakes.requires_grad
    expected_g, expected_d = reference
    torch.manual_seed(4)
    discriminator_step(expected_d, sgd(expected_d), real, expected_g(latents, tasks), 1)
    own = tasks == 1
    generator_step(sgd(expected_g), expected_d, expected_g(latents[own], tasks[own]), 1)
    for model, expected in ((generator, expected_g), (discriminator, expected_d)):
        for got, want in zip(model.parameters(), expected.parameters(), strict=True):
            torch.testing.assert_close(got, want)
    assert any(not torch.equal(a, b) for a, b in zip(generator.parameters(), initial.parameters(), strict=True))


def test_recomputed_fakes_match_held_ones_with_batchnorm_and_move_its_statistics_once() -> None:
    model = ModelConfig(family="dcgan", latent_dim=8, hidden_dim=8, task_embedding_dim=4)
    torch.manual_seed(2)
    reference = build_generator(model, IMAGE_SHAPE, num_tasks=2)
    z, feedback = torch.randn(4, 8), torch.randn(4, *IMAGE_SHAPE)
    results = {}
    for graphs in ("held", "recomputed"):
        generator = build_generator(model, IMAGE_SHAPE, num_tasks=2)
        generator.load_state_dict(reference.state_dict())
        fakes = FakesAwaitingFeedback(generator, z, 1, graphs)  # type: ignore[arg-type]
        fakes.backpropagate(feedback)
        results[graphs] = (fakes.images, [p.grad for p in generator.parameters()], [b.clone() for b in generator.buffers()])
    held, recomputed = results["held"], results["recomputed"]
    torch.testing.assert_close(recomputed[0], held[0], rtol=0, atol=0)  # the recomputed X is the one sent
    for a, b in zip(recomputed[1], held[1], strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(recomputed[2], held[2], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # running statistics moved once, as when held
    assert any(not torch.equal(a, b) for a, b in zip(held[2], reference.buffers()))


def test_a_tasks_workers_get_two_distinct_batches_each_out_of_its_k_batches() -> None:
    for workers in range(1, 9):
        for batches in range(1, 7):
            dealt = deal_batches(workers, batches)
            assert len(dealt) == workers
            used = {index for pair in dealt for index in pair}
            assert used <= set(range(batches))  # drawn from the task's k_t batches, no more
            answered = {answer for _, answer in dealt}
            assert len(answered) <= batches  # graphs held for the task: at most k_t
            if batches >= 2:
                assert all(d != g for d, g in dealt)
            if batches <= 2 * workers:
                assert used == set(range(batches))  # every batch generated is used
    assert [default_batches_per_task(n) for n in (1, 2, 4, 8, 16)] == [2, 2, 2, 3, 4]


def test_swap_partners_derange_within_each_task_and_agree_on_every_worker() -> None:
    for worker_tasks in ([0, 0], [0, 1, 0, 1], [0, 0, 0, 1, 1, 2], [1, 0, 1, 1, 0, 0, 1]):
        for swap_index in range(20):
            partners = swap_partners(worker_tasks, seed=3, swap_index=swap_index)
            assert sorted(partners) == list(range(len(worker_tasks)))  # everyone sends one D and receives one
            for source, target in enumerate(partners):
                assert worker_tasks[target] == worker_tasks[source]  # only within a task
                alone = worker_tasks.count(worker_tasks[source]) == 1
                assert (target == source) == alone  # nobody keeps its own D, unless alone in its task
            assert partners == swap_partners(worker_tasks, seed=3, swap_index=swap_index)  # no coordinator
    draws = {tuple(swap_partners([0] * 5, seed=3, swap_index=index)) for index in range(20)}
    assert len(draws) > 1  # a fresh random pairing at each swap, not a fixed ring


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
    # k_t = 2 for both tasks: workers 1 and 2 (task "low") both answer batch 1 of their task, worker 3
    # ("high") batch 1 of its own: two graphs held while the feedback is out.
    assert all(row["feedback_graphs_held"] == 2 for row in rows)
    batch_bytes = 16 * 28 * 28 * 4
    assert summary["server/bytes_sent/fake-batch"] == 4 * 3 * 2 * batch_bytes  # rounds x workers x (X(d), X(g))
    assert summary["server/bytes_received/feedback"] >= 4 * 3 * batch_bytes  # dL/dx for every X(g) image
    assert "server/bytes_sent/generator" not in summary  # G's parameters never leave the server

    digests = _worker_digests(run_dir)
    assert sorted(digests) == [1, 2, 3]
    fakes = {rank: (d["last_fakes_for_discriminator_sum"], d["last_fakes_for_generator_sum"]) for rank, d in digests.items()}
    assert fakes[1] == fakes[2]  # a task's workers share its batches
    assert fakes[1][0] != fakes[1][1] and fakes[3][0] != fakes[3][1]  # two distinct batches each
    assert not set(fakes[3]) & set(fakes[1])  # the other task's batches are its own
    for rank in (1, 2):  # task "low": two workers, who swap with each other every 2 rounds
        assert digests[rank]["swap_period"] == 2
        assert (digests[rank]["swaps"], digests[rank]["first_swap_round"], digests[rank]["last_swap_round"]) == (2, 2, 4)
        assert digests[rank]["bytes_sent/gossip"] == digests[rank]["bytes_received/gossip"] > 0
    assert digests[3]["swaps"] == 0 and digests[3].get("bytes_sent/gossip", 0) == 0  # alone in its task
    # The swap after the last round is traceable: the D that worker 1 sent is the D worker 2 ends with.
    partners = swap_partners(config.worker_tasks(), seed=config.seed, swap_index=1)
    assert partners == [1, 0, 2]
    for index in (0, 1):
        sent = digests[index + 1]["last_sent_discriminator_sum"]
        assert digests[partners[index] + 1]["discriminator_sum"] == pytest.approx(sent, rel=1e-12, abs=1e-12)
        assert digests[index + 1]["discriminator_sum"] != pytest.approx(sent, rel=1e-9)


@pytest.mark.slow
def test_mdgan_with_recomputed_feedback_graphs_matches_held_graphs(tmp_path: Path, cache_dir: Path) -> None:
    rows = {}
    for graphs in ("held", "recomputed"):
        config = tiny_config(algorithm="mdgan", rounds=3, eval={"every": 3}, engine={"feedback_graphs": graphs})
        summary = launch_local(config, tmp_path / graphs, cache_dir=cache_dir, show_progress=False)
        rows[graphs] = (RunDirectory(tmp_path / graphs).metrics(), summary["generator_sum"])
    assert all(row["feedback_graphs_held"] == 0 for row in rows["recomputed"][0])
    assert rows["recomputed"][1] == pytest.approx(rows["held"][1], rel=1e-6)
    for held, recomputed in zip(rows["held"][0], rows["recomputed"][0], strict=True):
        assert recomputed["g_loss"] == pytest.approx(held["g_loss"], rel=1e-5)


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
def test_flgan_with_entgans_coded_transfers_moves_a_quarter_and_keeps_workers_at_the_servers_models(
    tmp_path: Path, cache_dir: Path
) -> None:
    plain_config = tiny_config(algorithm="flgan", rounds=3, baselines={"flgan": {"local_steps": 2}})
    coded_config = tiny_config(
        algorithm="flgan", rounds=3, baselines={"flgan": {"local_steps": 2, "compression": {"enabled": True}}}
    )
    plain = launch_local(plain_config, tmp_path / "plain", cache_dir=cache_dir, show_progress=False)

    coded = launch_local(coded_config, tmp_path / "coded", cache_dir=cache_dir, show_progress=False)

    rounds = coded_config.rounds
    for kind in ("bytes_sent/generator", "bytes_sent/discriminator"):  # the exact start, then int8
        start = plain[f"server/{kind}"] / (rounds + 1)
        assert (coded[f"server/{kind}"] - start) / rounds < 0.27 * start, kind
    for kind in ("bytes_received/generator", "bytes_received/discriminator-update"):  # int8 changes
        assert coded[f"server/{kind}"] < 0.27 * plain[f"server/{kind}"], kind
    assert math.isfinite(coded["final_eval"]["fid/overall"])
    for digest in _worker_digests(tmp_path / "coded").values():  # G_k is the server's G up to int8
        assert digest["generator_sum"] == pytest.approx(coded["generator_sum"], rel=2e-2, abs=2e-2)
    rows = RunDirectory(tmp_path / "coded").metrics()
    assert all(row["refused_updates"] == 0 for row in rows)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("algorithm", "coded"), [("mdgan", False), ("flgan", False), ("flgan", True)], ids=["mdgan", "flgan", "flgan-coded"]
)
def test_dcgan_models_run(tmp_path: Path, cache_dir: Path, algorithm: str, coded: bool) -> None:
    """Convolutional nets with BatchNorm in G (running statistics generated / averaged). Coded, with
    many local steps: G's change carries BatchNorm's step counter, an integer that once set its
    int8 chunk's scale, sent a variance below 0 and G's samples to NaN."""
    config = tiny_config(
        algorithm=algorithm,
        rounds=2,
        model={"family": "dcgan", "hidden_dim": 8},
        baselines={"flgan": {"local_steps": 40 if coded else 1, "compression": {"enabled": coded}}},
        eval={"every": 2},
        checkpoint={"every": 0},
    )

    summary = launch_local(config, tmp_path / "run", cache_dir=cache_dir, show_progress=False)

    rows = RunDirectory(tmp_path / "run").metrics()
    assert [row["round"] for row in rows] == [1, 2]
    assert all(math.isfinite(row["g_loss"]) and math.isfinite(row["d_loss"]) for row in rows)
    assert math.isfinite(summary["final_eval"]["fid/overall"])
