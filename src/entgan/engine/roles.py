"""The round loop: what rank 0 (server) and ranks 1..K (workers) do around an algorithm's rounds.

The engine owns everything that is not the method itself: timing, memory and traffic probes,
evaluation (FID, task fidelity, sample grids), the metrics stream, checkpoints, the progress bar.
An algorithm only fills `server_round` / `worker_round`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from entgan.algorithms.base import Algorithm
from entgan.config import StopConfig
from entgan.data import build_tasks, load_source, worker_shards
from entgan.engine.context import SERVER_RANK, RunContext
from entgan.engine.transport import Transfer
from entgan.metrics import PeakRSSMonitor, QualityEvaluator, current_rss_bytes
from entgan.metrics.classifier import DomainClassifier
from entgan.plots import plot_training, save_image_grid
from entgan.rundir import RunDirectory


@dataclass
class Evaluation:
    """Evaluation harness on the server. It reads real data only to measure quality (FID needs
    real statistics); the training protocol never moves real data."""

    evaluator: QualityEvaluator
    task_names: list[str]
    samples_per_task: int
    grid_size: int
    seed: int

    def run(self, algorithm: Algorithm, run_dir: RunDirectory, round_index: int) -> dict[str, float]:
        generator = algorithm.generator
        latents = torch.Generator().manual_seed(self.seed)  # the same latents at every evaluation
        fakes = {
            name: generator.sample(task, self.samples_per_task, generator=latents)
            for task, name in enumerate(self.task_names)
        }
        for name, images in fakes.items():
            save_image_grid(images[: self.grid_size], run_dir.sample_grid_path(name, round_index))
        return self.evaluator.evaluate(fakes).to_dict()


def build_evaluation(context: RunContext, classifier: DomainClassifier) -> Evaluation:
    config = context.config
    tasks = build_tasks(config, load_source(config.data))
    evaluator = QualityEvaluator(
        classifier,
        {task.name: task.dataset.images for task in tasks},
        {task.name: list(task.labels) for task in tasks},
        max_real_per_task=2000,
    )
    return Evaluation(
        evaluator=evaluator,
        task_names=[task.name for task in tasks],
        samples_per_task=config.eval.samples_per_task,
        grid_size=config.eval.grid_size,
        seed=config.seed + 7919,
    )


def is_eval_round(round_number: int, config_every: int, total_rounds: int) -> bool:
    """Evaluate after the first round, every `every` rounds, and after the last round."""
    return round_number == 1 or round_number % config_every == 0 or round_number == total_rounds


def stop_reason(stop: StopConfig, row: dict[str, Any]) -> str | None:
    """Why the run should end early after this round's row, or None to go on."""
    if stop.time_budget_s is not None and row["train_clock_s"] >= stop.time_budget_s:
        return "time_budget"
    if stop.end_at_target and stop.target_fid is not None and row.get("fid/overall", math.inf) <= stop.target_fid:
        return "target"
    return None


class RoundControl:
    """The server tells the workers, one round late, whether the run goes on.

    Workers must not wait for the server's decision about round r before starting round r+1 (that
    would serialise evaluation into their path and undo the overlap of every method), so the server
    announces its decision after round r and a worker reads it after finishing round r+1. A stop
    decided after round r therefore ends the run after round r+1, on every rank alike.
    """

    def __init__(self, context: RunContext, first_round: int) -> None:
        self.transport = context.transport
        self.workers = context.worker_ranks
        self.first_round = first_round
        self._announced: Transfer | None = None
        self._flag = torch.zeros(1, dtype=torch.int64, device=context.device)

    def announce(self, stop: bool) -> None:
        """Server, after a round that is not the last: tell every worker whether to go on."""
        if self._announced is not None:
            self._announced.wait()
        self._flag.fill_(int(stop))
        self._announced = self.transport.send_to_many([self._flag], self.workers, "control")

    def finish(self) -> None:
        if self._announced is not None:
            self._announced.wait()
            self._announced = None

    def should_stop(self, round_index: int) -> bool:
        """Worker, after round `round_index`: read the server's decision about the round before."""
        if round_index == self.first_round:
            return False
        self.transport.receive([self._flag], SERVER_RANK, "control").wait()
        return bool(self._flag.item())


