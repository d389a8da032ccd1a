"""The run directory: resolved config, metrics stream, checkpoints, sample grids, plots.

Layout::

    RUN_DIR/
      config.yaml           the resolved configuration (every default spelled out)
      metrics.jsonl         one JSON object per round (losses, bytes, RSS; FID on eval rounds)
      summary.json          final figures, written at the end
      events.jsonl          what happened besides training: refused updates, restarts
      checkpoints/round-NNNN.pt          the server's state after round NNNN (also latest.pt)
      checkpoints/round-NNNN.rank-K.pt   worker K's state after the same round (resume needs all)
      samples/<task>/round-NNNN.png
      tb/<method>-seedN/    TensorBoard event files (`entgan.tracking`; tracking.tensorboard)
      plots/training.png
      workers/rank-K.json   each worker's end-of-run digest
      timeline/rank-K.jsonl each rank's compute and transfers, for the edge clock (`engine.timeline`;
                            a resumed process writes `rank-K.from-round-NNNN.jsonl`)
      pids/rank-K           the process id of rank K while the run is going

Every file that a reader may load while a run is going (checkpoints, summary) is written to a
temporary file, flushed to disk and renamed, so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import os
import re
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
EVENTS_FILE = "events.jsonl"
_CHECKPOINT_NAME = re.compile(r"round-(?P<round>\d+)(?:\.rank-(?P<rank>\d+))?\.pt")


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
        """The server's newest checkpoint: its newest `round-NNNN.pt`, else `latest.pt`.

        `latest.pt` is written after the round file, so a server killed between the two
        leaves it one round behind (or missing); the round files are the authority.
        A deployed model directory holds only `latest.pt`.
        """
        rounds = self.checkpoint_rounds(0)
        if rounds:
            return self.checkpoint_path(rounds[-1], 0)
        path = self.checkpoints / "latest.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{self.root}: no checkpoint yet ({path} is missing)")
        return path

    # --- writing ---
    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(row, sort_keys=True) + "\n")

    def checkpoint_path(self, round_number: int, rank: int = 0) -> Path:
        """Rank 0's (the server's) checkpoint of a round, or worker `rank`'s part of it."""
        suffix = "" if rank == 0 else f".rank-{rank}"
        return self.checkpoints / f"round-{round_number:04d}{suffix}.pt"

    def checkpoint_rounds(self, rank: int = 0) -> list[int]:
        """Rounds for which `rank` has a (complete, renamed-into-place) checkpoint file."""
        rounds = []
        for path in self.checkpoints.glob("round-*.pt"):
            match = _CHECKPOINT_NAME.fullmatch(path.name)
            if match and int(match["rank"] or 0) == rank:
                rounds.append(int(match["round"]))
        return sorted(rounds)

    def latest_complete_round(self, worker_ranks: list[int]) -> int:
        """The last round with a checkpoint from the server and every listed worker (0: none)."""
        common = set(self.checkpoint_rounds(0))
        for rank in worker_ranks:
            common &= set(self.checkpoint_rounds(rank))
        return max(common, default=0)

    def save_checkpoint(self, state: dict[str, Any], round_number: int, rank: int = 0, keep: int = 0) -> Path:
        """Write a rank's checkpoint atomically; the server's also becomes `latest.pt` (for sampling).

        With `keep` > 0, only that rank's `keep` newest round checkpoints stay on disk.
        """
        path = self.checkpoint_path(round_number, rank)
        atomic_write(path, lambda handle: torch.save(state, handle))
        if rank == 0:
            atomic_write(self.checkpoints / "latest.pt", lambda handle: torch.save(state, handle))
        if keep > 0:
            for old in self.checkpoint_rounds(rank)[:-keep]:
                self.checkpoint_path(old, rank).unlink(missing_ok=True)
        return path

    def load_checkpoint(self, round_number: int, rank: int = 0) -> dict[str, Any]:
        path = self.checkpoint_path(round_number, rank)
        if not path.is_file():
            raise ConfigError(f"{path}: missing; rank {rank} cannot resume from round {round_number}")
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # a foreign or damaged file: say which one
            raise ConfigError(f"{path}: not a readable EntGAN checkpoint ({error})") from None

    def truncate_metrics(self, last_round: int) -> None:
        """Keep the metrics of rounds up to `last_round` only (a resumed run writes the rest again)."""
        rows = [row for row in self.metrics() if row.get("round", 0) <= last_round]
        text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
        atomic_write(self.metrics_path, lambda handle: handle.write(text.encode()))

    def record_pid(self, rank: int) -> None:
        """`pids/rank-K` holds the process id of rank K (to watch or stop one rank of a run)."""
        path = self.root / "pids" / f"rank-{rank}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{os.getpid()}\n")

    def pid(self, rank: int) -> int:
        return int((self.root / "pids" / f"rank-{rank}").read_text())

    def append_event(self, event: dict[str, Any]) -> None:
        with (self.root / EVENTS_FILE).open("a") as handle:
            handle.write(json.dumps(event, sort_keys=True) + "\n")

    def events(self) -> list[dict[str, Any]]:
        path = self.root / EVENTS_FILE
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        atomic_write(self.root / name, lambda handle: handle.write(json.dumps(data, indent=2, sort_keys=True).encode()))
