"""Mechanics shared by the baselines whose workers train locally and upload to a server (MD-GAN,
FL-GAN), kept here once so that `mdgan.py` and `flgan.py` read like their papers.

- the handshake that tells the server each worker's task and sample count;
- one local D step and one local G step, on the shared losses of `base.py`;
- the `WorkerReport` a worker piggybacks on each upload (`UploadMeter`);
- uploads in the engine's authenticated envelopes (`engine.updates`), received by the server in
  arrival order, with refused ones logged and skipped (`ArrivingUpdates`);
- digests of a worker's models for the end-of-run check.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from entgan.algorithms.base import WorkerReport, discriminator_loss, generator_loss
from entgan.config import RunConfig
from entgan.engine.context import SERVER_RANK, RunContext
from entgan.engine.parameters import flatten, model_tensors
from entgan.engine.transport import TrafficCounters, Transfer
from entgan.engine.updates import Refusal, Update, UpdateLayout, UpdateReceiver, send_update
from entgan.models.discriminator import Discriminator


def reject_privacy(config: RunConfig) -> None:
    """These baselines train D without DP-SGD; refuse a private run instead of silently ignoring it."""
    if config.privacy.enabled:
        raise ValueError(f"privacy.enabled is not supported by algorithm '{config.algorithm}' (only by 'entgan')")


def send_hello(context: RunContext, num_samples: int) -> None:
    """Worker: tell the server which task it serves and how many samples it holds (averaging weights)."""
    hello = torch.tensor([context.task, num_samples], dtype=torch.int64, device=context.device)
    context.transport.send([hello], SERVER_RANK, "hello").wait()


def receive_hellos(context: RunContext) -> dict[int, int]:
    """Server: every worker's sample count, after checking it serves the task the config gives it."""
    counts: dict[int, int] = {}
    for rank in context.worker_ranks:
        hello = torch.zeros(2, dtype=torch.int64, device=context.device)
        context.transport.receive([hello], rank, "hello").wait()
        task, count = (int(value) for value in hello)
        if task != context.task_of(rank):
            raise RuntimeError(f"worker {rank} serves task {task}, the server's config says {context.task_of(rank)}")
        counts[rank] = count
    return counts


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


def upload(
    context: RunContext, values: torch.Tensor, extras: torch.Tensor, layout: UpdateLayout, round_index: int, kind: str
) -> Transfer:
    """Worker: send `values` (+ `extras`) to the server in an authenticated envelope, asynchronously."""
    key = context.session_keys[SERVER_RANK]
    return send_update(context.transport, key, values, extras, layout, round_index, SERVER_RANK, kind)


class ArrivingUpdates:
    """Server: one `kind` upload from each worker, yielded in arrival order once accepted.

    Each upload is checked (`engine.updates`); a refused one is logged to the run's events and
    skipped, so what the method averages or back-propagates comes from accepted uploads only.
    Uploads are consumed one at a time: never K of them held at once.
    """

    def __init__(
        self, context: RunContext, kind: str, extras_size: int, layout_of: Callable[[int], UpdateLayout]
    ) -> None:
        """`layout_of(rank)`: the layout of the values that worker `rank` uploads."""
        self.context = context
        self.kind = kind
        self.receiver = UpdateReceiver(
            context.transport,
            context.session_keys,
            extras_size,
            layout_of=layout_of,
            max_norm=context.config.security.max_update_norm,
        )
        self.refused = 0
        """Uploads refused in the round being received."""

    def round(self, round_index: int) -> Iterator[Update]:
        self.refused = 0
        waiting = list(self.context.worker_ranks)
        while waiting:
            received = self.receiver.receive(self.kind, waiting, round_index)
            waiting.remove(received.rank)
            if isinstance(received, Refusal):
                self.context.log_event(received.as_event())
                self.refused += 1
                continue
            yield received


def model_digest(module: nn.Module, name: str) -> dict[str, float]:
    """Sum and absolute sum of a model's state, in float64 (tests compare copies with them)."""
    values = flatten(model_tensors(module)).double()
    return {f"{name}_sum": float(values.sum()), f"{name}_abs_sum": float(values.abs().sum())}
