"""Fast tests of the task-conditioned generators and multi-head discriminators."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from entgan.config import ModelConfig
from entgan.models import (
    SHARED_PREFIX,
    Discriminator,
    Generator,
    build_discriminator,
    build_generator,
    head_prefix,
    head_task,
    is_shared,
)

FAMILIES = ["mlp", "dcgan"]
SIZES = [28, 32, 64]
CHANNELS = [1, 3]
NUM_TASKS = 3


def small_cfg(family: str) -> ModelConfig:
    return ModelConfig(family=family, latent_dim=8, hidden_dim=32, task_embedding_dim=4)


def build_pair(
    family: str, shape: tuple[int, int, int] = (1, 28, 28), num_tasks: int = NUM_TASKS, seed: int = 0
) -> tuple[Generator, Discriminator]:
    torch.manual_seed(seed)
    cfg = small_cfg(family)
    return build_generator(cfg, shape, num_tasks), build_discriminator(cfg, shape, num_tasks)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("channels", CHANNELS)
def test_shapes_and_range(family: str, size: int, channels: int) -> None:
    shape = (channels, size, size)
    generator, discriminator = build_pair(family, shape)
    n = 5
    z = generator.sample_latent(n)
    assert z.shape == (n, 8)
    tasks = torch.tensor([0, 1, 2, 0, 1])
    images = generator(z, tasks)
    assert images.shape == (n, *shape)
    assert images.dtype == torch.float32
    assert images.min() >= -1.0 and images.max() <= 1.0

    # Make sure the range holds even when pre-activations are large (tanh, not a clamp elsewhere).
    assert generator(10.0 * z, tasks).abs().max() <= 1.0

    assert discriminator.features(images).shape == (n, discriminator.feature_dim)
    assert discriminator(images, tasks).shape == (n,)
    assert discriminator.all_heads(images).shape == (n, NUM_TASKS)
    assert generator.sample(task=1, n=3).shape == (3, *shape)


@pytest.mark.parametrize("family", FAMILIES)
def test_task_conditioning(family: str) -> None:
    generator, _ = build_pair(family)
    generator.eval()
    z = generator.sample_latent(4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        task0 = generator(z, torch.zeros(4, dtype=torch.long))
        task0_again = generator(z, 0)
        task1 = generator(z, torch.ones(4, dtype=torch.long))
    assert torch.equal(task0, task0_again)
    # Relative to the output scale: DCGAN init keeps early outputs small, but the task must matter.
    assert (task0 - task1).abs().max() > 0.1 * task0.abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_is_reproducible_and_restores_mode(family: str) -> None:
    generator, _ = build_pair(family)
    generator.train()
    first = generator.sample(0, 4, generator=torch.Generator().manual_seed(7))
    second = generator.sample(0, 4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, second)
    assert not first.requires_grad
    assert generator.training


def test_mlp_generator_same_in_train_and_eval() -> None:
    generator, _ = build_pair("mlp")
    z = generator.sample_latent(4)
    with torch.no_grad():
        train_out = generator.train()(z, 1)
        eval_out = generator.eval()(z, 1)
    assert torch.equal(train_out, eval_out)


def test_only_the_dcgan_generator_normalises_over_its_batch() -> None:
    # What `normalises_over_batch` promises: a DCGAN sample changes with the rest of its batch
    # (BatchNorm in training mode), an MLP sample does not.
    for family, expected in (("mlp", False), ("dcgan", True)):
        generator, _ = build_pair(family)
        assert generator.normalises_over_batch is expected
        z = generator.sample_latent(8)
        with torch.no_grad():
            alone = generator.train()(z[:4], torch.zeros(4, dtype=torch.long))
            mixed = generator(z, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))[:4]
        assert torch.allclose(alone, mixed, atol=1e-6) is not expected


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_picks_the_task_head(family: str) -> None:
    generator, discriminator = build_pair(family)
    discriminator.eval()  # dropout off, so forward and all_heads see the same features
    tasks = torch.tensor([2, 0, 1, 1, 0, 2])
    with torch.no_grad():
        images = generator(generator.sample_latent(len(tasks)), tasks)
        picked = discriminator(images, tasks)
        every = discriminator.all_heads(images)
        features = discriminator.features(images)
        manual = torch.stack([discriminator.heads[t](features[i])[0] for i, t in enumerate(tasks.tolist())])
    assert torch.allclose(picked, every.gather(1, tasks[:, None]).squeeze(1))
    assert torch.allclose(picked, manual, atol=1e-6)
    # Heads are distinct, so picking the wrong head would show.
    assert not torch.allclose(every[:, 0], every[:, 1])


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_names_partition(family: str) -> None:
    _, discriminator = build_pair(family)
    pattern = re.compile(r"^(trunk\.|heads\.(\d+)\.)")
    for name, _ in discriminator.named_parameters():
        match = pattern.match(name)
        assert match, name
        if is_shared(name):
            assert name.startswith(SHARED_PREFIX) and head_task(name) is None
        else:
            task = int(match.group(2))
            assert name.startswith(head_prefix(task)) and head_task(name) == task
            assert 0 <= task < discriminator.num_tasks
    # Every key of the state_dict (buffers included) follows the same rule.
    assert all(pattern.match(key) for key in discriminator.state_dict())
    head_names = [n for n, _ in discriminator.named_parameters() if not is_shared(n)]
    expected = [f"heads.{t}.{p}" for t in range(NUM_TASKS) for p in ("weight", "bias")]
    assert sorted(head_names) == sorted(expected)
    assert head_prefix(1) == "heads.1." and not "heads.10.weight".startswith(head_prefix(1))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", SIZES)
def test_no_batchnorm_in_discriminator(family: str, size: int) -> None:
    _, discriminator = build_pair(family, (3, size, size))
    norms = (nn.modules.batchnorm._BatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d)
    assert not any(isinstance(m, norms) for m in discriminator.modules())
    assert not list(discriminator.buffers())


@pytest.mark.parametrize("family", FAMILIES)
def test_add_task_keeps_old_tasks(family: str) -> None:
    generator, discriminator = build_pair(family)
    generator.eval()
    discriminator.eval()
    old_tasks = torch.tensor([0, 1, 2, 2])
    with torch.no_grad():
        z = generator.sample_latent(len(old_tasks))
        images_before = generator(z, old_tasks)
        logits_before = discriminator.all_heads(images_before)
        old_embedding = generator.task_embedding.weight.clone()

    assert generator.add_task() == NUM_TASKS
    assert discriminator.add_task() == NUM_TASKS
    assert generator.num_tasks == discriminator.num_tasks == NUM_TASKS + 1

    with torch.no_grad():
        images_after = generator(z, old_tasks)
        logits_after = discriminator.all_heads(images_before)
        new_images = generator(z, NUM_TASKS)
        new_logits = discriminator(images_before, NUM_TASKS)
    assert torch.equal(images_before, images_after)
    assert torch.equal(logits_before, logits_after[:, :NUM_TASKS])
    assert new_images.shape == images_before.shape
    assert new_logits.shape == (len(old_tasks),)

    # New rows start from the mean of the old ones.
    assert torch.allclose(generator.task_embedding.weight[-1], old_embedding.mean(dim=0))
    mean_weight = torch.stack([h.weight for h in discriminator.heads[:NUM_TASKS]]).mean(dim=0)
    assert torch.allclose(discriminator.heads[-1].weight, mean_weight)
    assert generator.task_embedding.weight.requires_grad
    assert f"heads.{NUM_TASKS}.weight" in dict(discriminator.named_parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_flow_from_d_to_g(family: str) -> None:
    generator, discriminator = build_pair(family)
    tasks = torch.tensor([0, 1, 2, 0])
    logits = discriminator(generator(generator.sample_latent(len(tasks)), tasks), tasks)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
    loss.backward()
    for name, param in generator.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_builders_reject_unsupported_combinations() -> None:
    with pytest.raises(ValueError, match=r"data\.image_size.*\[28, 32, 64\].*model\.family"):
        build_generator(small_cfg("dcgan"), (1, 48, 48), 2)
    with pytest.raises(ValueError, match=r"data\.image_size"):
        build_discriminator(small_cfg("dcgan"), (1, 16, 16), 2)
    with pytest.raises(ValueError, match=r"model\.family.*mlp.*dcgan"):
        bad = ModelConfig.model_construct(family="resnet", latent_dim=8, hidden_dim=32, task_embedding_dim=4)
        build_generator(bad, (1, 28, 28), 2)
    with pytest.raises(ValueError, match=r"data\.channels"):
        build_discriminator(small_cfg("mlp"), (2, 28, 28), 2)
    with pytest.raises(ValueError, match="task"):
        build_generator(small_cfg("mlp"), (1, 28, 28), 0)


def test_bad_inputs_fail_loudly() -> None:
    generator, discriminator = build_pair("mlp")
    with pytest.raises(ValueError, match="z must have shape"):
        generator(torch.randn(2, 9), 0)
    with pytest.raises(TypeError, match="LongTensor"):
        generator(torch.randn(2, 8), torch.zeros(2))
    with pytest.raises(ValueError, match="images must have shape"):
        discriminator(torch.randn(2, 1, 32, 32), 0)
    with pytest.raises(ValueError, match="task must be in"):
        generator.sample(NUM_TASKS, 2)


def test_dcgan_init_applied() -> None:
    for family in FAMILIES:
        generator, discriminator = build_pair(family)
        for model in (generator, discriminator):
            layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))]
            weights = torch.cat([m.weight.flatten() for m in layers])
            assert abs(weights.std().item() - 0.02) < 0.002
            assert all(m.bias is None or not m.bias.any() for m in layers)
        # The task embedding keeps a scale comparable to z ~ N(0, 1).
        assert generator.task_embedding.weight.std() > 0.5
