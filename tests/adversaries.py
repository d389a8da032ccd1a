"""Misbehaving workers for the reliability tests: real EntGAN processes whose uploads are broken.

Loaded by the engine through `launch_local(..., algorithm_path="adversaries:...")`; the spawned
processes import this module from the tests folder (it is on their `sys.path`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from entgan.algorithms.entgan import EntGAN, EntGANWorker
from entgan.engine.method import Upload
from entgan.engine.parameters import flatten
from entgan.engine.updates import UpdateLayout

NAN_RANK = 1
WRONG_SHAPE_RANK = 4


class BrokenUploadsWorker(EntGANWorker):
    """Rank 1 uploads NaNs; rank 4 uploads its update with one trunk tensor's last row cut off."""

    def uploads(self, round_index: int) -> Sequence[Upload]:
        (upload,) = super().uploads(round_index)
        if self.context.rank not in (NAN_RANK, WRONG_SHAPE_RANK):
            return [upload]
        named = self.layout.named_update_tensors(self.D, self.context.task)
        if self.context.rank == NAN_RANK:
            return [replace(upload, values=torch.full((sum(t.numel() for _, t in named),), float("nan")))]
        name, first = named[0]
        named = [(name, first[:-1]), *named[1:]]
        return [replace(upload, values=flatten([tensor for _, tensor in named]), layout=UpdateLayout.of(named))]


class BrokenUploadsEntGAN(EntGAN):
    worker = BrokenUploadsWorker
