"""The run loop: what rank 0 (server) and ranks 1..K (workers) do around a method's rounds.

The engine owns everything that is not the method itself: the round (`engine.rounds`, driving
the method's hooks), timing, memory and traffic probes, evaluation (FID, task fidelity, sample
grids), the metrics stream (`metrics.jsonl` and TensorBoard's, `entgan.tracking`), checkpoints
and resuming, the progress bar.
"""

from __future__ import annotations

import datetime
import json
import math
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from entgan.config import RunConfig, StopConfig
from entgan.data import build_tasks, load_source, worker_shards
from entgan.engine.context import SERVER_RANK, RunContext
from entgan.engine.method import Method, Role, ServerRole, WorkerRole
from entgan.engine.rounds import ServerRounds, WorkerRounds, phase_marker
from entgan.engine.timeline import CLOCK_START, HARNESS, ROUND_END
from entgan.engine.transport import Transfer
from entgan.gan import adam
from entgan.metrics import PeakRSSMonitor, QualityEvaluator, current_rss_bytes
from entgan.metrics.live_tensors import SavedActivations, role_tensor_bytes
from entgan.metrics.probes import high_water_mark_bytes, reset_high_water_mark
from entgan.metrics.classifier import DomainClassifier
from entgan.models import build_discriminator, build_generator
from entgan.models.generator import Generator
from entgan.plots import plot_training, save_image_grid
from entgan.rundir import RunDirectory
from entgan.tracking import RunTracker


EVALUATION_SEED_OFFSET = 7919
"""The evaluation's latents come from the run seed plus this prime: the same at every evaluation,
and apart from every training stream."""


@dataclass
class Evaluation:
    """Evaluation harness on the server. It reads real data only to measure quality (FID needs
    real statistics); the training protocol never moves real data."""

    evaluator: QualityEvaluator
    task_names: list[str]
    samples_per_task: int
    grid_size: int
    seed: int

    def run(
        self, server: ServerRole, run_dir: RunDirectory, round_index: int
    ) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """The round's quality figures, and the sample grid of every task (also written as PNG)."""
        fakes = self.samples(server.generator)
        grids = {name: images[: self.grid_size] for name, images in fakes.items()}
        for name, grid in grids.items():
            save_image_grid(grid, run_dir.sample_grid_path(name, round_index))
        return self.evaluator.evaluate(fakes).to_dict(), grids

    def samples(self, generator: Generator) -> dict[str, torch.Tensor]:
        latents = torch.Generator().manual_seed(self.seed)  # the same latents at every evaluation
        return {
            name: generator.sample(task, self.samples_per_task, generator=latents)
            for task, name in enumerate(self.task_names)
        }

    def warm_up(self, config: RunConfig) -> None:
        """One throwaway evaluation of an untrained generator, so the harness's lasting allocations
        (lazy initialisation, allocator arenas) belong to the idle baseline, not to the method."""
        rng_state = torch.get_rng_state()
        generator = build_generator(config.model, config.image_shape, len(config.tasks))
        fakes = self.samples(generator)
        self.evaluator.evaluate(fakes)
        with tempfile.TemporaryDirectory() as scratch:  # the image writer's first use, too
            save_image_grid(next(iter(fakes.values()))[: self.grid_size], Path(scratch) / "grid.png")
        torch.set_rng_state(rng_state)


