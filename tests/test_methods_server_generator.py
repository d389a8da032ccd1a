"""Ren et al. (serial, parallel), Distributed-GAN (approaches 1-3) and the central reference.

Fast tests check the math these methods add (selection of the largest update entries, their
per-entry average, averaged discriminator outputs, routing by task, turn order, pooled batches);
the slow ones run each method for real (1 server + 3 workers) and check what moved where.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from entgan.algorithms.aggregation import DiscriminatorLayout, InPlaceDiscriminatorAverage
from entgan.algorithms.central import PooledBatches
from entgan.algorithms.dgan import (
    AveragedOutputs,
    EachInTurnServer,
    SelectedUpdateAverager,
    TaskRoutedCritic,
    pack_selected,
    select_largest,
    selected_count,
    unpack_selected,
)
from entgan.algorithms.server_generator import StepsPerRound
from entgan.api import load_generator
from entgan.config import ConfigError, ModelConfig
from entgan.data import build_tasks, load_source
from entgan.engine.launch import check_capabilities, launch_local, preflight
from entgan.engine.registry import method_class
from entgan.engine.parameters import flatten, model_tensors
from entgan.models import build_discriminator, build_generator
from entgan.rundir import RunDirectory

from conftest import tiny_config

IMAGE_SHAPE = (1, 28, 28)


def _discriminator(seed: int, num_tasks: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    return build_discriminator(ModelConfig(hidden_dim=4), IMAGE_SHAPE, num_tasks)


# ------------------------------------------------------------------ dgan-1: selective updates
def test_select_largest_keeps_the_largest_magnitudes_in_index_order() -> None:
    update = torch.tensor([0.1, -5.0, 0.3, 4.0, -0.2, 0.0, 2.0, -0.05, 0.01, 1.0])

    indices, values = select_largest(update, 0.3)

    assert indices.tolist() == [1, 3, 6]
    assert values.tolist() == [-5.0, 4.0, 2.0]
    assert selected_count(10, 0.01) == 1  # at least one entry goes up
    assert selected_count(10, 1.0) == 10
    with pytest.raises(ValueError, match="select_fraction"):
        selected_count(10, 0.0)


def test_packed_selection_round_trips_exactly_even_for_large_indices() -> None:
    indices = torch.tensor([0, 7, 2**24 + 3, 2**30 + 1])  # beyond float32's exact integers
    values = torch.tensor([1.5, -2.0, 3.25, 1e-8])

    payload = pack_selected(indices, values)
    got_indices, got_values = unpack_selected(payload)

    assert payload.dtype == torch.float32 and payload.numel() == 8
    assert torch.isfinite(payload).all()  # the engine's envelope refuses non-finite values
    assert got_indices.tolist() == indices.tolist()
    assert torch.equal(got_values, values)


def test_selecting_everything_gives_the_same_discriminator_as_averaging() -> None:
    start = _discriminator(0)
    layout = DiscriminatorLayout(start)
    workers = [_discriminator(seed) for seed in (1, 2, 3)]
    tasks, samples = [0, 0, 1], [10.0, 30.0, 20.0]
    averager = InPlaceDiscriminatorAverage(layout, num_tasks=2)
    selected = SelectedUpdateAverager(layout)
    expected, got = _discriminator(0), _discriminator(0)
    for worker, task, count in zip(workers, tasks, samples):
        update = flatten(layout.update_tensors(worker, task))
        averager.add(expected, update, task, count)
        delta = update - flatten(layout.update_tensors(start, task))
        selected.add(*select_largest(delta, 1.0), task, count)

    averager.finish(expected)
    selected.apply_to(got)

    for want, have in zip(model_tensors(expected), model_tensors(got)):
        assert torch.allclose(want, have, atol=1e-6)


def test_each_entry_moves_by_the_mean_of_the_updates_uploaded_for_it() -> None:
    start = _discriminator(0)
    layout = DiscriminatorLayout(start)
    trunk, head = layout.trunk_size, layout.head_size
    selected = SelectedUpdateAverager(layout)
    # Two task-0 workers (weights 1 and 3) share entry 0; entry 1 comes from the first only.
    selected.add(torch.tensor([0, 1]), torch.tensor([4.0, 2.0]), task=0, num_samples=1.0)
    selected.add(torch.tensor([0, trunk]), torch.tensor([8.0, -1.0]), task=0, num_samples=3.0)
    # A task-1 worker's head entry lands in head 1, not head 0.
    selected.add(torch.tensor([trunk]), torch.tensor([5.0]), task=1, num_samples=2.0)

    step = selected.mean_update()

    assert step[0] == pytest.approx((1 * 4.0 + 3 * 8.0) / 4)
    assert step[1] == pytest.approx(2.0)  # Shokri's rule when a single worker uploads an entry
    assert step[trunk] == pytest.approx(-1.0)  # head 0, first entry
    assert step[trunk + head] == pytest.approx(5.0)  # head 1, first entry
    assert int((step != 0).sum()) == 4  # nobody else's entries moved
    with pytest.raises(ValueError, match="indices"):
        selected.add(torch.tensor([layout.update_size]), torch.tensor([1.0]), task=0, num_samples=1.0)


# ------------------------------------------------------- dgan-2 / dgan-3: several discriminators
class _ConstantCritic(nn.Module):
    """Logit `value` for every image, with a gradient path through the images."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, images: torch.Tensor, task: torch.Tensor | int) -> torch.Tensor:
        return images.flatten(1).sum(1) * 0 + self.value