def serve(
    context: RunContext, algorithm: Algorithm, classifier: DomainClassifier, show_progress: bool = True
) -> dict[str, Any]:
    """Rank 0: set up, run every round, evaluate, log, checkpoint; return the run summary."""
    config = context.config
    run_dir = RunDirectory(context.run_dir)
    evaluation = build_evaluation(context, classifier)
    # Baseline = the idle runtime (interpreter, torch, evaluation harness); the increase over it is
    # what the method itself costs the server: models, optimizer state, buffers, activations.
    memory = PeakRSSMonitor().start()
    algorithm.server_setup()
    counters = context.transport.counters

    started = time.perf_counter()
    harness_seconds = 0.0  # evaluation and checkpoint time, excluded from the training clock
    last_eval_clock = 0.0
    latest: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    control = RoundControl(context, first_round=0)
    stopped_because = "rounds"
    ending = False  # a stop was announced: this round is the last
    progress = tqdm(total=config.rounds, desc=f"{config.name} [{algorithm.name}]", disable=not show_progress)
    for round_number in range(1, config.rounds + 1):
        round_started = time.perf_counter()
        round_metrics = algorithm.server_round(round_number - 1)
        round_seconds = time.perf_counter() - round_started
        train_clock = time.perf_counter() - started - harness_seconds
        is_last = ending or round_number == config.rounds
        row: dict[str, Any] = {
            "round": round_number,
            "round_s": round_seconds,
            "train_clock_s": train_clock,
            "wall_clock_s": time.perf_counter() - started,
            "server/rss_bytes": current_rss_bytes(),
            "server/peak_rss_bytes": memory.peak_bytes,
            "server/rss_increase_bytes": memory.increase_bytes,
            "server/bytes_sent": counters.bytes_sent,
            "server/bytes_received": counters.bytes_received,
            "server/comm_wait_s": counters.wait_seconds,
            **round_metrics,
        }
        harness_started = time.perf_counter()
        every_seconds = config.eval.every_seconds
        if (
            is_last
            or is_eval_round(round_number, config.eval.every, config.rounds)
            or (every_seconds is not None and train_clock - last_eval_clock >= every_seconds)
        ):
            quality = evaluation.run(algorithm, run_dir, round_number)
            row.update(quality)
            latest = {key: value for key, value in quality.items() if key.startswith("fid/")}
            last_eval_clock = train_clock
        if config.checkpoint.every and round_number % config.checkpoint.every == 0 or is_last:
            run_dir.save_checkpoint(checkpoint_state(context, algorithm, round_number), round_number)
        harness_seconds += time.perf_counter() - harness_started
        run_dir.append_metrics(row)
        rows.append(row)
        progress.update(1)
        progress.set_postfix(_progress_fields(row, latest), refresh=False)
        if is_last:
            break
        reason = stop_reason(config.stop, row)
        if reason is not None:
            stopped_because, ending = reason, True
        control.announce(stop=ending)
    progress.close()
    control.finish()

    algorithm.server_finish()
    memory.stop()
    plot_training(rows, run_dir.plots / "training.png", title=f"{config.name} ({algorithm.name})")
    summary = {
        "name": config.name,
        "algorithm": algorithm.name,
        "rounds": len(rows),
        "planned_rounds": config.rounds,
        "stopped_because": stopped_because,
        "workers": config.num_workers,
        "train_clock_s": rows[-1]["train_clock_s"],
        "wall_clock_s": time.perf_counter() - started,
        "server_peak_rss_bytes": memory.peak_bytes,
        "server_baseline_rss_bytes": memory.baseline_bytes,
        "server_rss_increase_bytes": memory.increase_bytes,
        "first_eval": _eval_fields(rows[0]),
        "final_eval": _eval_fields(rows[-1]),
        **{f"server/{key}": value for key, value in counters.as_dict().items()},
        "generator_sum": float(sum(t.double().sum() for t in algorithm.generator.state_dict().values())),
    }
    run_dir.write_json("summary.json", summary)
    return summary


def checkpoint_state(context: RunContext, algorithm: Algorithm, round_number: int) -> dict[str, Any]:
    return {
        "format": 1,
        "algorithm": algorithm.name,
        "round": round_number,
        "config": context.config.model_dump(mode="json"),
        "server": algorithm.server_state(),
    }


def work(context: RunContext, algorithm: Algorithm) -> None:
    """Ranks 1..K: load the local shard (data stays here), then run every round."""
    config = context.config
    shard = worker_shards(config, build_tasks(config, load_source(config.data)))[context.worker_index]
    algorithm.worker_setup(shard)
    control = RoundControl(context, first_round=0)
    for round_index in range(config.rounds):
        algorithm.worker_round(round_index)
        if control.should_stop(round_index):
            break
    algorithm.worker_finish()
    digest = {
        "rank": context.rank,
        "task": config.tasks[context.task].name,
        "samples": len(shard),
        **algorithm.worker_digest(),
        **context.transport.counters.as_dict(),
    }
    path = RunDirectory(context.run_dir).workers / f"rank-{context.rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)  # under torchrun, a worker's machine has its own copy
    path.write_text(json.dumps(digest, indent=2, sort_keys=True))


def _eval_fields(row: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in row.items() if k.startswith(("fid/", "fidelity/")) or k == "round"}


def _progress_fields(row: dict[str, Any], latest_fid: dict[str, float]) -> dict[str, str]:
    fields = {"G": f"{row.get('g_loss', math.nan):.3f}", "D": f"{row.get('d_loss', math.nan):.3f}"}
    fields.update({key.removeprefix("fid/"): f"{value:.1f}" for key, value in latest_fid.items()})
    return fields
