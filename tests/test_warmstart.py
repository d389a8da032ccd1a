"""Warm start from a parent checkpoint: tasks mapped by name, new tasks added, replay, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from entgan.config import ConfigError, RunConfig
from entgan.algorithms.entgan.warmstart import WarmStart, load_checkpoint
from entgan.models import build_discriminator, build_generator

from conftest import tiny_config


def _parent_config(**overrides) -> RunConfig:
    return tiny_config(
        tasks=[{"name": "A", "labels": [0, 1], "workers": 1}, {"name": "B", "labels": [7, 8], "workers": 1}],
        **overrides,
    )


def _save_parent(path: Path, config: RunConfig, seed: int = 11) -> tuple:
    """A checkpoint shaped like the engine's (`roles.checkpoint_state`), with non-trivial weights."""
    torch.manual_seed(seed)
    generator = build_generator(config.model, config.image_shape, len(config.tasks))
    discriminator = build_discriminator(config.model, config.image_shape, len(config.tasks))
    with torch.no_grad():  # make every head and embedding row distinct, so a wrong mapping shows
        for parameter in [*generator.parameters(), *discriminator.parameters()]:
            parameter.add_(torch.randn_like(parameter) * 0.1)
    torch.save(
        {
            "format": 1,
            "algorithm": "entgan",
            "round": 3,
            "config": config.model_dump(mode="json"),
            "server": {"generator": generator.state_dict(), "discriminator": discriminator.state_dict()},
        },
        path,
    )
    return generator, discriminator


def _child_config(checkpoint: Path, task_names: list[str], replay_weight: float = 1.0, **overrides) -> RunConfig:
    labels = {"A": [0, 1], "B": [7, 8], "C": [3, 4]}
    return tiny_config(
        tasks=[{"name": name, "labels": labels[name], "workers": 1} for name in task_names],
        warm_start={"checkpoint": str(checkpoint), "replay_weight": replay_weight},
        **overrides,
    )


def _fresh_models(config: RunConfig) -> tuple:
    torch.manual_seed(99)
    return (
        build_generator(config.model, config.image_shape, len(config.tasks)),
        build_discriminator(config.model, config.image_shape, len(config.tasks)),
    )


def test_known_tasks_keep_their_weights_by_name_and_new_tasks_get_new_heads(tmp_path: Path) -> None:
    checkpoint = tmp_path / "parent.pt"
    parent_g, parent_d = _save_parent(checkpoint, _parent_config())
    config = _child_config(checkpoint, ["B", "C", "A"])  # reordered, with a new task in the middle
    generator, discriminator = _fresh_models(config)

    warm = WarmStart.from_config(config)
    warm.initialise(generator, discriminator)

    assert warm.known_tasks == ["B", "A"] and warm.new_tasks == ["C"]
    z = torch.randn(6, config.model.latent_dim)
    images = torch.randn(6, *config.image_shape)
    parent_d.eval(), discriminator.eval()
    for new_index, parent_index in ((0, 1), (2, 0)):  # B and A
        assert torch.equal(generator(z, new_index), parent_g(z, parent_index))
        assert torch.equal(discriminator(images, new_index), parent_d(images, parent_index))
    # C starts as the parent's "average task", exactly as the models' own add_task would make it.
    assert torch.allclose(generator.task_embedding.weight[1], parent_g.task_embedding.weight.mean(dim=0))
    assert torch.allclose(discriminator.heads[1].weight, torch.stack([h.weight for h in parent_d.heads]).mean(0))
    for name, tensor in parent_d.state_dict().items():
        if name.startswith("trunk."):
            assert torch.equal(discriminator.state_dict()[name], tensor)


def test_replay_loss_is_zero_at_start_and_pulls_a_drifted_generator_back(tmp_path: Path) -> None:
    checkpoint = tmp_path / "parent.pt"
    _save_parent(checkpoint, _parent_config())
    config = _child_config(checkpoint, ["A", "B", "C"], replay_weight=2.0)
    generator, discriminator = _fresh_models(config)
    warm = WarmStart.from_config(config)
    warm.initialise(generator, discriminator)

    assert warm.replay_loss(generator).item() == 0.0
    with torch.no_grad():
        for parameter in generator.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    drifted = warm.replay_loss(generator)
    assert drifted.item() > 0
    optimizer = torch.optim.Adam(generator.parameters(), lr=0.01)
    losses = []
    for _ in range(30):
        loss = warm.replay_loss(generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    # The new task's embedding row is not part of the replay term: no gradient reaches it.
    generator.zero_grad()
    warm.replay_loss(generator).backward()
    assert torch.count_nonzero(generator.task_embedding.weight.grad[2]) == 0


def test_replay_weight_zero_turns_replay_off(tmp_path: Path) -> None:
    checkpoint = tmp_path / "parent.pt"
    _save_parent(checkpoint, _parent_config())
    config = _child_config(checkpoint, ["A", "B"], replay_weight=0.0)
    generator, _ = _fresh_models(config)

    loss = WarmStart.from_config(config).replay_loss(generator)

    assert loss.item() == 0.0 and not loss.requires_grad


def test_missing_checkpoint_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    config = _child_config(tmp_path / "nowhere.pt", ["A"])

    with pytest.raises(ConfigError, match="nowhere.pt: checkpoint file not found"):
        WarmStart.from_config(config)


def test_unreadable_checkpoint_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    checkpoint = tmp_path / "garbage.pt"
    checkpoint.write_bytes(b"not a torch file at all")

    with pytest.raises(ConfigError, match="garbage.pt: not a readable EntGAN checkpoint"):
        WarmStart.from_config(_child_config(checkpoint, ["A"]))
    torch.save({"something": "else"}, checkpoint)
    with pytest.raises(ConfigError, match="garbage.pt: not an EntGAN checkpoint"):
        load_checkpoint(checkpoint)


def test_incompatible_model_sizes_are_named(tmp_path: Path) -> None:
    checkpoint = tmp_path / "parent.pt"
    _save_parent(checkpoint, _parent_config())
    config = _child_config(checkpoint, ["A", "B"], model={"hidden_dim": 32})

    with pytest.raises(ConfigError, match=r"parent.pt: .*model.hidden_dim is 16 in the checkpoint, 32 in this run"):
        WarmStart.from_config(config)
