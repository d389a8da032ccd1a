"""DP-SGD on the edge discriminators: per-sample clipping, noise, accounting, and a private run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from entgan.algorithms.aggregation import DiscriminatorLayout
from entgan.gan import discriminator_loss
from entgan.config import OptimizerConfig, PrivacyConfig
from entgan.models.discriminator import Discriminator, MLPDiscriminator
from entgan.algorithms.entgan.privacy import PrivateDiscriminatorTraining

from conftest import tiny_config

IMAGE_SHAPE = (1, 8, 8)
TASK = 1
BATCH = 6
SHARD = 30
OPTIMIZER = OptimizerConfig(batch_size=BATCH, lr_discriminator=1e-3, beta1=0.5, beta2=0.999)


def _discriminator(seed: int = 0) -> Discriminator:
    torch.manual_seed(seed)
    # No dropout: the reference gradients below must see the same network as the DP step.
    return MLPDiscriminator(IMAGE_SHAPE, num_tasks=3, hidden_dim=8, dropout=0.0)


def _trainer(discriminator: Discriminator, seed: int | None = 0, **privacy: object) -> PrivateDiscriminatorTraining:
    return PrivateDiscriminatorTraining(
        discriminator,
        TASK,
        PrivacyConfig(enabled=True, **privacy),
        OPTIMIZER,
        shard_size=SHARD,
        batch_size=BATCH,
        generator=None if seed is None else torch.Generator().manual_seed(seed),
    )


def _batches(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, *IMAGE_SHAPE, generator=generator), torch.randn(BATCH, *IMAGE_SHAPE, generator=generator)


def _applied_gradient(trainer: PrivateDiscriminatorTraining) -> list[torch.Tensor]:
    """The gradient Adam consumed in the trainer's first step: after one step exp_avg = (1 - beta1) g."""
    state = trainer.optimizer.original_optimizer.state
    return [state[p]["exp_avg"] / (1 - OPTIMIZER.beta1) for p in trainer.optimizer.params]


def _per_sample_gradients(
    discriminator: Discriminator, images: torch.Tensor, targets: torch.Tensor
) -> list[list[torch.Tensor]]:
    """Reference per-sample gradients, one backward pass per sample, over the trainable parameters."""
    parameters = [p for p in discriminator.parameters() if p.requires_grad]
    gradients = []
    for image, target in zip(images, targets, strict=True):
        logit = discriminator(image.unsqueeze(0), TASK)
        loss = F.binary_cross_entropy_with_logits(logit, target.reshape(1))
        gradients.append([g.detach() for g in torch.autograd.grad(loss, parameters)])
    return gradients


def _clipped_mean(gradients: list[list[torch.Tensor]], max_norm: float, divide_by: int) -> list[torch.Tensor]:
    total = [torch.zeros_like(g) for g in gradients[0]]
    for sample in gradients:
        norm = torch.sqrt(sum(g.pow(2).sum() for g in sample))
        factor = min(1.0, max_norm / (float(norm) + 1e-6))
        for accumulator, g in zip(total, sample, strict=True):
            accumulator.add_(g, alpha=factor)
    return [g / divide_by for g in total]


def _per_sample_norms(gradients: list[list[torch.Tensor]]) -> torch.Tensor:
    return torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in sample)) for sample in gradients])


def test_wrapping_keeps_the_discriminators_tensors_names_and_trains_only_trunk_and_own_head() -> None:
    discriminator = _discriminator()
    names_before = list(discriminator.state_dict(keep_vars=True))
    tensors_before = [id(t) for t in discriminator.state_dict(keep_vars=True).values()]
    layout = DiscriminatorLayout(discriminator)
    initial = {name: t.detach().clone() for name, t in discriminator.state_dict().items()}

    trainer = _trainer(discriminator)
    real, fake = _batches()
    trainer.step(real, fake)

    assert list(discriminator.state_dict(keep_vars=True)) == names_before
    assert [id(t) for t in discriminator.state_dict(keep_vars=True).values()] == tensors_before
    assert len(layout.update_tensors(discriminator, TASK)) == len(layout.trunk_names) + len(layout.head_names[TASK])
    for name, tensor in discriminator.state_dict().items():
        moved = not torch.equal(tensor, initial[name])
        assert moved == (name.startswith("trunk.") or name.startswith(f"heads.{TASK}.")), name


