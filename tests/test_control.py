"""Control modules' decisions: worker and server task schedulers, non-IID peer selection and update."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from entgan.config import ModelConfig, NonIIDConfig, ServerSchedulerConfig, StragglerAwareConfig, WorkerSchedulerConfig
from entgan.control.noniid import NonIIDOptimizer
from entgan.control.schedulers import (
    GeneratorFeedback,
    RoundParticipation,
    ServerTaskScheduler,
    WorkerTaskScheduler,
    local_steps,
)
from entgan.models import build_discriminator
from conftest import tiny_config


def test_worker_scheduler_on_generates_once_and_reuses_fakes() -> None:
    plan = WorkerTaskScheduler(WorkerSchedulerConfig(d_steps=5, fake_reuse=2)).plan(0)

    assert plan.generate_upfront
    assert plan.fake_batches == 3
    assert [plan.fake_batch_for_step(s) for s in range(5)] == [0, 0, 1, 1, 2]


def test_worker_scheduler_off_uses_a_fresh_batch_per_step() -> None:
    plan = WorkerTaskScheduler(WorkerSchedulerConfig(enabled=False, d_steps=3, fake_reuse=2)).plan(0)

    assert not plan.generate_upfront
    assert [plan.fake_batch_for_step(s) for s in range(3)] == [0, 1, 2]


def test_server_scheduler_adds_steps_when_g_is_behind_and_removes_when_ahead() -> None:
    scheduler = ServerTaskScheduler(
        ServerSchedulerConfig(g_steps=2, min_g_steps=1, max_g_steps=3, behind_below=0.3, ahead_above=0.5)
    )

    assert scheduler.next_steps(None) == 2
    assert scheduler.next_steps(GeneratorFeedback(fake_realness=0.1)) == 3
    assert scheduler.next_steps(GeneratorFeedback(fake_realness=0.1)) == 3  # capped at max
    assert scheduler.next_steps(GeneratorFeedback(fake_realness=0.4)) == 3  # in the band: unchanged
    assert scheduler.next_steps(GeneratorFeedback(fake_realness=0.9)) == 2
    assert scheduler.next_steps(GeneratorFeedback(fake_realness=0.9)) == 1
    assert scheduler.next_steps(GeneratorFeedback(fake_realness=0.9)) == 1  # floored at min


def test_server_scheduler_off_keeps_fixed_steps() -> None:
    scheduler = ServerTaskScheduler(ServerSchedulerConfig(enabled=False, g_steps=2))

    assert scheduler.next_steps(GeneratorFeedback(fake_realness=0.0)) == 2


def test_full_participation_takes_every_worker_every_round() -> None:
    participation = RoundParticipation(1.0, worker_tasks=[0, 0, 1, 1, 1])

    assert participation.everyone
    assert [participation.workers(r) for r in range(3)] == [[0, 1, 2, 3, 4]] * 3
    assert participation.includes(3, 7)


def test_partial_participation_takes_each_task_in_turn_and_every_worker_equally() -> None:
    # Tasks: 0 has workers 0-1, 1 has workers 2-4, 2 has worker 5 alone.
    participation = RoundParticipation(0.5, worker_tasks=[0, 0, 1, 1, 1, 2])

    rounds = [participation.workers(r) for r in range(6)]

    assert not participation.everyone
    assert rounds[0] == [0, 2, 3, 5]  # ceil(0.5 * 2) = 1, ceil(0.5 * 3) = 2, a lone worker always
    assert rounds[1] == [1, 2, 4, 5]  # the next in turn: task 1 wraps round to worker 2
    for chosen in rounds:
        assert sum(w in (0, 1) for w in chosen) == 1
        assert sum(w in (2, 3, 4) for w in chosen) == 2
        assert 5 in chosen  # every task's head is updated every round
    turns = [sum(worker in chosen for chosen in rounds) for worker in range(6)]
    assert turns == [3, 3, 4, 4, 4, 6]  # over 6 rounds: 1 of 2 and 2 of 3 workers, evenly
    assert all(participation.includes(w, r) == (w in rounds[r]) for w in range(6) for r in range(6))


def test_entgan_takes_half_with_its_server_scheduler_and_everyone_without() -> None:
    from entgan.algorithms.entgan import EntGAN
    from entgan.engine.registry import method_class

    on = tiny_config()
    off = tiny_config(control={"server_scheduler": {"enabled": False}})
    assert EntGAN.participation(on) == 0.5
    assert EntGAN.participation(off) == 1.0
    assert EntGAN.participation(tiny_config(engine={"participation": 0.75})) == 0.75
    assert method_class("flgan").participation(tiny_config(algorithm="flgan")) == 1.0


def test_old_configs_move_participation_to_the_engine_policy() -> None:
    scheduler = {"server_scheduler": {"participation": 0.25}}
    assert tiny_config(control=scheduler).engine.participation == 0.25
    # Only EntGAN with its scheduler on obeyed the old field: elsewhere it is dropped.
    assert tiny_config(algorithm="flgan", control=scheduler).engine.participation is None
    off = {"server_scheduler": {"participation": 0.25, "enabled": False}}
    assert tiny_config(control=off).engine.participation is None


def test_gossip_pairs_only_the_rounds_participants() -> None:
    among = [0, 2, 3]
    optimizers = [NonIIDOptimizer(NonIIDConfig(topology="ring"), w, 4, seed=0) for w in range(4)]

    partners = {w: optimizers[w].partners(0, among=among) for w in range(4)}

    assert partners[1] is None  # sits the round out
    assert partners[0] == (2, 3) and partners[2] == (3, 0) and partners[3] == (0, 2)
    assert NonIIDOptimizer(NonIIDConfig(), 0, 4, seed=0).partners(0, among=[0]) is None  # nobody to pair with
    pairs = [NonIIDOptimizer(NonIIDConfig(topology="random-pairs"), w, 4, seed=0).partners(5, among=[1, 3]) for w in (1, 3)]
    assert pairs == [(3, 3), (1, 1)]


def test_ring_partners_form_a_consistent_ring() -> None:
    count = 5
    optimizers = [NonIIDOptimizer(NonIIDConfig(topology="ring"), w, count, seed=0) for w in range(count)]

    partners = [opt.partners(0) for opt in optimizers]

    for worker, (send_to, receive_from) in enumerate(partners):
        assert partners[send_to][1] == worker  # whom I send to receives from me
        assert partners[receive_from][0] == worker


def test_random_pairs_are_symmetric_agreed_and_vary_by_round() -> None:
    count = 5
    optimizers = [NonIIDOptimizer(NonIIDConfig(topology="random-pairs"), w, count, seed=1) for w in range(count)]
    pairings = []
    for round_index in range(6):
        partners = [opt.partners(round_index) for opt in optimizers]
        sitting_out = [w for w, p in enumerate(partners) if p is None]
        assert len(sitting_out) == 1  # odd count: exactly one worker rests
        for worker, pair in enumerate(partners):
            if pair is not None:
                assert pair[0] == pair[1] != worker
                assert partners[pair[0]] == (worker, worker)
        pairings.append(tuple(partners))
    assert len(set(pairings)) > 1


def test_gossip_respects_every_and_single_worker() -> None:
    assert NonIIDOptimizer(NonIIDConfig(every=3), 0, 4, seed=0).partners(1) is None
    assert NonIIDOptimizer(NonIIDConfig(every=3), 0, 4, seed=0).partners(3) is not None
    assert NonIIDOptimizer(NonIIDConfig(), 0, 1, seed=0).partners(0) is None
    assert NonIIDOptimizer(NonIIDConfig(enabled=False), 0, 4, seed=0).partners(0) is None


def _pair() -> tuple:
    torch.manual_seed(0)
    local = build_discriminator(ModelConfig(hidden_dim=8), (1, 28, 28), 2)
    torch.manual_seed(1)
    peer = build_discriminator(ModelConfig(hidden_dim=8), (1, 28, 28), 2)
    return local, peer


def test_mixing_moves_parameters_towards_the_peer() -> None:
    local, peer = _pair()
    expected = [(a + b) / 2 for a, b in zip(local.parameters(), peer.parameters())]

    NonIIDOptimizer(NonIIDConfig(mixing=0.5), 0, 2, seed=0).mix(local, peer)

    for mixed, want in zip(local.parameters(), expected):
        assert torch.allclose(mixed, want)


def test_regulariser_is_zero_for_identical_models_and_positive_otherwise() -> None:
    local, peer = _pair()
    with torch.no_grad():  # make the peer's outputs confident, far from the fresh local model's
        for parameter in peer.parameters():
            parameter.mul_(30)
    local.eval(), peer.eval()  # no dropout: compare deterministic outputs
    fakes = torch.rand(8, 1, 28, 28) * 2 - 1
    for method in ("distill", "l2sp"):
        optimizer = NonIIDOptimizer(NonIIDConfig(method=method), 0, 2, seed=0)
        different = optimizer.regulariser(local, peer, fakes)
        same = optimizer.regulariser(peer, peer, fakes)
        if method == "l2sp":
            assert same.item() == 0.0
        else:  # distillation to itself: BCE against its own probabilities = their entropy, the minimum
            assert different.item() > same.item()
        assert different.item() > 0
        different.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in local.parameters())


def test_worker_scheduler_sends_a_share_of_fakes_to_other_tasks() -> None:
    scheduler = WorkerTaskScheduler(WorkerSchedulerConfig(other_task_fakes=0.25))
    generator = torch.Generator().manual_seed(0)

    tasks = scheduler.fake_tasks(64, own_task=1, num_tasks=3, generator=generator)

    assert (tasks == 1).sum() == 48
    assert set(tasks[tasks != 1].tolist()) <= {0, 2}
    assert scheduler.fake_tasks(64, own_task=0, num_tasks=1, generator=generator).eq(0).all()
    off = WorkerTaskScheduler(WorkerSchedulerConfig(enabled=False, other_task_fakes=0.25))
    assert off.fake_tasks(64, own_task=1, num_tasks=3, generator=generator).eq(1).all()


def test_a_batch_statistics_generator_draws_fakes_in_the_servers_task_mix() -> None:
    # With BatchNorm in G, G_k must draw batches like the server's: every task equally represented,
    # whether the scheduler is on or off.
    generator = torch.Generator().manual_seed(0)
    for config in (WorkerSchedulerConfig(other_task_fakes=0.25), WorkerSchedulerConfig(enabled=False)):
        tasks = WorkerTaskScheduler(config).fake_tasks(64, own_task=1, num_tasks=2, generator=generator, like_server=True)
        assert torch.bincount(tasks, minlength=2).tolist() == [32, 32]
    three = WorkerTaskScheduler(WorkerSchedulerConfig()).fake_tasks(
        60, own_task=2, num_tasks=3, generator=generator, like_server=True
    )
    assert torch.bincount(three, minlength=3).tolist() == [20, 20, 20]


def test_straggler_aware_participation_takes_the_fastest_and_everyone_now_and_then() -> None:
    # Task 0: workers 0-3 with expected rounds of 2.4, 1.2, 0.6 and 0.24 s; task 1: workers 4-7 alike.
    aware = StragglerAwareConfig(round_s=[2.4, 1.2, 0.6, 0.24], max_rounds_out=3)
    participation = RoundParticipation(0.5, worker_tasks=[0, 0, 0, 0, 1, 1, 1, 1], straggler_aware=aware)

    rounds = [participation.workers(r) for r in range(8)]

    assert rounds[:3] == [[2, 3, 6, 7]] * 3  # the two fastest of each task
    assert rounds[3] == [0, 1, 4, 5]  # the slow ones, out 3 rounds in a row, all in one round
    assert rounds[4:7] == [[2, 3, 6, 7]] * 3 and rounds[7] == [0, 1, 4, 5]
    for worker in range(8):  # nobody is out more than max_rounds_out rounds in a row
        taken = [r for r, chosen in enumerate(rounds) if worker in chosen]
        assert max(b - a for a, b in zip([-1, *taken], [*taken, 8])) <= 4
    # The schedule is a function of the round: asked out of order (a resumed run), the same.
    fresh = RoundParticipation(0.5, worker_tasks=[0, 0, 0, 0, 1, 1, 1, 1], straggler_aware=aware)
    assert fresh.workers(7) == rounds[7] and fresh.includes(0, 3) and not fresh.includes(0, 2)


def test_straggler_aware_participation_with_equal_times_gives_everyone_equal_turns() -> None:
    tasks = [0, 0, 1, 1, 1, 2]
    in_turn = RoundParticipation(0.5, tasks)
    aware = RoundParticipation(0.5, tasks, StragglerAwareConfig(round_s=[1.0]))

    for rounds in (6, 12):
        expected = [sum(w in in_turn.workers(r) for r in range(rounds)) for w in range(6)]
        assert [sum(w in aware.workers(r) for r in range(rounds)) for w in range(6)] == expected  # 3,3,4,4,4,6 per 6


def test_local_steps_follow_the_declared_speeds_and_never_drop_to_zero() -> None:
    speeds = StragglerAwareConfig(round_s=[1.0], speed=[0.25, 0.25, 0.5, 1.0])
    assert [local_steps(40, worker, speeds) for worker in range(8)] == [10, 10, 20, 40] * 2  # cycled
    assert local_steps(2, 0, speeds) == 1
    assert local_steps(40, 0, StragglerAwareConfig(round_s=[1.0])) == 40  # no speeds declared
    assert local_steps(40, 0, None) == 40
    plan = WorkerTaskScheduler(WorkerSchedulerConfig(d_steps=40, fake_reuse=2), d_steps=10).plan(0)
    assert (plan.d_steps, plan.fake_batches) == (10, 5)


def test_declared_speeds_must_be_positive() -> None:
    with pytest.raises(ValidationError, match="speed"):
        StragglerAwareConfig(round_s=[1.0], speed=[1.0, 0.0])