def test_averaged_outputs_is_the_logit_of_the_weighted_mean_probability() -> None:
    critics = [_ConstantCritic(2.0), _ConstantCritic(-1.0), _ConstantCritic(0.5)]
    weights = [1.0, 2.0, 1.0]
    images = torch.randn(5, *IMAGE_SHAPE, requires_grad=True)

    logits = AveragedOutputs(critics, weights)(images, 0)

    expected = (1 * torch.sigmoid(torch.tensor(2.0)) + 2 * torch.sigmoid(torch.tensor(-1.0))
                + torch.sigmoid(torch.tensor(0.5))) / 4
    assert torch.allclose(torch.sigmoid(logits), expected.expand(5), atol=1e-6)
    assert torch.allclose(AveragedOutputs(critics[:1], [3.0])(images, 0), torch.full((5,), 2.0))


def test_averaged_outputs_of_real_discriminators_gives_finite_generator_gradients() -> None:
    discriminators = [_discriminator(seed) for seed in (1, 2)]
    generator = build_generator(ModelConfig(hidden_dim=4, latent_dim=4, task_embedding_dim=2), IMAGE_SHAPE, 2)
    fakes = generator(torch.randn(6, 4), 1)

    logits = AveragedOutputs(discriminators, [1.0, 1.0])(fakes, 1)
    logits.sum().backward()

    probability = (torch.sigmoid(discriminators[0](fakes, 1)) + torch.sigmoid(discriminators[1](fakes, 1))) / 2
    assert torch.allclose(torch.sigmoid(logits), probability, atol=1e-5)
    assert all(torch.isfinite(p.grad).all() for p in generator.parameters() if p.grad is not None)


def test_task_routed_critic_scores_each_image_with_its_own_tasks_critic() -> None:
    critic = TaskRoutedCritic([_ConstantCritic(-3.0), _ConstantCritic(7.0)])
    images = torch.randn(5, *IMAGE_SHAPE, requires_grad=True)
    tasks = torch.tensor([1, 0, 0, 1, 1])

    logits = critic(images, tasks)
    logits.sum().backward()

    assert logits.tolist() == [7.0, -3.0, -3.0, 7.0, 7.0]
    assert images.grad is not None


