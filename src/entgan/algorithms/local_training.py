"""Mechanics shared by the baselines whose workers train locally and upload to a server (MD-GAN,
FL-GAN, DANCE), kept here once so that `mdgan.py`, `flgan.py` and `dance.py` read like their papers.

- one local D step and one local G step, on the shared losses of `base.py`;
- the error feedback dL_G/dx a worker returns for the server's fakes (MD-GAN, DANCE);
- the `WorkerReport` a worker piggybacks on each upload (`UploadMeter`), after the method's own
  per-round figures (`upload_extras`), and the server's side of both (`UploadedFigures`).

The handshake and the upload envelopes are in `uploads.py` (EntGAN and every baseline use them).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from entgan.algorithms.base import WorkerReport, discriminator_loss, generator_loss
from entgan.engine.transport import TrafficCounters
from entgan.engine.updates import Update
from entgan.models.discriminator import Discriminator


def discriminator_step(
    discriminator: Discriminator,
    optimizer: torch.optim.Optimizer,
    real: torch.Tensor,
    fake: torch.Tensor,
    task: int,
) -> tuple[float, float, float]:
    """One D update on real vs. fake on `task`'s head; returns (loss, real realness, fake realness)."""
    loss, real_realness, fake_realness = discriminator_loss(discriminator, real, fake, task)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item(), real_realness, fake_realness


def generator_step(
    optimizer: torch.optim.Optimizer, discriminator: Discriminator, fakes: torch.Tensor, task: int
) -> tuple[float, float]:
    """One G update (non-saturating loss against `discriminator`) through `fakes`' graph.

    The gradients this leaves on D's parameters are cleared by the next D step's `zero_grad`.
    Returns (loss, mean realness D gives the fakes).
    """
    loss, realness = generator_loss(discriminator, fakes, task)  # type: ignore[arg-type]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item(), realness


def error_feedback(discriminator: Discriminator, fakes: torch.Tensor, task: int) -> tuple[torch.Tensor, float, float]:
    """Worker: F = dL_G/dx for every image x of `fakes` (the generator loss on D's `task` head).

    Only the images get gradients; D is not updated by this pass. Returns (F, loss, realness).
    """
    images = fakes.detach().requires_grad_(True)
    loss, realness = generator_loss(discriminator, images, task)  # type: ignore[arg-type]
    (feedback,) = torch.autograd.grad(loss, images)
    return feedback, loss.item(), realness


class StepMeans:
    """Means of per-step figures (loss, realness, ...) over a round's local steps."""

    def __init__(self, width: int) -> None:
        self._sums = [0.0] * width
        self.count = 0

    def add(self, *values: float) -> None:
        if len(values) != len(self._sums):
            raise ValueError(f"expected {len(self._sums)} figures per step, found {len(values)}")
        self._sums = [total + value for total, value in zip(self._sums, values, strict=True)]
        self.count += 1

    def means(self) -> list[float]:
        if self.count == 0:
            return [float("nan")] * len(self._sums)
        return [total / self.count for total in self._sums]


class UploadMeter:
    """A worker's traffic and time between two uploads, as the `WorkerReport` the second carries.

    Counting from the previous upload (not from the start of the round) books every byte in
    exactly one report: the previous upload itself, then this round's downloads and peer traffic.
    """

    def __init__(self, counters: TrafficCounters) -> None:
        self._counters = counters
        self.restart()

    def restart(self) -> None:
        self._started = time.perf_counter()
        self._sent = self._counters.bytes_sent
        self._received = self._counters.bytes_received
        self._waited = self._counters.wait_seconds

    def report(self, d_loss: float, real_realness: float, fake_realness: float) -> WorkerReport:
        return WorkerReport(
            d_loss=d_loss,
            real_realness=real_realness,
            fake_realness=fake_realness,
            bytes_sent=self._counters.bytes_sent - self._sent,
            bytes_received=self._counters.bytes_received - self._received,
            comm_wait_s=self._counters.wait_seconds - self._waited,
            compute_s=time.perf_counter() - self._started,
        )


def named_state(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs `model_tensors` sends, for an update envelope's layout."""
    return [(name, tensor.data) for name, tensor in module.state_dict(keep_vars=True).items()]


def upload_extras(figures: Sequence[float], report: WorkerReport, device: torch.device) -> torch.Tensor:
    """Worker: an upload's extras, the method's own per-round figures followed by the report."""
    return torch.cat([torch.tensor(list(figures)), report.to_tensor()]).to(device)


class UploadedFigures:
    """Server: the figures and `WorkerReport`s that one round's accepted uploads carry in their
    extras (`upload_extras`), each upload `width` figures wide."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.figures = StepMeans(width)
        self.reports: dict[int, WorkerReport] = {}

    def add(self, update: Update) -> None:
        figures, report = update.extras.split([self.width, WorkerReport.SIZE])
        self.figures.add(*figures.tolist())
        self.reports[update.rank] = WorkerReport.from_tensor(report)
