"""EntGAN: one multi-task GAN trained across edge nodes whose data stays where it is.

The public names below are imported on first use (`from entgan import EntGAN` works as usual):
importing the package, or running `entgan --help`, does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from entgan.api import EntGAN, Task, load_generator, sample_run
    from entgan.config import ConfigError, RunConfig, load_config

__version__ = "0.1.0"

_EXPORTS = {
    "ConfigError": "entgan.config",
    "EntGAN": "entgan.api",
    "RunConfig": "entgan.config",
    "Task": "entgan.api",
    "load_config": "entgan.config",
    "load_generator": "entgan.api",
    "sample_run": "entgan.api",
}
"""Public name -> the module that defines it."""

__all__ = ["ConfigError", "EntGAN", "RunConfig", "Task", "load_config", "load_generator", "sample_run"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'entgan' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
