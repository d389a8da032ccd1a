"""EntGAN: one multi-task GAN trained across edge nodes whose data stays where it is."""

from entgan.api import EntGAN, Task, load_generator, sample_run
from entgan.config import ConfigError, RunConfig, load_config

__version__ = "0.1.0"

__all__ = ["ConfigError", "EntGAN", "RunConfig", "Task", "load_config", "load_generator", "sample_run"]
