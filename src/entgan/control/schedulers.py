"""Task schedulers: the worker's (when its edge generator runs) and the server's (how long G trains).

Each is a small object with one decision, so that a benchmark can switch it off and measure what
it buys. Switched off, each falls back to the fixed schedule a plain implementation would use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from entgan.config import ServerSchedulerConfig, StragglerAwareConfig, WorkerSchedulerConfig


@dataclass(frozen=True)
class WorkerPlan:
    """What a worker does in one round."""

    d_steps: int
    """Discriminator steps on local real data vs. G_k's fakes."""
    fake_batches: int
    """Fake batches G_k generates this round; D step i uses batch i * fake_batches // d_steps."""
    generate_upfront: bool
    """Generate all of the round's fakes in one batched forward pass (cheaper than d_steps small
    ones), streaming through G's layers as they arrive."""

    def fake_batch_for_step(self, step: int) -> int:
        return step * self.fake_batches // self.d_steps


class WorkerTaskScheduler:
    """Decides when the edge generator runs and how often a fake batch is reused.

    On: the round's fakes are generated once, up front, in one batched pass that starts as soon as
    G's first layers arrive, and each fake batch serves `fake_reuse` D steps. Off: one fresh fake
    batch per D step, generated just before it (the textbook GAN loop).
    """

    def __init__(self, config: WorkerSchedulerConfig, d_steps: int | None = None) -> None:
        """`d_steps`: this worker's D steps a round, where they differ from `config.d_steps`
        (`local_steps`)."""
        self.config = config
        self.d_steps = config.d_steps if d_steps is None else d_steps

    def fake_tasks(
        self, n: int, own_task: int, num_tasks: int, generator: torch.Generator, like_server: bool = False
    ) -> torch.Tensor:
        """Which task each of G_k's `n` fakes is generated for.

        Mostly the worker's own task; with the scheduler on, a share `other_task_fakes` goes to
        the other tasks. D_k's own head scores all of them as fake, so it learns that another
        task's digits do not belong to its task, which is what keeps G's tasks apart.

        `like_server`, for a generator with batch statistics (BatchNorm): every task equally
        represented, as in the server's G batches, whether the scheduler is on or off. A sample of
        such a G depends on its batch's task mix; drawn from a mostly-own-task batch, the fakes D_k
        learns to reject are not the samples the server's G produces, and D's signal to G is lost
        (figures: benchmarks/README.md, Design measurements).
        """
        if like_server:
            return (own_task + torch.arange(n)) % num_tasks
        tasks = torch.full((n,), own_task, dtype=torch.long)
        share = self.config.other_task_fakes if self.config.enabled else 0.0
        others = int(round(n * share)) if num_tasks > 1 else 0
        if others:
            offsets = torch.randint(1, num_tasks, (others,), generator=generator)
            tasks[:others] = (own_task + offsets) % num_tasks
        return tasks

    def plan(self, round_index: int) -> WorkerPlan:
        steps = self.d_steps
        if not self.config.enabled:
            return WorkerPlan(d_steps=steps, fake_batches=steps, generate_upfront=False)
        batches = max(1, -(-steps // self.config.fake_reuse))
        return WorkerPlan(d_steps=steps, fake_batches=batches, generate_upfront=True)


def local_steps(steps: int, worker_index: int, straggler_aware: StragglerAwareConfig | None) -> int:
    """Worker `worker_index`'s local steps a round, for a method configured with `steps`: scaled by
    its declared speed over the fastest worker's (`engine.straggler_aware.speed`), at least one;
    `steps` when no speeds are declared."""
    speeds = None if straggler_aware is None else straggler_aware.speed
    if not speeds:
        return steps
    share = speeds[worker_index % len(speeds)] / max(speeds)
    return max(1, round(steps * share))


@dataclass(frozen=True)
class GeneratorFeedback:
    """What the server observed while training G last round."""

    fake_realness: float
    """Mean probability, under the averaged D, that G's samples are real."""


class ServerTaskScheduler:
    """Decides how many G iterations run against the averaged D this round.

    A GAN stalls when one player runs away: if D confidently rejects G's samples (realness below
    `behind_below`), G gets one more step next round; if G fools D (realness above `ahead_above`),
    one step fewer, within [min_g_steps, max_g_steps]. Off: always `g_steps`.
    """

    def __init__(self, config: ServerSchedulerConfig) -> None:
        self.config = config
        self._steps = config.g_steps

    def next_steps(self, feedback: GeneratorFeedback | None) -> int:
        if not self.config.enabled or feedback is None:
            return self._steps
        if feedback.fake_realness < self.config.behind_below:
            self._steps = min(self._steps + 1, self.config.max_g_steps)
        elif feedback.fake_realness > self.config.ahead_above:
            self._steps = max(self._steps - 1, self.config.min_g_steps)
        return self._steps

    def generator_batch(self, batch_size: int, num_tasks: int) -> int:
        """Samples per G step: `batch_size` of every task, so each task's part of G learns from as
        many samples per step as that task's D steps see; `batch_size` in all when off."""
        if self.config.enabled and self.config.g_batch_per_task:
            return batch_size * num_tasks
        return batch_size

    def state_dict(self) -> dict[str, int]:
        return {"steps": self._steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._steps = int(state["steps"])


class RoundParticipation:
    """Which workers train and upload in a round: the engine's participation policy
    (`engine.participation`), which every method that declares `partial_participation` follows.

    With a share below 1, each round a share of every task's workers (rounded up, so every task's
    head is updated every round) takes part and the others sit the round out. Why: a round ends
    only when its last upload arrives, and a server that waits for fewer workers has shorter
    rounds where workers are slow or share CPUs (FedAvg's client fraction C is the same lever).
    Which ones:

    - in turn (default), so that over rounds every worker trains equally often;
    - straggler-aware (`engine.straggler_aware`, given each worker's expected round time): those
      left out `max_rounds_out` rounds in a row first (longest out first), then the fastest, ties
      to the longest out, then to the fewest turns so far. With equal times every worker takes
      the same number of turns, as in turn; with uneven ones a slow worker joins about once every
      `max_rounds_out + 1` rounds, together with the task's other slow ones, instead of slowing
      every other round.

    Every rank derives the same schedule from the round index, the worker-to-task map and the
    config, without messages.
    """

    def __init__(
        self, share: float, worker_tasks: Sequence[int], straggler_aware: StragglerAwareConfig | None = None
    ) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"participation must be in (0, 1], found {share}")
        by_task: dict[int, list[int]] = {}
        for worker, task in enumerate(worker_tasks):
            by_task.setdefault(task, []).append(worker)
        self._task_workers = [by_task[task] for task in sorted(by_task)]
        # The tolerance keeps float products such as 0.3 * 10 = 3.0000000000000004 from rounding up.
        self._per_task = [max(1, math.ceil(share * len(workers) - 1e-9)) for workers in self._task_workers]
        self.everyone = all(count == len(workers) for count, workers in zip(self._per_task, self._task_workers))
        self._straggler_aware = straggler_aware
        if straggler_aware is not None:
            times = straggler_aware.round_s
            self._round_s = [times[worker % len(times)] for worker in range(len(worker_tasks))]
            self._rounds_out = [0] * len(worker_tasks)
            self._turns = [0] * len(worker_tasks)
            self._schedule: list[list[int]] = []

    def workers(self, round_index: int) -> list[int]:
        """Worker indices (0..K-1, ascending) that take part in round `round_index`."""
        if self._straggler_aware is not None and not self.everyone:
            while len(self._schedule) <= round_index:
                self._schedule.append(self._fastest_next())
            return self._schedule[round_index]
        chosen: list[int] = []
        for workers, count in zip(self._task_workers, self._per_task):
            start = round_index * count
            chosen.extend(workers[(start + offset) % len(workers)] for offset in range(count))
        return sorted(chosen)

    def _fastest_next(self) -> list[int]:
        """The next round's workers under the straggler-aware rule (rounds are decided in order)."""
        assert self._straggler_aware is not None
        limit = self._straggler_aware.max_rounds_out
        out, turns, round_s = self._rounds_out, self._turns, self._round_s
        chosen: list[int] = []
        for workers, count in zip(self._task_workers, self._per_task):
            due = sorted((w for w in workers if out[w] >= limit), key=lambda w: (-out[w], turns[w], w))
            rest = sorted((w for w in workers if out[w] < limit), key=lambda w: (round_s[w], -out[w], turns[w], w))
            chosen.extend((due + rest)[:count])
        for worker in range(len(out)):
            taken = worker in chosen
            out[worker] = 0 if taken else out[worker] + 1
            turns[worker] += taken
        return sorted(chosen)

    def includes(self, worker_index: int, round_index: int) -> bool:
        return self.everyone or worker_index in self.workers(round_index)