def warm_up_runtime(config: RunConfig) -> None:
    """Pay torch's one-time costs before the memory baseline is taken: the first optimizer imports
    torch._dynamo and sympy (tens of MiB of modules), and the first forward and backward pass of
    each kind of layer sets up autograd and the CPU kernels' caches. Every method pays these alike;
    they are the runtime's, not the method's. Done on throwaway models of the run's architecture
    and a batch of two, with the random state put back afterwards."""
    rng_state = torch.get_rng_state()
    generator = build_generator(config.model, config.image_shape, len(config.tasks))
    discriminator = build_discriminator(config.model, config.image_shape, len(config.tasks))
    # Every method's optimizer (`adam`: the fused kernel, whose code is paged in on first use).
    parameters = [*generator.parameters(), *discriminator.parameters()]
    optimizer = adam(parameters, config.optimizer.lr_generator, config.optimizer)
    tasks = torch.zeros(2, dtype=torch.long)
    discriminator(generator(generator.sample_latent(2), tasks), tasks).mean().backward()
    optimizer.step()
    torch.set_rng_state(rng_state)


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
        seed=config.seed + EVALUATION_SEED_OFFSET,
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
    would serialise logging and checkpoints into their path and undo the overlap of every method;
    evaluation already happens before round r's models go down, `serve`), so the server
    announces its decision after round r and a worker reads it after finishing round r+1. A stop
    decided after round r therefore ends the run after round r+1, on every rank alike.

    Resuming from round r: the server's checkpoint of round r was written before its decision
    about round r went out, a worker's after it had read the decision about round r-1; so the
    resumed server announces its decision about round r (taken again from round r's row) before
    its first round, and every decision of the run is sent, read and counted once, as in a run
    that never stopped.
    """

    def __init__(self, context: RunContext) -> None:
        self.transport = context.transport
        self.workers = context.worker_ranks
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
        if round_index == 0:
            return False
        self.transport.receive([self._flag], SERVER_RANK, "control").wait()
        return bool(self._flag.item())


@dataclass
class Clock:
    """The training clock: wall time minus evaluation/checkpoint time, carried across a resume."""

    offset_s: float = 0.0
    harness_s: float = 0.0
    last_eval_s: float = 0.0

    def __post_init__(self) -> None:
        self._started = time.perf_counter()

    def wall_s(self) -> float:
        return self.offset_s + time.perf_counter() - self._started

    def train_s(self) -> float:
        return self.wall_s() - self.harness_s


def serve(
    context: RunContext, method: type[Method], classifier: DomainClassifier, show_progress: bool = True
) -> dict[str, Any]:
    """Rank 0: set up (or resume), run every round, evaluate, log, checkpoint; return the summary.

    A round due for evaluation is evaluated once its global models are final and before they go
    down (`ServerRounds.run`'s `before_send_down`): the workers, waiting for those models or for
    the next round's fakes, pause meanwhile, so no method's workers train for free while the
    server evaluates (the training clock leaves evaluation out)."""
    config = context.config
    run_dir = RunDirectory(context.run_dir)
    timeline = context.transport.timeline
    phase = phase_marker(timeline)
    phase(HARNESS, -1)
    evaluation = build_evaluation(context, classifier)
    evaluation.warm_up(config)
    warm_up_runtime(config)
    # Opened before the memory baseline: the writer's modules and thread belong to the idle runtime.
    tracker = RunTracker.open(config, run_dir.root, method.name, resume_round=resumed_round(context))
    # Baseline = the idle runtime (interpreter, torch, a warmed-up evaluation harness); the increase
    # over it is what the method itself costs the server: models, optimizer state, buffers,
    # activations. Evaluation and checkpoint writing are paused out of the window.
    memory = PeakRSSMonitor().start()
    server = method.server(context)
    phase("setup", -1)
    server.setup()
    start_round_timeouts(context)
    rounds = ServerRounds(context, server)
    counters = context.transport.counters
    engine_state = restore_engine_state(context)
    first_round = engine_state.get("round", 0)
    clock = Clock(engine_state.get("train_clock_s", 0.0), 0.0, engine_state.get("last_eval_s", 0.0))
    if timeline is not None:
        timeline.mark(CLOCK_START, first_round)
    earlier_peak = engine_state.get("peak", {"peak_bytes": 0, "increase_bytes": 0})  # before a resume

    latest: dict[str, float] = {}
    rows: list[dict[str, Any]] = run_dir.metrics() if first_round else []
    control = RoundControl(context)
    stopped_because = "rounds"
    ending = False  # a stop was announced: this round is the last
    if 0 < first_round < config.rounds:
        # Resumed: the decision about the checkpointed round, taken again from its row (the last
        # one kept), goes out now, where it went out after that round's checkpoint (`RoundControl`).
        reason = stop_reason(config.stop, rows[-1]) if rows else None
        if reason is not None:
            stopped_because, ending = reason, True
        control.announce(stop=ending)
    progress = tqdm(
        total=config.rounds, initial=first_round, desc=f"{config.name} [{method.name}]", disable=not show_progress
    )
    activations = SavedActivations() if config.engine.live_tensors else None
    for round_number in range(first_round + 1, config.rounds + 1):
        round_started = time.perf_counter()
        is_last = ending or round_number == config.rounds
        evaluated: dict[str, Any] = {}

        def evaluate_if_due() -> None:
            """Evaluate G of this round before it goes down (workers wait for it meanwhile), where
            the round's schedule says so; booked as harness, out of the training clock."""
            at = clock.train_s()
            every_seconds = config.eval.every_seconds
            if not (
                is_last
                or is_eval_round(round_number, config.eval.every, config.rounds)
                or (every_seconds is not None and at - clock.last_eval_s >= every_seconds)
            ):
                return
            started = time.perf_counter()
            phase(HARNESS, round_number - 1)
            with memory.paused():
                evaluated["quality"], evaluated["grids"] = evaluation.run(server, run_dir, round_number)
            clock.last_eval_s = at
            evaluated["seconds"] = time.perf_counter() - started
            clock.harness_s += evaluated["seconds"]

        with activations.measure() if activations is not None else nullcontext():
            method_row = rounds.run(round_number - 1, before_send_down=evaluate_if_due)
        round_seconds = time.perf_counter() - round_started - evaluated.get("seconds", 0.0)
        if timeline is not None:
            timeline.mark(ROUND_END, round_number)
            timeline.phase(HARNESS, round_number - 1)
        train_clock = clock.train_s()
        row: dict[str, Any] = {
            "round": round_number,
            "round_s": round_seconds,
            "train_clock_s": train_clock,
            "wall_clock_s": clock.wall_s(),
            "server/rss_bytes": current_rss_bytes(),
            "server/peak_rss_bytes": max(memory.peak_bytes, earlier_peak["peak_bytes"]),
            "server/rss_increase_bytes": max(memory.increase_bytes, earlier_peak["increase_bytes"]),
            **_high_water_mark_fields(memory, earlier_peak),
            "server/bytes_sent": counters.bytes_sent,
            "server/bytes_received": counters.bytes_received,
            "server/comm_wait_s": counters.wait_seconds,
            **method_row,
        }
        harness_started = time.perf_counter()
        with memory.paused():  # logging and checkpoints are the harness, not the method
            grids: dict[str, torch.Tensor] = evaluated.get("grids", {})
            if "quality" in evaluated:
                row.update(evaluated["quality"])
                latest = {key: value for key, value in evaluated["quality"].items() if key.startswith("fid/")}
            run_dir.append_metrics(row)  # before the checkpoint: a checkpoint's round is always logged
            tracker.log_round(row, grids)
            rows.append(row)
            if is_checkpoint_round(round_number, config.checkpoint.every) or is_last:
                engine = {
                    "train_clock_s": train_clock,
                    "last_eval_s": clock.last_eval_s,
                    "peak": {
                        "peak_bytes": row["server/peak_rss_bytes"],
                        "increase_bytes": row["server/rss_increase_bytes"],
                        "hwm_bytes": row.get("server/hwm_bytes", 0),
                        "hwm_increase_bytes": row.get("server/hwm_increase_bytes", 0),
                    },
                }
                state = checkpoint_state(context, method.name, server, round_number, engine)
                run_dir.save_checkpoint(state, round_number, keep=config.checkpoint.keep)
                if timeline is not None:
                    timeline.flush()
        clock.harness_s += time.perf_counter() - harness_started
        phase("control", round_number - 1)
        progress.update(1)
        progress.set_postfix(_progress_fields(row, latest), refresh=False)
        if is_last:
            break
        reason = stop_reason(config.stop, row)
        if reason is not None:
            stopped_because, ending = reason, True
        control.announce(stop=ending)
    progress.close()
    tracker.close()
    phase("finish", -1)
    control.finish()

    server.finish()
    phase(HARNESS, -1)
    memory.stop()
    plot_training(rows, run_dir.plots / "training.png", title=f"{config.name} ({method.name})")
    summary = {
        "name": config.name,
        "algorithm": method.name,
        "rounds": rows[-1]["round"],
        "planned_rounds": config.rounds,
        "stopped_because": stopped_because,
        "resumed_from_round": first_round,
        "workers": config.num_workers,
        "train_clock_s": rows[-1]["train_clock_s"],
        "wall_clock_s": clock.wall_s(),
        "server_peak_rss_bytes": rows[-1]["server/peak_rss_bytes"],
        "server_baseline_rss_bytes": memory.baseline_bytes,
        "server_rss_increase_bytes": rows[-1]["server/rss_increase_bytes"],
        "server_hwm_bytes": rows[-1].get("server/hwm_bytes"),
        "server_hwm_increase_bytes": rows[-1].get("server/hwm_increase_bytes"),
        "refused_updates": sum(row.get("refused_updates", 0.0) for row in rows),
        # Differential privacy spent by each private worker over the whole run (at privacy.delta):
        # its latest report (a worker that sat out the last rounds reported in an earlier row).
        "epsilon_by_worker": {
            key.split("/")[0]: value for row in rows for key, value in row.items() if key.endswith("/epsilon")
        },
        "first_eval": _eval_fields(rows[0]),
        "final_eval": _eval_fields(rows[-1]),
        **{f"server/{key}": value for key, value in counters.as_dict().items()},
        "generator_sum": float(sum(t.double().sum() for t in server.generator.state_dict().values())),
        **_live_tensor_fields(server, activations, "server_live_tensors"),
    }
    run_dir.write_json("summary.json", summary)
    if timeline is not None:
        timeline.flush()
    return summary


def is_checkpoint_round(round_number: int, every: int) -> bool:
    return every > 0 and round_number % every == 0


def start_round_timeouts(context: RunContext) -> None:
    """From the first round on, every wait of this rank may block at most `round_timeout_s`; the
    set-up exchanges before it (hellos, initial models), which wait for slower peers' start-up,
    had the start timeout."""
    context.transport.timeout = datetime.timedelta(seconds=context.config.engine.round_timeout_s)


def engine_snapshot(context: RunContext) -> dict[str, Any]:
    """What every rank's engine must carry across a resume: its random state and traffic counters."""
    return {"torch_rng": torch.get_rng_state(), "counters": context.transport.counters.state_dict()}


def resumed_round(context: RunContext) -> int:
    """The round this rank's checkpoint was taken after (0: a fresh start)."""
    return int(context.resume["engine"]["round"]) if context.resume is not None else 0


def restore_engine_state(context: RunContext) -> dict[str, Any]:
    """After the algorithm's setup (which seeds and builds models), put back the resumed rank's
    random state and counters; return the engine's extra figures (empty when not resuming)."""
    if context.resume is None:
        return {}
    engine = context.resume["engine"]
    torch.set_rng_state(engine["torch_rng"])
    context.transport.counters.load_state_dict(engine["counters"])
    return engine


def checkpoint_state(
    context: RunContext, name: str, role: ServerRole | WorkerRole, round_number: int, engine: dict[str, Any]
) -> dict[str, Any]:
    """One rank's checkpoint of round `round_number`: its role's state and the engine's. The
    server's also holds the run's config, so a checkpoint alone can be sampled from."""
    own = {"config": context.config.model_dump(mode="json"), "server": role.state_dict()} if context.is_server else {
        "worker": role.state_dict()
    }
    return {
        "format": 2,
        "algorithm": name,
        "round": round_number,
        **own,
        "engine": {"round": round_number, **engine, **engine_snapshot(context)},
    }


def work(context: RunContext, method: type[Method]) -> None:
    """Ranks 1..K: load the local shard (data stays here), then run every round, checkpointing
    this worker's part of the run state on the same rounds as the server."""
    config = context.config
    run_dir = RunDirectory(context.run_dir)
    timeline = context.transport.timeline
    phase = phase_marker(timeline)
    phase("setup", -1)
    shard = worker_shards(config, build_tasks(config, load_source(config.data)))[context.worker_index]
    worker: WorkerRole = method.worker(context)
    # What the worker's role costs: its peak memory (the kernel's mark, checkpoint writing included)
    # over the RSS with the runtime and its shard loaded.
    baseline_memory = current_rss_bytes()
    reset_high_water_mark()
    worker.setup(shard)
    start_round_timeouts(context)
    engine_state = restore_engine_state(context)
    first_round = engine_state.get("round", 0)
    rounds = WorkerRounds(context, worker)
    if "meter" in engine_state:
        rounds.meter.load_state_dict(engine_state["meter"])
    control = RoundControl(context)
    activations = SavedActivations() if config.engine.live_tensors else None
    for round_index in range(first_round, config.rounds):
        with activations.measure() if activations is not None else nullcontext():
            rounds.run(round_index)
        # Read before the checkpoint, so that it holds every message up to it (see `RoundControl`).
        phase("control", round_index)
        stop = control.should_stop(round_index)
        if is_checkpoint_round(round_index + 1, config.checkpoint.every):
            phase(HARNESS, round_index)
            state = checkpoint_state(context, method.name, worker, round_index + 1, {"meter": rounds.meter.state_dict()})
            run_dir.save_checkpoint(state, round_index + 1, rank=context.rank, keep=config.checkpoint.keep)
            if timeline is not None:
                timeline.flush()
        if stop:
            break
    rounds.finish()
    phase(HARNESS, -1)
    digest = {
        "rank": context.rank,
        "task": config.tasks[context.task].name,
        "samples": len(shard),
        **worker.digest(),
        **context.transport.counters.as_dict(),
        **rounds.meter.setup_bytes,
        **rounds.meter.unreported(),
        **_worker_memory(baseline_memory),
        **_live_tensor_fields(worker, activations, "live_tensors"),
    }
    path = run_dir.workers / f"rank-{context.rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)  # under torchrun, a worker's machine has its own copy
    path.write_text(json.dumps(digest, indent=2, sort_keys=True))
    if timeline is not None:
        timeline.flush()


def _live_tensor_fields(role: Role, activations: SavedActivations | None, key: str) -> dict[str, dict[str, int]]:
    """The role's live-tensor table under `key`, when `engine.live_tensors` is on."""
    if activations is None:
        return {}
    return {key: {**role_tensor_bytes(role), "peak_saved_activations": activations.peak_bytes}}


def _worker_memory(baseline: int) -> dict[str, int]:
    peak = high_water_mark_bytes()
    if peak is None:
        return {}
    return {"memory_baseline_bytes": baseline, "memory_peak_bytes": peak, "memory_increase_bytes": max(0, peak - baseline)}


def _high_water_mark_fields(memory: PeakRSSMonitor, earlier: dict[str, int]) -> dict[str, int]:
    """The server's kernel high-water mark over the run so far, harness left out (none where the
    kernel cannot reset it), carried across a resume like the sampled peak."""
    marks = memory.high_water_marks()
    if marks is None:
        return {}
    peak, increase = marks
    return {
        "server/hwm_bytes": max(peak, earlier.get("hwm_bytes", 0)),
        "server/hwm_increase_bytes": max(increase, earlier.get("hwm_increase_bytes", 0)),
    }


def _eval_fields(row: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in row.items() if k.startswith(("fid/", "fidelity/")) or k == "round"}


def _progress_fields(row: dict[str, Any], latest_fid: dict[str, float]) -> dict[str, str]:
    fields = {"G": f"{row.get('g_loss', math.nan):.3f}", "D": f"{row.get('d_loss', math.nan):.3f}"}
    fields.update({key.removeprefix("fid/"): f"{value:.1f}" for key, value in latest_fid.items()})
    return fields
