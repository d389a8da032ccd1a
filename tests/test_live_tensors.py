"""The live-tensor table: what a role's memory is made of, counted from its tensors."""

from __future__ import annotations

import gc

import torch
from torch import nn

from entgan.gan.losses import mean_realness
from entgan.gan.memory_layout import bind_gradients, linear_gradients_in_place
from entgan.metrics.live_tensors import SavedActivations, role_tensor_bytes


class _Averager:  # a project object held by a role (its module is counted too)
    __module__ = "entgan.test"

    def __init__(self) -> None:
        self.average = nn.Linear(3, 3, bias=False)


class _Role:
    def __init__(self) -> None:
        self.G = nn.Linear(10, 20)  # 220 parameters
        self.optimizer = torch.optim.Adam(self.G.parameters())
        self.buffers = [torch.zeros(100), torch.zeros(50)]
        self.alias = self.G.weight  # the same storage again: counted once
        self.helper = _Averager()  # 9 parameters


def test_role_tensor_bytes_counts_each_storage_once_per_kind() -> None:
    role = _Role()
    role.G(torch.randn(4, 10)).sum().backward()
    role.optimizer.step()

    table = role_tensor_bytes(role)

    assert table["parameters"] == (220 + 9) * 4
    assert table["gradients"] == 220 * 4
    # Adam: two moments per parameter, and a step counter per parameter tensor (a float32 scalar).
    assert table["optimizer_state"] == 2 * 220 * 4 + 2 * 4
    assert table["other_tensors"] == 150 * 4
    assert table["buffers"] == 0


def test_saved_activations_peak_while_a_graph_is_held_and_nothing_after_backward() -> None:
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 8))
    meter = SavedActivations()
    inputs = torch.randn(16, 10)

    with meter.measure():
        first = model(inputs).sum()
        held_once = meter.current_bytes
        second = model(inputs).sum()  # two graphs held at once; the input is the same tensor
        assert meter.current_bytes == held_once + 16 * 32 * 4
        first.backward()
        del first
        second.backward()
        del second

    # Input (16x10) and ReLU output (16x32): the first layer's input, the ReLU's output (saved by
    # both the ReLU and the second layer, counted once); weights (and their transposed views) are
    # parameters, not activations.
    assert held_once == (16 * 10 + 16 * 32) * 4
    assert meter.peak_bytes == held_once + 16 * 32 * 4 and meter.current_bytes == 0


def test_in_place_gradient_layout_works_under_the_meter() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    storage = torch.zeros(sum(p.numel() for p in model.parameters()))
    bind_gradients(model.parameters(), storage)
    expected_model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    expected_model.load_state_dict(model.state_dict())
    inputs = torch.randn(5, 4)
    expected_model(inputs).pow(2).sum().backward()

    with SavedActivations().measure(), linear_gradients_in_place(model):
        model(inputs).pow(2).sum().backward()

    for ours, theirs in zip(model.parameters(), expected_model.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad)


def test_a_graph_dropped_without_backward_is_freed_under_the_meter() -> None:
    # A sigmoid saves its own output; a figure computed from it with grad (and never
    # back-propagated) must not stay alive through the meter: it once held the whole G-through-D
    # graph of every server G step, a leak that the memory sweep then reported as the method's.
    model = nn.Sequential(nn.Linear(10, 32), nn.Sigmoid())
    meter = SavedActivations()

    with meter.measure():
        for _ in range(3):
            figure = model(torch.randn(16, 10)).mean().item()
    gc.collect()

    assert 0 < figure < 1
    assert meter.peak_bytes > 0 and meter.current_bytes == 0


def test_figures_from_logits_build_no_graph() -> None:
    logits = nn.Linear(4, 1)(torch.randn(8, 4))
    meter = SavedActivations()
    with meter.measure():
        realness = mean_realness(logits)
    assert 0 < realness < 1 and meter.peak_bytes == 0
