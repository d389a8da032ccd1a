"""Typed, validated benchmark configuration: which methods, on which workload, against which yardsticks.

A bench config names one base run configuration (inline, or a path to a run YAML) that every run
shares: tasks, data split, models, optimizer, seed. On top of it the bench lists the methods to
compare, EntGAN variants for ablations (a name and dotted-path overrides of the base), the target
FID and time budget that every run is measured against, an optional memory sweep over worker
counts, an optional rate-limited network and optional device profiles for the edge clock.

Everything is checked when the file is read, including every run configuration the bench will
launch (each override applied and validated), so a typo fails in a second, not an hour into a run.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from entgan.bench.links import PerNodeNetworkConfig
from entgan.bench.profiles import EdgeProfile
from entgan.config import AlgorithmName, ConfigError, RunConfig, format_validation_error, load_config, read_yaml_file

Label = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]

OVERALL_FID = "fid/overall"
QUICK_TIME_BUDGET_S = 15.0
"""`--quick`: training clock per timed run (a smoke run checks the bench, it measures nothing)."""
QUICK_SWEEP_ROUNDS = 3


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VariantConfig(_Strict):
    """One ablation: a method (EntGAN by default) with some of the base configuration changed."""

    name: Label
    """Row label and run-directory name; unique among the bench's methods and variants."""
    algorithm: AlgorithmName = "entgan"
    overrides: dict[str, Any] = {}
    """Dotted paths into the run configuration and their values, e.g.
    `control.overlap.enabled: false` or `tasks.0.partition: dirichlet`."""


class MemorySweepConfig(_Strict):
    """Server memory against the number of workers: short runs of fixed length at each count."""

    workers: Annotated[list[PositiveInt], Field(min_length=1)]
    """Total worker counts, spread over the base's tasks as evenly as possible (first tasks get the
    remainder); each count needs at least one worker per task."""
    rounds: PositiveInt = 20
    """Rounds per sweep run (no time budget: the same work at every count)."""
    methods: list[AlgorithmName] | None = None
    """Methods swept; default: every method of the bench."""
    variants: list[VariantConfig] = []
    """Swept too: a method with some of the base configuration changed (e.g. MD-GAN with its
    feedback graphs recomputed), a row of its own named by the variant."""
    repeats: PositiveInt = 1
    """Runs per method and worker count, each in a fresh process; the report gives the median. An
    identical run's server RSS varies by an MiB or two (where the C allocator and the math libraries
    happen to place their buffers), as much as the gap between two methods at small K."""

    @field_validator("workers")
    @classmethod
    def _distinct_counts(cls, workers: list[int]) -> list[int]:
        if len(set(workers)) != len(workers):
            raise ValueError(f"worker counts must be distinct, found {workers}")
        return sorted(workers)


class NetworkConfig(_Strict):
    """A rate-limited link: every rank of a run talks over the loopback of a private network
    namespace, shaped with a token-bucket filter (`tc ... tbf`), so the rate is one shared link.
    (`mode: per-node`, `PerNodeNetworkConfig`: one namespace and one link per node instead.)"""

    mode: Literal["shared"] = "shared"
    rate_mbit: PositiveFloat
    burst_kbit: PositiveFloat = 32.0
    """Token-bucket size; must hold at least one packet of `mtu` bytes."""
    latency_ms: PositiveFloat = 50.0
    """Longest a packet may wait in the bucket's queue before it is dropped."""
    mtu: Annotated[int, Field(ge=576, le=65536)] = 1500
    """MTU given to the namespace's loopback (its default, 64 KiB, exceeds any sensible burst,
    and a token bucket drops every packet larger than its burst)."""
    required: bool = True
    """If the namespace cannot be made (no rights, no `unshare` or `tc`): stop with an error
    (true) or run unconstrained and say so in the report (false)."""

    @model_validator(mode="after")
    def _burst_holds_a_packet(self) -> NetworkConfig:
        burst_bytes = self.burst_kbit * 1000 / 8
        if burst_bytes < self.mtu:
            raise ValueError(
                f"burst_kbit {self.burst_kbit:g} ({burst_bytes:.0f} bytes) is smaller than one packet "
                f"of mtu {self.mtu} bytes; the link would drop every full-size packet"
            )
        return self


def _network_mode(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("mode", "shared"))
    return str(getattr(value, "mode", "shared"))


BenchNetwork = Annotated[
    Annotated[NetworkConfig, Tag("shared")] | Annotated[PerNodeNetworkConfig, Tag("per-node")],
    Discriminator(_network_mode),
]
"""`network:` a link shared by all ranks (`mode: shared`, the default) or one link per worker
(`mode: per-node`)."""