def test_each_discriminator_of_a_task_takes_its_turn_across_rounds() -> None:
    method = EachInTurnServer.__new__(EachInTurnServer)  # only the turn logic, no engine
    method.discriminators = {rank: _ConstantCritic(float(rank)) for rank in (1, 2, 3)}
    method.users_of_task = [[1, 2], [3]]
    method.steps = StepsPerRound(d_steps=1, g_steps=3)
    method.turn = 0

    rounds = [method.critics_for_round() for _ in range(2)]

    chosen = [[[int(c.value) for c in critic.critics] for critic in critics] for critics in rounds]
    assert chosen == [[[1, 3], [2, 3], [1, 3]], [[2, 3], [1, 3], [2, 3]]]


# ------------------------------------------------------------------ shared pieces and central
def test_steps_per_round_are_entgans_with_its_schedulers_off() -> None:
    config = tiny_config(control={"worker_scheduler": {"d_steps": 3}, "server_scheduler": {"g_steps": 4}})

    assert StepsPerRound.from_config(config) == StepsPerRound(d_steps=3, g_steps=4)


def test_baselines_refuse_features_they_do_not_implement(tmp_path: Path) -> None:
    """Refused before any process starts, from the capabilities each method declares."""
    with pytest.raises(ConfigError, match="privacy.enabled"):
        preflight(tiny_config(algorithm="dgan-2", privacy={"enabled": True}))
    for algorithm in ("central", "mdgan", "flgan", "ren-serial", "acgan-dance"):
        config = tiny_config(algorithm=algorithm, warm_start={"checkpoint": str(tmp_path / "latest.pt")})
        with pytest.raises(ConfigError, match="warm_start"):
            check_capabilities(config, method_class(algorithm))


def test_pooled_batches_hold_every_task_equally_with_matching_task_ids() -> None:
    config = tiny_config()
    tasks = build_tasks(config, load_source(config.data))

    batches = PooledBatches(tasks, 6, torch.Generator().manual_seed(0), torch.device("cpu"))
    images, task_ids = batches.next()

    assert task_ids.tolist() == [0, 0, 0, 1, 1, 1]
    for image, task in zip(images, task_ids.tolist()):
        assert (tasks[task].dataset.images == image).flatten(1).all(1).any()  # drawn from its own task
    with pytest.raises(ValueError, match="batch_size"):
        PooledBatches(tasks, 1, torch.Generator(), torch.device("cpu"))


# ------------------------------------------------------------------ real multi-process runs
SERVER_GENERATOR_METHODS = ["ren-serial", "ren-parallel", "dgan-1", "dgan-2", "dgan-3"]
"""The methods whose workers hold a copy of G (all but `central`)."""

D_COMES_DOWN = {"ren-serial", "ren-parallel", "dgan-1"}
"""The methods whose server sends its D to every worker each round."""


def _worker_digests(run_dir: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((run_dir / "workers").glob("rank-*.json"))]


def _state_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model_tensors(module))


