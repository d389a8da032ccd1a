"""Misbehaving workers for the reliability tests: real EntGAN processes whose uploads are broken.

Loaded by the engine through `launch_local(..., algorithm_path="adversaries:...")`; the spawned
processes import this module from the tests folder (it is on their `sys.path`).
"""

from __future__ import annotations

import torch

from entgan.algorithms.base import WorkerReport
from entgan.algorithms.entgan import EntGAN
from entgan.engine.context import SERVER_RANK
from entgan.engine.parameters import flatten
from entgan.engine.transport import Transfer
from entgan.engine.updates import UpdateLayout, send_update

NAN_RANK = 1
WRONG_SHAPE_RANK = 4


class BrokenUploadsEntGAN(EntGAN):
    """Rank 1 uploads NaNs; rank 4 uploads its update with one trunk tensor's last row cut off."""

    def upload_discriminator(self, report: WorkerReport, round_index: int) -> Transfer | None:
        if self.context.rank not in (NAN_RANK, WRONG_SHAPE_RANK):
            return super().upload_discriminator(report, round_index)
        named = self.layout.named_update_tensors(self.D, self.context.task)
        if self.context.rank == NAN_RANK:
            values = torch.full((sum(t.numel() for _, t in named),), float("nan"))
        else:
            name, first = named[0]
            named = [(name, first[:-1]), *named[1:]]
            values = flatten([tensor for _, tensor in named])
        return send_update(
            self.transport, self.context.session_keys[SERVER_RANK], values, report.to_tensor(),
            UpdateLayout.of(named), round_index, SERVER_RANK, "discriminator-update",
        )
