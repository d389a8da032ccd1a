"""What EntGAN's server and workers build alike: the models, the upload layouts, the schedule."""

from __future__ import annotations

import torch

from entgan.algorithms.aggregation import DiscriminatorLayout, discriminator_update_layouts
from entgan.control.overlap import OverlapController
from entgan.engine.method import Role
from entgan.gan import build_models


class EntGANRole(Role):
    """Builds G, D and the plumbing both roles share; says which rounds sync D."""

    def build_models(self) -> None:
        self.G, self.D = build_models(self.config, self.context.device)
        self.layout = DiscriminatorLayout(self.D)
        self.update_layouts = discriminator_update_layouts(self.layout, self.D)
        self.overlap = OverlapController(self.config.control.overlap)
        compression = self.config.control.compression
        # Per-round traffic travels in half precision when compression is on (the start is exact).
        self.wire_dtype: torch.dtype | None = getattr(torch, compression.wire_dtype) if compression.enabled else None

    def is_sync_round(self, round_index: int) -> bool:
        """Whether the averaged D goes down after round `round_index` (`aggregation.sync_every`)."""
        every = self.config.aggregation.sync_every
        return every > 0 and (round_index + 1) % every == 0