class TuningConfig(_Strict):
    """Equal tuning (`entgan tune`): every method gets the same number of candidate settings, each
    run on the same tuning seeds (disjoint from the reporting seeds) under the bench's budget; the
    candidate with the lowest median FID-over-time area wins and is written to the tuned file."""

    seeds: Annotated[list[Annotated[int, Field(ge=0, lt=2**31)]], Field(min_length=1)]
    grid: dict[AlgorithmName, Annotated[list[dict[str, Any]], Field(min_length=1)]]
    """Per method, its candidate settings: dotted-path overrides of the base (`{}`: the base as it
    is). Every method listed in `methods` needs an entry, and every entry the same number of
    candidates (the same tuning budget)."""
    time_budget_s: PositiveFloat | None = None
    """Training clock per tuning run (default: the bench's `time_budget_s`)."""
    clock: Label | None = None
    """Where the candidates are compared. None: on the training clock, by mean FID over the budget.
    A profile of the bench's `profiles`: by median time to the target on that profile's edge clock
    (a run that misses the target counts as never reaching it; ties, such as every run missing, go
    to the lower mean FID over the budget), for benches whose claim is edge time."""


class TunedSettings(_Strict):
    """What `entgan tune` chose (a tuned file, read by the bench's `tuned:`)."""

    source: str = ""
    """The tuned file the settings were read from."""
    methods: dict[AlgorithmName, dict[str, Any]] = {}
    """Per method, the chosen overrides of the base."""
    tuning: dict[str, Any] = {}
    """The tuning runs the choices came from, as `entgan tune` wrote them (copied into bench.json)."""


