"""The server's averaging: sums taken in the models' own tensors equal the textbook weighted mean;
trunk vs. heads; changes vs. models."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from entgan.algorithms.aggregation import (
    DiscriminatorLayout,
    InPlaceDiscriminatorAverage,
    InPlaceDiscriminatorChange,
    InPlaceModelAverage,
    InPlaceModelChange,
    ModelUploads,
)
from entgan.config import ModelConfig
from entgan.engine.parameters import change_since, flatten, keep_statistics_valid, model_tensors
from entgan.engine.updates import Update
from entgan.models import build_discriminator


def test_in_place_model_average_weights_by_sample_count_and_keeps_a_model_without_uploads() -> None:
    # FL-GAN's G when whole models are uploaded: the first one overwrites, later ones add.
    model = [torch.full((2,), 100.0), torch.tensor(0, dtype=torch.long)]
    average = InPlaceModelAverage()
    average.reset()
    average.add(model, torch.tensor([0.0, 2.0, 4.0]), 1.0)
    average.add(model, torch.tensor([4.0, 6.0, 8.0]), 3.0)
    average.finish(model)

    assert torch.equal(model[0], torch.tensor([3.0, 5.0]))
    assert model[1].dtype == torch.long and int(model[1]) == 7  # a counter takes its rounded mean

    average.reset()
    average.finish(model)  # nothing accepted this round: the model keeps its values
    assert torch.equal(model[0], torch.tensor([3.0, 5.0]))


def test_in_place_average_weights_by_sample_count() -> None:
    # EntGAN's server path: trunk over both updates, task 0's head over its one update.
    (server,) = _discriminators(1)
    layout = DiscriminatorLayout(server)
    average = InPlaceDiscriminatorAverage(layout, num_tasks=2)
    average.add(server, torch.full((layout.update_size,), 1.0), 0, 1.0)
    average.add(server, torch.full((layout.update_size,), 5.0), 1, 3.0)

    average.finish(server)

    state = server.state_dict()
    assert all(torch.equal(state[name], torch.full_like(state[name], 4.0)) for name in layout.trunk_names)
    assert all(torch.equal(state[name], torch.full_like(state[name], 1.0)) for name in layout.head_names[0])
    assert all(torch.equal(state[name], torch.full_like(state[name], 5.0)) for name in layout.head_names[1])


def test_in_place_average_of_half_precision_uploads_does_not_overflow() -> None:
    # A compressed (float16) upload times its sample count passes float16's range (65504); the
    # sum is taken in D's float32, so the average is exact.
    (server,) = _discriminators(1)
    layout = DiscriminatorLayout(server)
    average = InPlaceDiscriminatorAverage(layout, num_tasks=2)
    average.add(server, torch.full((layout.update_size,), 6000.0, dtype=torch.float16), 0, 20.0)
    average.add(server, torch.full((layout.update_size,), 2000.0, dtype=torch.float16), 0, 20.0)

    average.finish(server)

    state = server.state_dict()
    assert all(torch.equal(state[name], torch.full_like(state[name], 4000.0)) for name in layout.trunk_names)


def test_in_place_model_average_equals_the_weighted_mean() -> None:
    generator = torch.Generator().manual_seed(0)
    vectors = [torch.randn(50, generator=generator) for _ in range(5)]
    weights = [3.0, 1.0, 7.0, 2.0, 5.0]
    expected = sum(v.double() * w for v, w in zip(vectors, weights)) / sum(weights)

    model = [torch.zeros(20), torch.zeros(30)]
    average = InPlaceModelAverage()
    for vector, weight in zip(vectors, weights):
        average.add(model, vector, weight)
    average.finish(model)

    assert torch.allclose(flatten(model), expected.float(), atol=1e-6)


def test_in_place_model_change_adds_the_weighted_mean_change_and_counts_a_refusal_as_none() -> None:
    # EntGAN's G under control.edge_generator: G + sum_k (w_k / W) change_k, W over the round's
    # participants; with every change accepted that is G plus their weighted mean.
    generator = torch.Generator().manual_seed(0)
    model = [torch.randn(3, 4, generator=generator), torch.randn(5, generator=generator)]
    changes = [torch.randn(17, generator=generator) for _ in range(3)]
    weights = [10.0, 30.0, 20.0]

    everyone = [tensor.clone() for tensor in model]
    change = InPlaceModelChange()
    change.expect(weights)
    for values, weight in zip(changes, weights):
        change.add(everyone, values, weight)
    expected = flatten(model) + sum(c * w for c, w in zip(changes, weights)) / sum(weights)
    assert torch.allclose(flatten(everyone), expected, atol=1e-6)

    refused_one = [tensor.clone() for tensor in model]
    change.expect(weights)
    for values, weight in list(zip(changes, weights))[1:]:  # the first participant's upload refused
        change.add(refused_one, values, weight)
    expected = flatten(model) + sum(c * w for c, w in list(zip(changes, weights))[1:]) / sum(weights)
    assert torch.allclose(flatten(refused_one), expected, atol=1e-6)


def test_in_place_model_change_gives_an_integer_buffer_its_rounded_share() -> None:
    # BatchNorm's num_batches_tracked travels in a G change as a float; G keeps it an integer.
    model = [torch.zeros(2), torch.tensor(10, dtype=torch.long)]
    change = InPlaceModelChange()
    change.expect([1.0, 3.0])
    change.add(model, torch.tensor([4.0, 4.0, 40.0]), 1.0)
    change.add(model, torch.tensor([8.0, 8.0, 40.0]), 3.0)

    assert torch.equal(model[0], torch.tensor([7.0, 7.0]))
    assert model[1].dtype == torch.long and int(model[1]) == 10 + 10 + 30


def test_in_place_model_change_rejects_wrong_size_and_unexpected_weight() -> None:
    change = InPlaceModelChange()
    change.expect([1.0, 2.0])
    with pytest.raises(ValueError, match="4 values, expected 3"):
        change.add([torch.zeros(3)], torch.zeros(4), 1.0)
    with pytest.raises(ValueError, match="expected participants"):
        change.add([torch.zeros(3)], torch.zeros(3), 5.0)


def test_in_place_model_average_rejects_wrong_size_and_nonpositive_weight() -> None:
    average = InPlaceModelAverage()
    with pytest.raises(ValueError, match="4 values, expected 3"):
        average.add([torch.zeros(3)], torch.zeros(4), 1.0)
    with pytest.raises(ValueError, match="positive"):
        average.add([torch.zeros(3)], torch.zeros(3), 0.0)


def _discriminators(count: int, num_tasks: int = 2) -> list:
    models = []
    for seed in range(count):
        torch.manual_seed(seed)
        models.append(build_discriminator(ModelConfig(hidden_dim=8), (1, 28, 28), num_tasks))
    return models


def test_trunk_averaged_over_all_workers_heads_over_their_task_only() -> None:
    workers = _discriminators(3)
    tasks, samples = [0, 0, 1], [10.0, 30.0, 20.0]
    layout = DiscriminatorLayout(workers[0])
    averager = InPlaceDiscriminatorAverage(layout, num_tasks=2)
    server = _discriminators(1)[0]
    for model, task, count in zip(workers, tasks, samples):
        averager.add(server, flatten(layout.update_tensors(model, task)), task, count)

    averager.finish(server)

    state = server.state_dict()
    for name in layout.trunk_names:
        expected = sum(m.state_dict()[name] * w for m, w in zip(workers, samples)) / sum(samples)
        assert torch.allclose(state[name], expected, atol=1e-6), name
    for name in layout.head_names[0]:
        expected = (workers[0].state_dict()[name] * 10 + workers[1].state_dict()[name] * 30) / 40
        assert torch.allclose(state[name], expected, atol=1e-6), name
    for name in layout.head_names[1]:
        assert torch.allclose(state[name], workers[2].state_dict()[name]), name


def test_head_without_updates_is_left_unchanged() -> None:
    worker, server = _discriminators(2, num_tasks=3)
    before = {k: v.clone() for k, v in server.state_dict().items()}
    layout = DiscriminatorLayout(worker)
    averager = InPlaceDiscriminatorAverage(layout, num_tasks=3)
    averager.add(server, flatten(layout.update_tensors(worker, 1)), 1, 5.0)

    averager.finish(server)

    for name in layout.head_names[0] + layout.head_names[2]:
        assert torch.equal(server.state_dict()[name], before[name])
    assert not torch.equal(server.state_dict()[layout.head_names[1][0]], before[layout.head_names[1][0]])


def test_update_is_trunk_plus_one_head() -> None:
    (model,) = _discriminators(1)
    layout = DiscriminatorLayout(model)

    update = flatten(layout.update_tensors(model, 1))

    total = sum(t.numel() for t in model.state_dict().values())
    assert update.numel() == layout.update_size == total - layout.head_size


def test_adding_the_changes_equals_averaging_the_models_they_came_from() -> None:
    # Every D_k started the round from the server's D (a sync every round): D plus the weighted
    # mean change is the weighted mean of the D_k, trunk over everyone, head t over task t's.
    server, *workers = _discriminators(4)
    layout = DiscriminatorLayout(server)
    for worker in workers:
        worker.load_state_dict(server.state_dict())
        with torch.no_grad():
            for parameter in worker.parameters():
                parameter.add_(torch.randn_like(parameter))
    tasks, weights = [0, 0, 1], [1.0, 3.0, 2.0]
    expected = copy.deepcopy(server)
    average = InPlaceDiscriminatorAverage(layout, num_tasks=2)
    for worker, task, weight in zip(workers, tasks, weights):
        average.add(expected, flatten(layout.update_tensors(worker, task)), task, weight)
    average.finish(expected)

    changes = InPlaceDiscriminatorChange(layout, num_tasks=2)
    changes.expect(list(zip(tasks, weights)))
    start = {task: flatten(layout.update_tensors(server, task)) for task in (0, 1)}
    for worker, task, weight in zip(workers, tasks, weights):
        changes.add(server, flatten(layout.update_tensors(worker, task)) - start[task], task, weight)

    for name, tensor in server.state_dict().items():
        torch.testing.assert_close(tensor, expected.state_dict()[name], rtol=0, atol=1e-5)


def test_a_refused_change_counts_as_no_change_and_foreign_weights_are_refused() -> None:
    (server,) = _discriminators(1)
    layout = DiscriminatorLayout(server)
    before = {name: tensor.clone() for name, tensor in server.state_dict().items()}
    changes = InPlaceDiscriminatorChange(layout, num_tasks=2)
    changes.expect([(0, 1.0), (0, 1.0)])  # two task-0 participants; one upload never arrives
    changes.add(server, torch.full((layout.update_size,), 2.0), 0, 1.0)

    state = server.state_dict()
    for name in layout.trunk_names + layout.head_names[0]:  # half the step: the other half was refused
        torch.testing.assert_close(state[name], before[name] + 1.0)
    for name in layout.head_names[1]:  # no task-1 participant: untouched
        assert torch.equal(state[name], before[name])
    with pytest.raises(ValueError, match="task-1"):
        changes.add(server, torch.zeros(layout.update_size), 1, 1.0)


def test_a_coded_change_leaves_counters_out_and_variances_stay_valid() -> None:
    # BatchNorm's step counter jumps by one a forward; in a change it is left at 0, so it cannot
    # set an int8 chunk's scale. A variance a change takes below 0 is brought back to 0.
    norm = nn.BatchNorm1d(3)
    tensors = model_tensors(norm)
    since = flatten(tensors)
    norm(torch.randn(8, 3))
    norm(torch.randn(8, 3))

    change = change_since(tensors, since)

    counter = list(norm.state_dict()).index("num_batches_tracked")
    offsets = [0, *itertools.accumulate(t.numel() for t in tensors)]
    assert int(norm.num_batches_tracked) == 2 and not change[offsets[counter] : offsets[counter + 1]].any()
    assert torch.equal(change[: offsets[counter]], (flatten(tensors) - since)[: offsets[counter]])

    norm.running_var[0] = -0.01
    keep_statistics_valid(norm)
    assert float(norm.running_var.min()) == 0.0


def test_in_place_average_keeps_a_counter_an_integer() -> None:
    # A trunk holding a counter (as BatchNorm's num_batches_tracked would) takes the weighted mean
    # rounded; an int64 tensor refuses the float division the other tensors get.
    (server,) = _discriminators(1)
    server.trunk.register_buffer("steps", torch.tensor(0, dtype=torch.long))
    layout = DiscriminatorLayout(server)
    counter = layout.trunk_names.index("trunk.steps")
    offset = sum(server.state_dict()[name].numel() for name in layout.trunk_names[:counter])
    average = InPlaceDiscriminatorAverage(layout, num_tasks=2)
    for steps, weight in ((10.0, 1.0), (21.0, 1.0)):
        update = torch.ones(layout.update_size)
        update[offset] = steps
        average.add(server, update, 0, weight)

    average.finish(server)

    assert server.trunk.steps.dtype == torch.long and int(server.trunk.steps) == 16
    state = server.state_dict()
    assert all(torch.equal(state[name], torch.ones_like(state[name])) for name in layout.trunk_names if name != "trunk.steps")


def test_a_rounds_model_uploads_fold_to_the_same_model_as_models_or_as_changes() -> None:
    # FL-GAN's G: whole models averaged, or changes from the round's G added; a refused change
    # (rank 3 due but not accepted) counts as none, a refused model is left out of the mean.
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(6, generator=generator), torch.randn(4, generator=generator)]
    uploaded = {rank: flatten(start) + torch.randn(10, generator=generator) for rank in (1, 2, 3)}
    weights = {1: 10.0, 2: 30.0, 3: 20.0}
    extras = torch.zeros(0)

    averaged = [tensor.clone() for tensor in start]
    ModelUploads(changes=False).fold(averaged, [Update(r, uploaded[r], extras) for r in (1, 2)], [1, 2, 3], weights)
    changed = [tensor.clone() for tensor in start]
    changes = [Update(r, uploaded[r] - flatten(start), extras) for r in (1, 2)]
    ModelUploads(changes=True).fold(changed, changes, [1, 2, 3], weights)

    assert torch.allclose(flatten(averaged), (uploaded[1] * 10 + uploaded[2] * 30) / 40, atol=1e-6)
    expected_change = ((uploaded[1] - flatten(start)) * 10 + (uploaded[2] - flatten(start)) * 30) / 60
    assert torch.allclose(flatten(changed), flatten(start) + expected_change, atol=1e-6)