def test_step_without_noise_applies_the_mean_of_per_sample_clipped_gradients() -> None:
    real, fake = _batches()
    images = torch.cat([real, fake])
    targets = torch.cat([torch.ones(BATCH), torch.zeros(BATCH)])
    reference = _discriminator()
    for index, head in enumerate(reference.heads):
        head.requires_grad_(index == TASK)
    per_sample = _per_sample_gradients(reference, images, targets)
    # A bound between the smallest and largest per-sample norm: some samples are clipped, some not.
    max_norm = float(_per_sample_norms(per_sample).median())

    trainer = _trainer(_discriminator(), noise_multiplier=0.0, max_grad_norm=max_norm)
    loss, real_score, fake_score = trainer.step(real, fake)

    expected = _clipped_mean(per_sample, max_norm, divide_by=BATCH)
    for applied, wanted in zip(_applied_gradient(trainer), expected, strict=True):
        torch.testing.assert_close(applied, wanted, rtol=1e-4, atol=1e-6)
    plain_loss, plain_real, plain_fake = discriminator_loss(_discriminator(), real, fake, TASK)
    assert loss == pytest.approx(plain_loss.item(), rel=1e-5)
    assert (real_score, fake_score) == pytest.approx((plain_real, plain_fake), rel=1e-5)


def test_without_clipping_or_noise_a_dp_step_is_the_plain_discriminator_step() -> None:
    real, fake = _batches()
    plain = _discriminator()
    for index, head in enumerate(plain.heads):
        head.requires_grad_(index == TASK)
    loss, _, _ = discriminator_loss(plain, real, fake, TASK)
    expected = torch.autograd.grad(loss, [p for p in plain.parameters() if p.requires_grad])

    trainer = _trainer(_discriminator(), noise_multiplier=0.0, max_grad_norm=1e6)
    trainer.step(real, fake)

    for applied, wanted in zip(_applied_gradient(trainer), expected, strict=True):
        torch.testing.assert_close(applied, wanted, rtol=1e-4, atol=1e-7)


def test_noise_has_the_configured_scale() -> None:
    real, fake = _batches()
    max_norm, sigma = 0.5, 2.0
    clean = _trainer(_discriminator(), noise_multiplier=0.0, max_grad_norm=max_norm)
    noisy = _trainer(_discriminator(), noise_multiplier=sigma, max_grad_norm=max_norm)

    clean.step(real, fake)
    noisy.step(real, fake)

    pairs = zip(_applied_gradient(noisy), _applied_gradient(clean), strict=True)
    noise = torch.cat([(a - b).reshape(-1) for a, b in pairs])
    assert noise.numel() > 500
    assert float(noise.std()) == pytest.approx(sigma * max_norm / BATCH, rel=0.1)
    assert abs(float(noise.mean())) < 0.1 * sigma * max_norm / BATCH


def test_regulariser_gradient_joins_after_the_noise_unclipped() -> None:
    real, fake = _batches()
    weight = 3.0
    without = _trainer(_discriminator(), noise_multiplier=0.0, max_grad_norm=1e-3)
    with_regulariser = _trainer(_discriminator(), noise_multiplier=0.0, max_grad_norm=1e-3)
    head = with_regulariser.discriminator.heads[TASK]
    initial_bias = head.bias.detach().clone()

    without.step(real, fake)
    with_regulariser.step(real, fake, regulariser=lambda: weight * head.bias.pow(2).sum())

    bias_index = [id(p) for p in with_regulariser.optimizer.params].index(id(head.bias))
    difference = _applied_gradient(with_regulariser)[bias_index] - _applied_gradient(without)[bias_index]
    # d/db of weight * b^2 is 2 * weight * b: far larger than the 1e-3 clipping bound allows.
    torch.testing.assert_close(difference, 2 * weight * initial_bias, rtol=1e-4, atol=1e-6)


def test_epsilon_is_zero_before_training_finite_after_and_grows_with_steps() -> None:
    for accountant in ("rdp", "prv"):
        trainer = _trainer(_discriminator(), noise_multiplier=1.0, accountant=accountant)
        real, fake = _batches()
        assert trainer.epsilon() == 0.0

        trainer.step(real, fake)
        after_one = trainer.epsilon()
        for _ in range(4):
            trainer.step(real, fake)
        after_five = trainer.epsilon()

        assert trainer.steps == 5
        assert 0 < after_one < after_five < math.inf, accountant
        assert after_five == pytest.approx(trainer.accountant.get_epsilon(delta=trainer.privacy.delta), rel=1e-9)


