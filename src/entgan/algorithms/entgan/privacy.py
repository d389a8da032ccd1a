"""Differentially private edge discriminators: DP-SGD (Opacus) on a worker's local D steps.

What the guarantee covers: every update of D_k that reads the worker's real data is one DP-SGD
step: real samples are drawn by Poisson sampling (each record joins a batch independently with
probability batch/shard, the assumption of the accountant), each sample's gradient is clipped to
`max_grad_norm`, and Gaussian noise of standard deviation `noise_multiplier * max_grad_norm` is
added to their sum. Everything D_k sends afterwards (uploads, gossip) is post-processing of those
steps, so epsilon bounds what any other party, the server included, can learn about one record.
For the same reason a private worker's round report carries no loss or realness measured on real
data. The shard size is treated as public (the server weights averages by it, as in Opacus'
accounting, which divides by it).

GAN-specific points:
- Real and fake samples go through ONE per-sample loss over the concatenated batch and are
  clipped together, so each real record is charged once per step. Fakes come from G, which only
  ever saw private D's; they cost no privacy but share the clipping (a fake's gradient is bounded
  like a real one's, so noise and signal stay on the same scale).
- Only the worker's own task head and the shared trunk train under DP; the other heads are frozen
  (they would otherwise receive pure noise every step, and the worker never uploads them).
- A data-independent regulariser (the non-IID optimizer's distillation on fakes or L2-SP anchor to
  the peer's private D) is added after the noise, unclipped: it reads no real data.

The discriminator is not wrapped: Opacus' hooks attach to its own submodules, so its parameters
stay the same tensor objects under the same names (`trunk.*`, `heads.<t>.*`) and the upload,
gossip and sync code keep working on it unchanged.
"""

from __future__ import annotations

import contextlib
import secrets
import warnings
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.grad_sample import GradSampleHooks
from opacus.optimizers import DPOptimizer

from entgan.gan import adam
from entgan.config import OptimizerConfig, PrivacyConfig
from entgan.models.discriminator import Discriminator


@contextlib.contextmanager
def _quiet_backward_hooks() -> Iterator[None]:
    """Silence torch's warning that the first layer's backward hook fires although its input (the
    images) needs no gradient: harmless here, the hook must fire to record per-sample gradients."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        yield


@lru_cache(maxsize=64)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Renyi DP of one subsampled Gaussian step at Opacus' default orders. Composition over n steps
    is n times this, so epsilon is cheap to report every round (Opacus recomputes it from scratch:
    about a third of a second per call)."""
    return rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
    )


