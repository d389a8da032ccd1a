"""The simple Python API: describe tasks, fit one multi-task GAN across edge workers, sample a task.

    from entgan import EntGAN, Task

    gan = EntGAN(tasks=[Task(name="low", labels=[0, 1, 2, 3, 4], workers=2),
                        Task(name="high", labels=[5, 6, 7, 8, 9], workers=2)], rounds=300)
    gan.fit()                            # spawns 1 server + 4 workers on this machine
    images = gan.sample(task="high", n=16)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from entgan.config import ConfigError, RunConfig, TaskConfig, load_config, parse_config
from entgan.engine.launch import launch_local
from entgan.models import build_generator
from entgan.models.generator import Generator
from entgan.rundir import RunDirectory

Task = TaskConfig


def load_generator(run_dir: str | Path) -> tuple[RunConfig, Generator]:
    """The trained generator of a run directory (from its latest checkpoint), in eval mode."""
    run = RunDirectory(Path(run_dir))
    config = run.config()
    checkpoint_path = run.latest_checkpoint()
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which one
        raise ConfigError(f"{checkpoint_path}: not a readable EntGAN checkpoint ({error})") from None
    generator = build_generator(config.model, config.image_shape, len(config.tasks))
    generator.load_state_dict(checkpoint["server"]["generator"])
    return config, generator.eval()


def sample_run(run_dir: str | Path, task: str, n: int, seed: int | None = None) -> torch.Tensor:
    """`n` images of `task` from a finished (or checkpointed) run, in [-1, 1]."""
    config, generator = load_generator(run_dir)
    latents = torch.Generator().manual_seed(seed) if seed is not None else None
    return generator.sample(config.task_index(task), n, generator=latents)


class EntGAN:
    """A multi-task GAN trained across edge workers; each task is served by its own workers."""

    def __init__(
        self,
        tasks: list[TaskConfig | dict[str, Any]],
        run_dir: str | Path | None = None,
        **settings: Any,
    ) -> None:
        """`settings` are any top-level config fields (rounds, seed, data, model, control, ...)."""
        raw_tasks = [task.model_dump() if isinstance(task, TaskConfig) else task for task in tasks]
        self.config = parse_config({"tasks": raw_tasks, **settings}, origin="EntGAN(...)")
        self.run_dir = Path(run_dir) if run_dir is not None else Path("runs") / self.config.name
        self.summary: dict[str, Any] | None = None
        self._generator: Generator | None = None

    @classmethod
    def from_config(cls, path: str | Path, run_dir: str | Path | None = None) -> EntGAN:
        config = load_config(path)
        gan = cls.__new__(cls)
        gan.config = config
        gan.run_dir = Path(run_dir) if run_dir is not None else Path("runs") / config.name
        gan.summary, gan._generator = None, None
        return gan

    @classmethod
    def load(cls, run_dir: str | Path) -> EntGAN:
        """Reopen a run directory to sample from it."""
        config, generator = load_generator(run_dir)
        gan = cls.__new__(cls)
        gan.config, gan.run_dir, gan.summary, gan._generator = config, Path(run_dir), None, generator
        return gan

    def fit(self, overwrite: bool = False, show_progress: bool = True) -> dict[str, Any]:
        """Train: spawn the server and the workers here, wait for them, return the run summary."""
        self.summary = launch_local(self.config, self.run_dir, overwrite=overwrite, show_progress=show_progress)
        self._generator = load_generator(self.run_dir)[1]
        return self.summary

    def sample(self, task: str, n: int = 64, seed: int | None = None) -> torch.Tensor:
        """`n` images (N, C, H, W) in [-1, 1] of the task named `task`."""
        if self._generator is None:
            raise RuntimeError("nothing trained yet: call fit() first, or EntGAN.load(run_dir)")
        latents = torch.Generator().manual_seed(seed) if seed is not None else None
        return self._generator.sample(self.config.task_index(task), n, generator=latents)