class BenchConfig(_Strict):
    """A whole benchmark: the shared workload, the contenders and the yardsticks."""

    name: Label = "bench"
    base: RunConfig
    """The run configuration every run starts from: a mapping, or a path to a run YAML (relative
    to the bench file), with `base_overrides` applied."""
    base_overrides: dict[str, Any] = {}
    """Dotted paths changed in the base for every run, e.g. `tasks.0.partition: dirichlet` (lets
    several benches share one workload file)."""
    methods: list[AlgorithmName] = []
    """Methods compared on the base configuration, each run as it is (its `algorithm` swapped, and
    its `tuned` settings applied)."""
    seeds: list[Annotated[int, Field(ge=0, lt=2**31)]] = []
    """Reporting seeds: every method and ablation runs once per seed, and the report gives each
    row's median, interquartile range and paired ratio to the reference with a bootstrap
    confidence interval. Empty: one run each, on the base's seed."""
    tuned: TunedSettings | None = None
    """Per-method settings chosen by `entgan tune` (a path to its tuned file, relative to the bench
    file); applied to the methods' runs, not to the ablations, whose overrides say what they are."""
    tuning: TuningConfig | None = None
    ablations: list[VariantConfig] = []
    target_fid: PositiveFloat
    """The quality bar on `fid/overall`: wall-clock to reach it is the speed figure."""
    time_budget_s: PositiveFloat
    """Training wall-clock each run gets; a run ends after the round that passes it."""
    eval_every_s: PositiveFloat | None = None
    """Evaluate whenever the training clock advanced this much (default: every 5% of the budget),
    in addition to the base's `eval.every` rounds. Sets the time resolution of time-to-target."""
    target_confirmations: PositiveInt = 1
    """Evaluations in a row that must be at or below the target for it to count as reached (the
    time is that of the first of them). Above 1, a lucky dip of a noisy FID curve does not count."""
    stop_at_target: bool = False
    """End a run as soon as it reaches the target FID (quicker; the FID within the budget is then
    unknown, and the report says so). Needs `target_confirmations: 1`: the engine stops at the
    first evaluation at or below the target."""
    max_rounds: PositiveInt = 100_000
    """Round cap of the timed runs: a safety net, the time budget is what ends them."""
    reference: Label | None = "entgan"
    """Row the others are compared with (ratios of time to target and of server memory);
    ignored when the bench does not run it."""
    memory_sweep: MemorySweepConfig | None = None
    network: BenchNetwork | None = None
    run_timeout_s: PositiveFloat | None = None
    """Kill a run (and record it as failed) after this much wall-clock; default: 3x the budget
    plus 10 minutes for start-up and evaluations."""
    profiles: dict[Label, EdgeProfile] = {}
    """Edge-clock device profiles by name (`entgan.bench.profiles`): with any, the timed runs record
    their timelines (`engine.timeline`) and the report gives time to target and the FID curve on
    each profile's edge clock too (`entgan.bench.edge_clock`), beside the training clock."""

    @model_validator(mode="after")
    def _runs_and_stop_consistent(self) -> BenchConfig:
        if not self.methods and not self.ablations and self.memory_sweep is None:
            raise ValueError("a bench needs at least one entry in methods or ablations, or a memory_sweep")
        if self.tuning is not None:
            overlap = sorted(set(self.tuning.seeds) & set(self.seeds))
            if overlap:
                raise ValueError(f"tuning.seeds must be disjoint from seeds (reporting), both have {overlap}")
            missing = sorted(set(self.methods) - set(self.tuning.grid))
            if missing:
                raise ValueError(f"tuning.grid: every method needs candidates, missing {missing}")
            if self.tuning.clock is not None and self.tuning.clock not in self.profiles:
                raise ValueError(
                    f"tuning.clock: '{self.tuning.clock}' is not one of the bench's profiles {sorted(self.profiles)}"
                )
            sizes = {method: len(candidates) for method, candidates in self.tuning.grid.items()}
            if len(set(sizes.values())) > 1:
                raise ValueError(f"tuning.grid: every method gets the same number of candidates, found {sizes}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, found {self.seeds}")
        if self.stop_at_target and self.target_confirmations != 1:
            raise ValueError("stop_at_target needs target_confirmations: 1 (runs end at the first evaluation "
                             f"at or below the target), found target_confirmations: {self.target_confirmations}")
        return self

    @property
    def labels(self) -> list[str]:
        """Row labels of the timed runs, methods first, in the order they run."""
        return [*self.methods, *(variant.name for variant in self.ablations)]

    @property
    def evaluation_interval_s(self) -> float:
        return self.eval_every_s if self.eval_every_s is not None else self.time_budget_s / 20

    @property
    def timeout_s(self) -> float:
        return self.run_timeout_s if self.run_timeout_s is not None else 3 * self.time_budget_s + 600

    def swept_methods(self) -> list[str]:
        """Row labels of the memory sweep: its methods, then its variants."""
        if self.memory_sweep is None:
            return []
        methods = list(self.memory_sweep.methods) if self.memory_sweep.methods is not None else list(self.methods)
        return [*methods, *(variant.name for variant in self.memory_sweep.variants)]

    def quick(self) -> BenchConfig:
        """A smoke run of the same bench: every step exercised, no figure meaningful."""
        budget = min(self.time_budget_s, QUICK_TIME_BUDGET_S)
        sweep = self.memory_sweep
        if sweep is not None:
            sweep = sweep.model_copy(update={"rounds": min(sweep.rounds, QUICK_SWEEP_ROUNDS)})
        tuning = self.tuning
        if tuning is not None:
            tuning = tuning.model_copy(update={"time_budget_s": budget})
        return self.model_copy(
            update={"time_budget_s": budget, "eval_every_s": budget / 3, "memory_sweep": sweep, "run_timeout_s": None,
                    "tuning": tuning}
        )


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of `data` with each dotted path set to its value (list items by index).

    Missing mapping keys are created, so a misspelt field reaches the run configuration's own
    validation and comes back as an 'unknown field' error naming it.
    """
    result = copy.deepcopy(data)
    for path, value in overrides.items():
        parts = path.split(".")
        if not all(parts):
            raise ValueError(f"'{path}' is not a dotted path")
        node: Any = result
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ValueError(f"'{path}': {where} needs a list index below {len(node)}")
                key: int | str = int(part)
            elif isinstance(node, dict):
                key = part
                if not last and node.get(key) is None:
                    node[key] = {}
            else:
                raise ValueError(f"'{path}': {'.'.join(parts[:depth])} is a value, not a section")
            if last:
                node[key] = copy.deepcopy(value)
            else:
                node = node[key]
    return result


def method_config_data(bench: BenchConfig, method: str) -> dict[str, Any]:
    """The run configuration mapping of one of the bench's methods: the base with the method's
    tuned settings (before the bench's seed and timing settings)."""
    overrides = bench.tuned.methods.get(method, {}) if bench.tuned is not None else {}
    return variant_config_data(bench.base, VariantConfig(name=method, algorithm=method, overrides=overrides))


def variant_config_data(base: RunConfig, variant: VariantConfig) -> dict[str, Any]:
    """The run configuration mapping of an ablation variant (before the bench's timing settings)."""
    data = apply_overrides(base.model_dump(mode="json"), variant.overrides)
    data["algorithm"] = variant.algorithm
    return data


def split_workers(total: int, task_count: int) -> list[int]:
    """`total` workers over `task_count` tasks, as evenly as possible, the first tasks taking the rest."""
    if total < task_count:
        raise ValueError(f"{total} workers cannot serve {task_count} tasks (each task needs one)")
    share, rest = divmod(total, task_count)
    return [share + (1 if index < rest else 0) for index in range(task_count)]


def _cross_check(bench: BenchConfig) -> list[str]:
    """Problems pydantic cannot see field by field, as '  - location: message' lines."""
    problems: list[str] = []
    labels = bench.labels
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        problems.append(
            f"  - ablations: names must differ from each other and from the methods, duplicated: {duplicates}"
        )
    for index, variant in enumerate(bench.ablations):
        problems += _override_problems(bench.base, variant, f"ablations.{index}.overrides")
    checked = []
    if bench.tuned is not None:
        checked += [(f"tuned.methods.{method}", method, overrides) for method, overrides in bench.tuned.methods.items()]
    if bench.tuning is not None:
        checked += [
            (f"tuning.grid.{method}.{index}", method, overrides)
            for method, candidates in bench.tuning.grid.items()
            for index, overrides in enumerate(candidates)
        ]
    for location, method, overrides in checked:
        problems += _override_problems(bench.base, VariantConfig(name="checked", algorithm=method, overrides=overrides), location)
    if isinstance(bench.network, PerNodeNetworkConfig):
        links = len(bench.network.links)
        counts = [bench.base.num_workers] + (list(bench.memory_sweep.workers) if bench.memory_sweep else [])
        if any(count != links for count in counts):
            problems.append(f"  - network.links: one link profile per worker: {links} profiles for runs with "
                            f"{sorted(set(counts))} workers")
    if bench.memory_sweep is not None:
        for index, count in enumerate(bench.memory_sweep.workers):
            try:
                split_workers(count, len(bench.base.tasks))
            except ValueError as error:
                problems.append(f"  - memory_sweep.workers.{index}: {error}")
    return problems


def _override_problems(base: RunConfig, variant: VariantConfig, location: str) -> list[str]:
    """Why the base with `variant`'s overrides is not a valid run configuration (nothing if it is)."""
    try:
        data = variant_config_data(base, variant)
    except ValueError as error:
        return [f"  - {location}: {error}"]
    try:
        RunConfig.model_validate(data)
    except ValidationError as error:
        return [line.replace("  - ", f"  - {location}: ", 1) for line in format_validation_error(error, location).splitlines()[1:]]
    return []


def load_tuned(path: Path) -> dict[str, Any]:
    """A tuned file written by `entgan tune`, as `TunedSettings` data, or ConfigError."""
    data = read_yaml_file(path, "tuned file", " (write it with `entgan tune`)")
    if not isinstance(data, dict) or not isinstance(data.get("methods"), dict):
        raise ConfigError(f"{path}: expected a mapping with `methods:` (method -> overrides), as `entgan tune` writes")
    return {"source": str(path), "methods": data["methods"], "tuning": data.get("tuning", {})}


def _relative(path: str, relative_to: Path | None) -> Path:
    """A path named in a bench file, read relative to the file's folder unless absolute."""
    resolved = Path(path)
    return relative_to / resolved if relative_to is not None and not resolved.is_absolute() else resolved


def parse_bench_config(
    data: object, origin: str = "<bench config>", relative_to: Path | None = None, *, read_tuned: bool = True
) -> BenchConfig:
    """Validate a mapping (e.g. parsed YAML) into a `BenchConfig`, or raise `ConfigError`.

    A string `base` is a path to a run YAML, a string `tuned` one to a tuned file, both read
    relative to `relative_to` (the bench file's folder). `read_tuned=False` leaves the tuned
    settings out (`entgan tune`, which writes them).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping at the top level, found {type(data).__name__}")
    data = dict(data)
    if not read_tuned:
        data.pop("tuned", None)
    if isinstance(data.get("base"), str):
        try:
            data["base"] = load_config(_relative(data["base"], relative_to)).model_dump(mode="json")
        except ConfigError as error:
            raise ConfigError(f"{origin}: base: {error}") from None
    if isinstance(data.get("tuned"), str):
        try:
            data["tuned"] = load_tuned(_relative(data["tuned"], relative_to))
        except ConfigError as error:
            raise ConfigError(f"{origin}: tuned: {error}") from None
    base_overrides = data.get("base_overrides")
    if isinstance(data.get("base"), dict) and isinstance(base_overrides, dict) and base_overrides:
        try:
            data["base"] = apply_overrides(data["base"], base_overrides)
        except ValueError as error:
            raise ConfigError(f"{origin}: invalid configuration\n  - base_overrides: {error}") from None
    try:
        bench = BenchConfig.model_validate(data)
    except ValidationError as error:
        message = format_validation_error(error, origin)
        for tag in ("shared", "per-node"):  # the network union's tag is no part of the field's path
            message = message.replace(f"network.{tag}.", "network.")
        raise ConfigError(message) from None
    problems = _cross_check(bench)
    if problems:
        raise ConfigError("\n".join([f"{origin}: invalid configuration", *problems]))
    return bench


def load_bench_config(path: str | Path, *, read_tuned: bool = True) -> BenchConfig:
    """Read and validate a bench YAML file, or raise `ConfigError` naming the file and field."""
    path = Path(path)
    data = read_yaml_file(path, "bench config file")
    return parse_bench_config(data, origin=str(path), relative_to=path.parent, read_tuned=read_tuned)
