"""Per-round reports: what each worker's upload carries about its round, metered once for all.

A worker's report counts its traffic and time since its previous upload (`TrafficMeter`), so
every byte a worker moves after setup lands in exactly one report, except those after its last
upload (written to `workers/rank-K.json` as the unreported remainder). The server turns a round's
reports into the row of `metrics.jsonl` (`summarise_reports`).
"""

from __future__ import annotations

import time
from dataclasses import astuple, dataclass, fields
from typing import ClassVar

import torch

from entgan.engine.transport import TrafficCounters


@dataclass(frozen=True)
class WorkerReport:
    """Per-round figures a worker piggybacks on its upload (a handful of floats)."""

    d_loss: float = 0.0
    real_realness: float = 0.0
    fake_realness: float = 0.0
    bytes_sent: float = 0.0
    bytes_received: float = 0.0
    comm_wait_s: float = 0.0
    compute_s: float = 0.0
    epsilon: float = 0.0
    """Differential privacy spent by this worker so far (at `privacy.delta`); 0 when privacy is
    off, and then left out of the metrics (0 would read as "perfectly private")."""

    SIZE: ClassVar[int] = 8

    def to_tensor(self) -> torch.Tensor:
        return torch.tensor(astuple(self), dtype=torch.float32)

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> WorkerReport:
        return cls(*[float(v) for v in values.tolist()])

    def as_metrics(self, rank: int) -> dict[str, float]:
        return {
            f"worker{rank}/{field.name}": getattr(self, field.name)
            for field in fields(self)
            if not (field.name == "epsilon" and self.epsilon == 0.0)
        }


assert WorkerReport.SIZE == len(fields(WorkerReport))


def summarise_reports(reports: dict[int, WorkerReport]) -> dict[str, float]:
    """Per-worker figures plus their means and the workers' total traffic."""
    metrics: dict[str, float] = {}
    for rank in sorted(reports):
        metrics.update(reports[rank].as_metrics(rank))
    if reports:
        values = list(reports.values())
        metrics["d_loss"] = sum(r.d_loss for r in values) / len(values)
        metrics["d_real_realness"] = sum(r.real_realness for r in values) / len(values)
        metrics["d_fake_realness"] = sum(r.fake_realness for r in values) / len(values)
        metrics["workers/bytes_sent"] = sum(r.bytes_sent for r in values)
        metrics["workers/bytes_received"] = sum(r.bytes_received for r in values)
    return metrics


class TrafficMeter:
    """A worker's traffic and time between two uploads, as the `WorkerReport` the second carries.

    Counting from the previous upload (not from the start of the round) books every byte in
    exactly one report: the previous upload itself, then the downloads and peer traffic since."""

    def __init__(self, counters: TrafficCounters) -> None:
        self._counters = counters
        self.setup_bytes = {"setup_bytes_sent": float(counters.bytes_sent), "setup_bytes_received": float(counters.bytes_received)}
        """What the worker moved before its first round (handshake, starting models)."""
        self.restart()

    def state_dict(self) -> dict[str, float]:
        """Where the current report's byte counts start (time restarts on resume)."""
        return {"sent": float(self._sent), "received": float(self._received), **self.setup_bytes}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self._sent, self._received = int(state["sent"]), int(state["received"])
        self.setup_bytes = {key: state[key] for key in ("setup_bytes_sent", "setup_bytes_received")}

    def restart(self) -> None:
        self._started = time.perf_counter()
        self._sent = self._counters.bytes_sent
        self._received = self._counters.bytes_received
        self._waited = self._counters.wait_seconds

    def unreported(self) -> dict[str, float]:
        """Bytes moved since the last report (after the last upload: never in a report)."""
        return {
            "unreported_bytes_sent": float(self._counters.bytes_sent - self._sent),
            "unreported_bytes_received": float(self._counters.bytes_received - self._received),
        }

    def report(self, d_loss: float, real_realness: float, fake_realness: float, epsilon: float = 0.0) -> WorkerReport:
        return WorkerReport(
            d_loss=d_loss,
            real_realness=real_realness,
            fake_realness=fake_realness,
            bytes_sent=self._counters.bytes_sent - self._sent,
            bytes_received=self._counters.bytes_received - self._received,
            comm_wait_s=self._counters.wait_seconds - self._waited,
            compute_s=time.perf_counter() - self._started,
            epsilon=epsilon,
        )


class FigureMeans:
    """Means of per-step (or per-upload) figures over a round."""

    def __init__(self, width: int) -> None:
        self._sums = [0.0] * width
        self.count = 0

    def add(self, *values: float) -> None:
        if len(values) != len(self._sums):
            raise ValueError(f"expected {len(self._sums)} figures, found {len(values)}")
        self._sums = [total + value for total, value in zip(self._sums, values, strict=True)]
        self.count += 1

    def means(self) -> list[float]:
        if self.count == 0:
            return [float("nan")] * len(self._sums)
        return [total / self.count for total in self._sums]
