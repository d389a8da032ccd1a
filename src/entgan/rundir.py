"""The run directory: resolved config, metrics stream, checkpoints, sample grids, plots.

Layout::

    RUN_DIR/
      config.yaml           the resolved configuration (every default spelled out)
      metrics.jsonl         one JSON object per round (losses, bytes, RSS; FID on eval rounds)
      summary.json          final figures, written at the end
      checkpoints/round-NNNN.pt, checkpoints/latest.pt
      samples/<task>/round-NNNN.png
      plots/training.png
      workers/rank-K.json   each worker's end-of-run digest

Every file that a reader may load while a run is going (checkpoints, summary) is written to a
temporary file, flushed to disk and renamed, so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from entgan.config import ConfigError, RunConfig, load_config

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write via a temporary file in the same directory, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class RunDirectory:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # --- creation ---
    @classmethod
    def create(cls, root: Path, config: RunConfig, overwrite: bool = False) -> RunDirectory:
        """Make a fresh run directory; refuse to touch an existing one unless `overwrite`.

        Overwrite only ever removes a directory that is itself a run directory (holds config.yaml),
        never an arbitrary folder a typo pointed at.
        """
        root = Path(root)
        if cls.check_available(root, overwrite):
            shutil.rmtree(root)
        run = cls(root)
        for folder in (root, run.checkpoints, run.samples, run.plots, run.workers):
            folder.mkdir(parents=True, exist_ok=True)
        atomic_write(root / CONFIG_FILE, lambda handle: handle.write(config.to_yaml().encode()))
        return run

    @staticmethod
    def check_available(root: Path, overwrite: bool) -> bool:
        """Raise ConfigError unless `root` may be used; return True if an old run must be removed."""
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise ConfigError(f"{root}: run directory path is a file")
        if not root.exists() or not any(root.iterdir()):
            return False
        if not overwrite:
            raise ConfigError(f"{root}: run directory already exists (pass --overwrite to replace it)")
        if not (root / CONFIG_FILE).is_file():
            raise ConfigError(f"{root}: exists and is not an EntGAN run directory; refusing to overwrite it")
        return True

    # --- paths ---
    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def workers(self) -> Path:
        return self.root / "workers"

    @property
    def metrics_path(self) -> Path:
        return self.root / METRICS_FILE

    def sample_grid_path(self, task: str, round_index: int) -> Path:
        return self.samples / task / f"round-{round_index:04d}.png"

    # --- reading ---
    def config(self) -> RunConfig:
        path = self.root / CONFIG_FILE
        if not path.is_file():
            raise ConfigError(f"{self.root}: not an EntGAN run directory (no {CONFIG_FILE})")
        return load_config(path)

    def metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        rows = []
        lines = [line for line in self.metrics_path.read_text().splitlines() if line.strip()]
        for number, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines) - 1:  # a crash mid-append leaves at most the last line torn
                    break
                raise
        return rows

    def latest_checkpoint(self) -> Path:
        path = self.checkpoints / "latest.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{self.root}: no checkpoint yet ({path} is missing)")
        return path

    # --- writing ---
    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(row, sort_keys=True) + "\n")

    def save_checkpoint(self, state: dict[str, Any], round_index: int) -> Path:
        path = self.checkpoints / f"round-{round_index:04d}.pt"
        atomic_write(path, lambda handle: torch.save(state, handle))
        atomic_write(self.checkpoints / "latest.pt", lambda handle: torch.save(state, handle))
        return path

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        atomic_write(self.root / name, lambda handle: handle.write(json.dumps(data, indent=2, sort_keys=True).encode()))
