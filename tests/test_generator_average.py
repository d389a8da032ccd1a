"""The moving average of G (`control.generator_average`): its arithmetic, and a real run with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from entgan.api import load_generator
from entgan.config import GeneratorAverageConfig
from entgan.engine.launch import launch_local, resume_local
from entgan.algorithms.entgan.model_average import ModelAverage
from entgan.rundir import RunDirectory

from conftest import due_ranks, tiny_config, worker_digests


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([tensor.detach().reshape(-1) for tensor in model.state_dict().values()])


def test_each_update_moves_the_average_by_one_minus_decay_towards_the_model() -> None:
    model = nn.Linear(3, 2)
    average = ModelAverage(model, half_life=10)
    start = _flat(average.model).clone()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)

    average.update(model)

    assert average.decay == pytest.approx(0.5 ** (1 / 10))
    expected = start + (1 - average.decay) * (_flat(model) - start)
    assert torch.allclose(_flat(average.model), expected, atol=1e-6)


def test_after_half_life_updates_the_gap_to_a_fixed_model_has_halved() -> None:
    model = nn.Linear(4, 4)
    average = ModelAverage(model, half_life=5)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(2.0)
    gap = (_flat(model) - _flat(average.model)).abs()

    for _ in range(5):
        average.update(model)

    assert torch.allclose((_flat(model) - _flat(average.model)).abs(), gap / 2, atol=1e-5)


def test_the_average_is_a_separate_untrained_copy_and_copies_buffers() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    model(torch.randn(8, 3)).sum().backward()  # gradients and running statistics exist
    average = ModelAverage(model, half_life=3)

    assert all(not p.requires_grad and p.grad is None for p in average.model.parameters())
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(average.model.parameters(), model.parameters()))
    model(torch.randn(8, 3) + 5)  # running statistics move
    average.update(model)
    assert torch.equal(average.model[1].running_mean, model[1].running_mean)


def test_half_life_must_be_positive() -> None:
    with pytest.raises(ValueError, match="half_life"):
        ModelAverage(nn.Linear(2, 2), half_life=0)
    with pytest.raises(ValueError, match="half_life_rounds"):
        GeneratorAverageConfig(enabled=True, half_life_rounds=-1)
    assert not GeneratorAverageConfig().enabled  # off unless asked for


@pytest.mark.slow
def test_run_samples_the_average_trains_g_and_resumes_both(tmp_path: Path, cache_dir: Path) -> None:
    config = tiny_config(
        rounds=6, checkpoint={"every": 2}, control={"generator_average": {"enabled": True, "half_life_rounds": 2}}
    )
    straight = launch_local(config, tmp_path / "straight", cache_dir=cache_dir, show_progress=False)
    interrupted = tmp_path / "interrupted"
    launch_local(config, interrupted, cache_dir=cache_dir, show_progress=False)
    for path in (interrupted / "checkpoints").glob("round-000[46]*.pt"):
        path.unlink()  # as if the run had died in round 5

    resumed = resume_local(interrupted, cache_dir=cache_dir, show_progress=False)

    server = RunDirectory(tmp_path / "straight").load_checkpoint(config.rounds)["server"]
    average, trained = (sum(float(t.double().sum()) for t in server[key].values()) for key in ("generator", "trained_generator"))
    assert average != pytest.approx(trained, rel=1e-6)  # two different generators are kept
    # The run's generator (evaluated, sampled, loaded by the API) is the average ...
    assert straight["generator_sum"] == pytest.approx(average, rel=1e-9)
    _, loaded = load_generator(tmp_path / "straight")
    assert float(_flat(loaded).double().sum()) == pytest.approx(average, rel=1e-9)
    # ... while the workers due next hold the trained G, which is what was sent to them.
    for digest in worker_digests(tmp_path / "straight"):
        if digest["rank"] in due_ranks(config, config.rounds):
            assert digest["generator_sum"] == pytest.approx(trained, rel=1e-9, abs=1e-9)
    # Resuming restores both: the same FID stream and the same final average.
    assert resumed["resumed_from_round"] == 2
    assert resumed["generator_sum"] == pytest.approx(straight["generator_sum"], rel=1e-6)
    fids = [
        [row["fid/overall"] for row in RunDirectory(run).metrics() if "fid/overall" in row]
        for run in (tmp_path / "straight", interrupted)
    ]
    assert len(fids[0]) >= 3 and fids[0] == pytest.approx(fids[1], rel=1e-5)
