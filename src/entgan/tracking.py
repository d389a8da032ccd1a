"""TensorBoard event files of a run, written by the server next to `metrics.jsonl`.

Layout::

    RUN_DIR/tb/<method>-seed<N>/events.out.tfevents.*

One TensorBoard run per EntGAN run, named after its method and seed, so that one
`tensorboard --logdir runs/` (or `--logdir` a bench's output folder, whose runs live in
`OUT/runs/<run>/`) shows every run side by side under a name that says what it ran:

- every number of a round's `metrics.jsonl` row under the same name (`g_loss`, `server/bytes_sent`,
  `fid/<task>`, `fidelity/<task>`, ...), at step = the round;
- the sample grid of every task on evaluation rounds (`samples/<task>`);
- the resolved configuration, as text, once.

A resumed run appends to the same folder: its writer marks the first round it will write again
(`purge_step`), so TensorBoard hides the rows of the interrupted attempt after the checkpoint, as
`RunDirectory.truncate_metrics` drops them from `metrics.jsonl`.

TensorBoard's writer is slow to import (protobuf, the tensorboard package): it is imported only
by the server, and only when `tracking.tensorboard` is on.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from entgan.config import ConfigError, RunConfig, TrackingConfig
from entgan.plots import image_grid

if TYPE_CHECKING:
    import torch
    from torch.utils.tensorboard import SummaryWriter

TENSORBOARD_DIR = "tb"
"""The folder of a run directory that holds its TensorBoard run."""


def tensorboard_run_name(method: str, seed: int) -> str:
    """The TensorBoard run's folder under `RUN_DIR/tb/`: what ran, and with which seed."""
    return f"{method}-seed{seed}"


def check_tracking(tracking: TrackingConfig) -> None:
    """Refuse, before any process starts, a tracker whose package is not installed."""
    if tracking.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "tracking.tensorboard: the 'tensorboard' package is not installed "
            "(pip install 'tensorboard>=2.17.1,<3', or set tracking.tensorboard: false)"
        )


class RunTracker:
    """The server's TensorBoard writer for one run (a no-op when tracking is off).

    Call `log_round` once per round, next to `RunDirectory.append_metrics`, and `close` at the end.
    Each round is flushed to disk before `log_round` returns: TensorBoard shows it at once, and a
    crash loses nothing that `metrics.jsonl` kept.
    """

    def __init__(self, writer: SummaryWriter | None) -> None:
        self._writer = writer

    @classmethod
    def open(cls, config: RunConfig, run_root: Path, method: str, *, resume_round: int = 0) -> RunTracker:
        """The tracker of a run starting fresh (`resume_round` 0) or resuming after `resume_round`."""
        if not config.tracking.tensorboard:
            return cls(None)
        from torch.utils.tensorboard import SummaryWriter  # slow: only here, on the server

        log_dir = Path(run_root) / TENSORBOARD_DIR / tensorboard_run_name(method, config.seed)
        # Every round after `resume_round` is written again: hide what an earlier attempt wrote for
        # them. (On a fresh start this marks round 1, before which there is nothing to hide.)
        writer = SummaryWriter(log_dir=str(log_dir), purge_step=resume_round + 1)
        if resume_round == 0:
            writer.add_text("config", _as_code_block(config.to_yaml()), global_step=0)
        writer.flush()
        return cls(writer)

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    @property
    def log_dir(self) -> Path | None:
        return None if self._writer is None else Path(self._writer.get_logdir())

    def log_round(self, row: dict[str, Any], grids: dict[str, torch.Tensor] | None = None) -> None:
        """One round: every number of its metrics row at step `row["round"]`, and the
        sample grids (task name -> (N, C, H, W) images in [-1, 1]) of an evaluation round."""
        if self._writer is None:
            return
        step = int(row["round"])
        for key, value in row.items():
            if key != "round" and _is_number(value):
                self._writer.add_scalar(key, float(value), global_step=step)
        for task, images in (grids or {}).items():
            grid = image_grid(images)
            self._writer.add_image(
                f"samples/{task}", grid, global_step=step, dataformats="HW" if grid.ndim == 2 else "HWC"
            )
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_code_block(text: str) -> str:
    """TensorBoard renders text as Markdown: indent it so it shows as written."""
    return "\n".join("    " + line for line in text.splitlines())