class PrivateDiscriminatorTraining:
    """DP-SGD steps (clip per sample, add noise, account) for one worker's discriminator.

    `generator` drives Poisson sampling and noise. Give one only for reproducible experiments
    (see `PrivacyConfig.reproducible_noise`); without it both come from fresh OS entropy, so nobody
    who knows the run seed can regenerate the noise.
    """

    def __init__(
        self,
        discriminator: Discriminator,
        task: int,
        privacy: PrivacyConfig,
        optimizer: OptimizerConfig,
        shard_size: int,
        batch_size: int,
        generator: torch.Generator | None = None,
    ) -> None:
        if shard_size < 1 or batch_size < 1:
            raise ValueError(f"need shard_size >= 1 and batch_size >= 1, found {shard_size} and {batch_size}")
        self.discriminator = discriminator
        self.task = task
        self.privacy = privacy
        self.shard_size = shard_size
        self.batch_size = batch_size
        self.sample_rate = min(1.0, batch_size / shard_size)
        device = next(discriminator.parameters()).device
        if generator is None:
            generator = torch.Generator().manual_seed(secrets.randbits(63))
        self._sampling = generator
        # Noise is drawn on the parameters' device, which needs a generator of its own there.
        noise_seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
        self._noise = torch.Generator(device=device).manual_seed(noise_seed)

        for index, head in enumerate(discriminator.heads):
            head.requires_grad_(index == task)
        # Hooks go only on modules with trainable parameters, so heads must be frozen before this.
        self._hooks = GradSampleHooks(discriminator, loss_reduction="mean", strict=True)
        trainable = [p for p in discriminator.parameters() if p.requires_grad]
        self.optimizer = DPOptimizer(
            adam(trainable, optimizer.lr_discriminator, optimizer),
            noise_multiplier=privacy.noise_multiplier,
            max_grad_norm=privacy.max_grad_norm,
            # The sum of clipped gradients is divided by the real batch size: with no clipping and no
            # noise, a step equals a plain step on mean(real loss) + mean(fake loss).
            expected_batch_size=batch_size,
            generator=self._noise,
        )
        self.accountant = RDPAccountant() if privacy.accountant == "rdp" else PRVAccountant()
        self.optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(self.sample_rate))

    @property
    def steps(self) -> int:
        """DP steps taken so far (each charged to the accountant once)."""
        return sum(int(count) for _, _, count in self.accountant.history)

    def sample_real(self, images: torch.Tensor) -> torch.Tensor:
        """A Poisson-sampled real batch from the worker's shard (its size varies around batch_size)."""
        if images.shape[0] != self.shard_size:
            raise ValueError(f"the shard has {images.shape[0]} images, this trainer was set up for {self.shard_size}")
        chosen = torch.rand(self.shard_size, generator=self._sampling) < self.sample_rate
        return images[chosen.nonzero().squeeze(1).to(images.device)]

    def step(
        self,
        real: torch.Tensor,
        fake: torch.Tensor,
        regulariser: Callable[[], torch.Tensor] | None = None,
    ) -> tuple[float, float, float]:
        """One DP-SGD step on real and fake together; returns (D loss, mean realness of the real
        batch, mean realness of the fake batch) as `discriminator_loss` does. The real figures are
        NaN when Poisson sampling drew no real sample (the step still runs: it is still charged).

        `regulariser`, if given, must not read real data; its gradient joins after the noise.
        """
        fake = fake.detach()
        batch = torch.cat([real, fake])
        targets = torch.cat([torch.ones(real.shape[0]), torch.zeros(fake.shape[0])]).to(batch.device)
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.discriminator(batch, self.task)
        per_sample = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        with _quiet_backward_hooks():
            # With "mean" reduction Opacus rescales the backward of a batch mean to per-sample losses.
            per_sample.mean().backward()
        self.optimizer.pre_step()  # clip each sample, sum, add noise, divide, charge the accountant
        if regulariser is not None:
            self._hooks.disable_hooks()
            try:
                with _quiet_backward_hooks():
                    regulariser().backward()  # accumulates onto the privatised gradient
            finally:
                self._hooks.enable_hooks()
        self.optimizer.original_optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # per-sample gradients are large: free them now

        real_loss, fake_loss = per_sample.detach().split([real.shape[0], fake.shape[0]])
        real_score, fake_score = torch.sigmoid(logits.detach()).split([real.shape[0], fake.shape[0]])
        return (
            (real_loss.mean() + fake_loss.mean()).item(),
            real_score.mean().item(),
            fake_score.mean().item(),
        )

    def epsilon(self) -> float:
        """Privacy spent so far: epsilon at the configured delta (0 before the first step, infinite
        once a step ran without noise: clipping alone bounds nothing)."""
        if not self.accountant.history:
            return 0.0
        if self.privacy.noise_multiplier == 0:
            return float("inf")
        if isinstance(self.accountant, RDPAccountant):
            rdp = sum(_rdp_of_one_step(sigma, rate) * steps for sigma, rate, steps in self.accountant.history)
            epsilon, _ = rdp_analysis.get_privacy_spent(
                orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=self.privacy.delta
            )
            return float(epsilon)
        return float(self.accountant.get_epsilon(delta=self.privacy.delta))

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state and privacy spent, for checkpoints: a resumed run must go on counting.
        The random streams are included only when they come from the run seed anyway; secret ones
        never leave the worker's memory."""
        state: dict[str, Any] = {
            "optimizer": self.optimizer.state_dict(),
            "accountant": self.accountant.state_dict(),
        }
        if self.privacy.reproducible_noise:
            state["sampling_rng"] = self._sampling.get_state()
            state["noise_rng"] = self._noise.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.accountant.load_state_dict(state["accountant"])
        if "sampling_rng" in state:
            self._sampling.set_state(state["sampling_rng"])
            self._noise.set_state(state["noise_rng"])
