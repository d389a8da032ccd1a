"""Warm start: a run that begins from an earlier run's checkpoint (a lifelong job's next version).

Tasks are matched by name, never by position: the new run may list the parent's tasks in another
order and add tasks the parent never saw. What each part of the models starts from:

- shared weights (G's decoder, D's trunk): the parent's, unchanged;
- a task the parent knew: its G task-embedding row and its D head, copied;
- a new task: a fresh embedding row and a fresh D head, made by the models' own `add_task`
  (the mean of the known tasks: an "average task" to fine-tune from);
- a parent task absent from the new run: dropped.

Forgetting is held off by generative replay: a frozen copy of the parent G stays on the server,
and every G step adds `replay_weight * MSE(G(z, t), G_parent(z, t))` over the parent's tasks, with
fresh latents z each step. The old tasks' samples are thereby anchored to what the parent produced,
while the adversarial loss keeps improving every task (including the new ones).

Only the server uses this module: workers receive G and D in the initial synchronisation.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ValidationError

from entgan.config import ConfigError, RunConfig
from entgan.models import build_discriminator, build_generator
from entgan.models.discriminator import HEADS_PREFIX, Discriminator, head_task
from entgan.models.generator import Generator

#: Fields that must agree between the parent and the new run for weights to be reusable.
_COMPATIBLE_FIELDS: tuple[tuple[str, str], ...] = (
    ("model", "family"),
    ("model", "latent_dim"),
    ("model", "hidden_dim"),
    ("model", "task_embedding_dim"),
    ("data", "image_size"),
    ("data", "channels"),
)

_REPLAY_SEED_OFFSET = 104_729
_EMBEDDING = "task_embedding.weight"


@dataclass
class Checkpoint:
    """An EntGAN checkpoint file, read back: the run's config and its server-side models."""

    path: Path
    config: RunConfig
    generator: Generator
    discriminator: Discriminator | None
    """None when the checkpoint holds no discriminator (methods that only checkpoint G)."""

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.config.tasks]


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> Checkpoint:
    """Read a checkpoint written by the engine (`checkpoints/latest.pt` of a run).

    Raises ConfigError naming the file when it is missing, unreadable, or not an EntGAN checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: checkpoint file not found")
    try:
        state: Any = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # truncated, foreign or pickled-code files all land here
        raise ConfigError(f"{path}: not a readable EntGAN checkpoint ({error})") from None
    if not isinstance(state, dict) or "config" not in state or "generator" not in state.get("server", {}):
        raise ConfigError(f"{path}: not an EntGAN checkpoint (expected 'config' and 'server.generator')")
    try:
        config = RunConfig.model_validate(state["config"])
    except ValidationError as error:
        raise ConfigError(f"{path}: the checkpoint's stored config is invalid: {error}") from None
    server = state["server"]
    generator = build_generator(config.model, config.image_shape, len(config.tasks)).to(device)
    discriminator = None
    try:
        generator.load_state_dict(server["generator"])
        if "discriminator" in server:
            discriminator = build_discriminator(config.model, config.image_shape, len(config.tasks)).to(device)
            discriminator.load_state_dict(server["discriminator"])
    except RuntimeError as error:
        raise ConfigError(f"{path}: the stored weights do not match the stored config ({error})") from None
    return Checkpoint(path=path, config=config, generator=generator, discriminator=discriminator)


def check_compatible(parent: RunConfig, child: RunConfig, origin: Path) -> None:
    """Raise ConfigError naming the field if weights of `parent` cannot seed a run of `child`."""
    problems = []
    for section, field in _COMPATIBLE_FIELDS:
        before = getattr(getattr(parent, section), field)
        after = getattr(getattr(child, section), field)
        if before != after:
            problems.append(f"{section}.{field} is {before!r} in the checkpoint, {after!r} in this run")
    if problems:
        raise ConfigError(
            f"{origin}: warm_start.checkpoint has incompatible model sizes: " + "; ".join(problems)
        )


class WarmStart:
    """Seeds a new run's G and D from a parent checkpoint and supplies the replay term."""

    def __init__(self, parent: Checkpoint, config: RunConfig, device: torch.device | str = "cpu") -> None:
        check_compatible(parent.config, config, parent.path)
        if config.warm_start is None:
            raise ValueError("WarmStart needs a config with a warm_start section")
        self.parent = parent
        self.task_names = [task.name for task in config.tasks]
        self.replay_weight = config.warm_start.replay_weight
        self.batch_size = config.optimizer.batch_size
        self.device = torch.device(device)
        self.parent_generator = parent.generator.to(self.device).eval().requires_grad_(False)
        parent_index = {name: index for index, name in enumerate(parent.task_names)}
        # (index in the new run, index in the parent) of every task both know, in the new run's order.
        self.shared_tasks: list[tuple[int, int]] = [
            (index, parent_index[name]) for index, name in enumerate(self.task_names) if name in parent_index
        ]
        self._latents = torch.Generator().manual_seed(config.seed + _REPLAY_SEED_OFFSET)

    @classmethod
    def from_config(cls, config: RunConfig, device: torch.device | str = "cpu") -> WarmStart:
        if config.warm_start is None:
            raise ConfigError("warm_start is not set in this config")
        return cls(load_checkpoint(config.warm_start.checkpoint, device), config, device)

    @property
    def known_tasks(self) -> list[str]:
        """Tasks of the new run that the parent was trained on (their weights are copied)."""
        return [self.task_names[index] for index, _ in self.shared_tasks]

    @property
    def new_tasks(self) -> list[str]:
        """Tasks of the new run the parent never saw (fresh embedding row and D head)."""
        known = set(self.known_tasks)
        return [name for name in self.task_names if name not in known]

    def _row_order(self, grown_index: dict[str, int]) -> list[int]:
        return [grown_index[name] for name in self.task_names]

    def _grown_index(self, add_task: Any) -> dict[str, int]:
        """Index of every new-run task in a parent model grown by `add_task` for each new task."""
        index = {name: position for position, name in enumerate(self.parent.task_names)}
        for name in self.new_tasks:
            index[name] = add_task()
        return index

    @torch.no_grad()
    def initialise(self, generator: Generator, discriminator: Discriminator) -> None:
        """Overwrite freshly built G and D (sized for the new run's tasks) with the parent's weights."""
        grown_g = copy.deepcopy(self.parent.generator)
        order = self._row_order(self._grown_index(grown_g.add_task))
        state = grown_g.state_dict()
        state[_EMBEDDING] = state[_EMBEDDING][order]
        generator.load_state_dict(state)

        if self.parent.discriminator is None:
            return  # D keeps its fresh initialisation; G carries what the parent learned
        grown_d = copy.deepcopy(self.parent.discriminator)
        order = self._row_order(self._grown_index(grown_d.add_task))
        grown_state = grown_d.state_dict()
        state = {name: tensor for name, tensor in grown_state.items() if head_task(name) is None}
        for new_index, grown_position in enumerate(order):
            source = f"{HEADS_PREFIX}{grown_position}."
            for name, tensor in grown_state.items():
                if name.startswith(source):
                    state[f"{HEADS_PREFIX}{new_index}.{name[len(source):]}"] = tensor
        discriminator.load_state_dict(state)

    def replay_loss(self, generator: Generator) -> torch.Tensor:
        """`replay_weight` x mean squared distance between G's and the frozen parent G's samples of
        the parent's tasks, for one batch of fresh latents (0 when there is nothing to replay)."""
        if self.replay_weight == 0 or not self.shared_tasks:
            return torch.zeros((), device=self.device)
        z = generator.sample_latent(self.batch_size, generator=self._latents, device=self.device)
        pick = torch.arange(self.batch_size) % len(self.shared_tasks)
        new_ids = torch.tensor([new for new, _ in self.shared_tasks])[pick].to(self.device)
        old_ids = torch.tensor([old for _, old in self.shared_tasks])[pick].to(self.device)
        with torch.no_grad():
            target = self.parent_generator(z, old_ids)
        return self.replay_weight * F.mse_loss(generator(z, new_ids), target)