def test_more_noise_spends_less_privacy_and_no_noise_bounds_nothing() -> None:
    real, fake = _batches()
    spent = {}
    for sigma in (0.0, 0.8, 2.0):
        trainer = _trainer(_discriminator(), noise_multiplier=sigma)
        for _ in range(3):
            trainer.step(real, fake)
        spent[sigma] = trainer.epsilon()
    assert spent[0.0] == math.inf
    assert spent[2.0] < spent[0.8] < math.inf


def test_accounting_survives_a_checkpoint_round_trip() -> None:
    real, fake = _batches()
    trainer = _trainer(_discriminator(), reproducible_noise=True)
    for _ in range(3):
        trainer.step(real, fake)

    restored = _trainer(_discriminator(), reproducible_noise=True)
    restored.load_state_dict(trainer.state_dict())

    assert restored.steps == 3
    assert restored.epsilon() == pytest.approx(trainer.epsilon())
    trainer.step(real, fake)
    restored.step(real, fake)
    assert restored.epsilon() == pytest.approx(trainer.epsilon())


def test_secret_random_streams_are_not_checkpointed() -> None:
    trainer = _trainer(_discriminator(), seed=None)
    assert "noise_rng" not in trainer.state_dict() and "sampling_rng" not in trainer.state_dict()


def test_poisson_sampling_draws_each_record_with_the_sample_rate() -> None:
    trainer = _trainer(_discriminator())
    images = torch.arange(SHARD, dtype=torch.float32).reshape(SHARD, 1, 1, 1).expand(SHARD, *IMAGE_SHAPE)

    sizes = [trainer.sample_real(images).shape[0] for _ in range(400)]

    assert len(set(sizes)) > 3  # the batch size varies, as the accountant assumes
    assert sum(sizes) / len(sizes) == pytest.approx(BATCH, rel=0.1)
    with pytest.raises(ValueError, match="shard has 29 images"):
        trainer.sample_real(images[:29])


def test_an_empty_real_batch_still_takes_a_charged_step() -> None:
    trainer = _trainer(_discriminator())
    _, fake = _batches()

    loss, real_score, fake_score = trainer.step(torch.empty(0, *IMAGE_SHAPE), fake)

    assert math.isnan(loss) and math.isnan(real_score) and 0 < fake_score < 1
    assert trainer.steps == 1


def test_seeded_runs_repeat_and_secret_ones_differ() -> None:
    def parameters_after_step(seed: int | None) -> torch.Tensor:
        trainer = _trainer(_discriminator(), seed=seed)
        trainer.step(*_batches())
        return torch.cat([p.detach().reshape(-1) for p in trainer.discriminator.parameters()])

    assert torch.equal(parameters_after_step(5), parameters_after_step(5))
    assert not torch.equal(parameters_after_step(None), parameters_after_step(None))


@pytest.mark.slow
def test_private_run_reports_epsilon_per_worker_and_still_trains(tmp_path: Path, cache_dir: Path) -> None:
    from entgan.engine.launch import launch_local
    from entgan.rundir import RunDirectory

    # DP noise slows learning: 60 rounds (tiny ones) for a clear drop in FID, evaluated 4 times.
    config = tiny_config(
        rounds=60,
        eval={"every": 20, "samples_per_task": 200},
        checkpoint={"every": 20},
        privacy={"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0, "reproducible_noise": True},
    )

    summary = launch_local(config, tmp_path / "run", cache_dir=cache_dir, show_progress=False)

    rows = RunDirectory(tmp_path / "run").metrics()
    assert set(summary["epsilon_by_worker"]) == {"worker1", "worker2", "worker3"}
    assert len(rows) == 60
    for rank in (1, 2, 3):
        reported = [row for row in rows if f"worker{rank}/epsilon" in row]  # the rounds it took part in
        assert len(reported) >= 20, rank
        spent = [row[f"worker{rank}/epsilon"] for row in reported]
        assert all(0 < value < math.inf for value in spent), rank
        assert spent == sorted(spent) and spent[-1] > spent[0], rank
        assert summary["epsilon_by_worker"][f"worker{rank}"] == spent[-1]
        # Real-data figures computed outside DP-SGD are withheld, not reported.
        assert all(math.isnan(row[f"worker{rank}/real_realness"]) for row in reported)
    evaluated = [row for row in rows if "fid/overall" in row]
    assert [row["round"] for row in evaluated] == [1, 20, 40, 60]
    assert evaluated[-1]["fid/overall"] < 0.9 * evaluated[0]["fid/overall"]