def _digest_sum(state: dict[str, torch.Tensor]) -> float:
    return float(flatten(list(state.values())).double().sum())


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", [*SERVER_GENERATOR_METHODS, "central"])
def test_method_runs_end_to_end_and_moves_what_its_paper_says(
    tmp_path: Path, cache_dir: Path, algorithm: str
) -> None:
    config = tiny_config(algorithm=algorithm, rounds=3)
    run_dir = tmp_path / "run"

    summary = launch_local(config, run_dir, cache_dir=cache_dir, show_progress=False)

    rows = RunDirectory(run_dir).metrics()
    assert [row["round"] for row in rows] == [1, 2, 3]
    for row in rows:
        for key in ("g_loss", "d_loss", "g_fake_realness", "d_real_realness", "d_fake_realness"):
            assert math.isfinite(row[key]), key
        assert row["g_steps"] == config.control.server_scheduler.g_steps
    # The checkpoint holds the final G, and the public API loads it.
    _, generator = load_generator(run_dir)
    assert _digest_sum(generator.state_dict()) == pytest.approx(summary["generator_sum"])
    server_state = torch.load(RunDirectory(run_dir).latest_checkpoint(), weights_only=True)["server"]
    assert {"generator", "generator_optimizer"} <= set(server_state)

    workers = config.num_workers
    g_bytes = _state_bytes(generator)
    d_bytes = _state_bytes(build_discriminator(config.model, config.image_shape, len(config.tasks)))
    if algorithm == "central":
        # Pooled data, no exchange: no model or update moved (only the engine's own messages).
        assert not any(key.startswith(("server/bytes_sent/", "server/bytes_received/")) and
                       any(kind in key for kind in ("generator", "discriminator")) for key in summary)
        assert {"discriminator", "discriminator_optimizer"} <= set(server_state)
        return

    # G went down at the start and after every round; D too where the method sends it.
    assert summary["server/bytes_sent/generator"] == (config.rounds + 1) * workers * g_bytes
    d_sends = config.rounds + 1 if algorithm in D_COMES_DOWN else 1
    assert summary["server/bytes_sent/discriminator"] == d_sends * workers * d_bytes
    uploaded = summary["server/bytes_received/discriminator-update"]
    layout = DiscriminatorLayout(build_discriminator(config.model, config.image_shape, len(config.tasks)))
    full_uploads = config.rounds * workers * layout.update_size * 4
    if algorithm == "dgan-1":  # selected values + their indices, and the envelope
        fraction = config.baselines.dgan.select_fraction
        assert 2 * fraction * full_uploads < uploaded < (2 * fraction + 0.05) * full_uploads
    else:
        assert full_uploads < uploaded < 1.05 * full_uploads
    for row in rows:
        assert row["refused_updates"] == 0
        for rank in range(1, workers + 1):
            assert math.isfinite(row[f"worker{rank}/d_loss"]) and row[f"worker{rank}/compute_s"] > 0
    for row in rows[1:]:  # a report counts the previous round's upload and this round's receives
        assert row["workers/bytes_sent"] > 0 and row["workers/bytes_received"] >= workers * g_bytes

    # Every worker ends with exactly the server's final G.
    digests = _worker_digests(run_dir)
    assert [d["rank"] for d in digests] == list(range(1, workers + 1))
    for digest in digests:
        assert digest["generator_sum"] == pytest.approx(summary["generator_sum"], rel=1e-9, abs=1e-9)
    # Discriminators: a global D reached every worker; or the server holds each worker's own.
    if algorithm in D_COMES_DOWN:
        for digest in digests:
            assert digest["discriminator_sum"] == pytest.approx(_digest_sum(server_state["discriminator"]), abs=1e-6)
    else:
        copies = server_state["discriminators"]
        assert sorted(copies) == [str(rank) for rank in range(1, workers + 1)]
        for digest in digests:
            assert digest["discriminator_sum"] == pytest.approx(_digest_sum(copies[str(digest["rank"])]), abs=1e-6)
        assert len({round(d["discriminator_sum"], 6) for d in digests}) == workers  # each D_k its own


@pytest.mark.slow
def test_dcgan_models_fit_the_several_discriminator_critic(tmp_path: Path, cache_dir: Path) -> None:
    config = tiny_config(algorithm="dgan-2", rounds=2, model={"family": "dcgan", "hidden_dim": 8})

    summary = launch_local(config, tmp_path / "run", cache_dir=cache_dir, show_progress=False)

    rows = RunDirectory(tmp_path / "run").metrics()
    assert all(math.isfinite(row["g_loss"]) and math.isfinite(row["d_loss"]) for row in rows)
    for digest in _worker_digests(tmp_path / "run"):
        assert digest["generator_sum"] == pytest.approx(summary["generator_sum"], rel=1e-9, abs=1e-9)
