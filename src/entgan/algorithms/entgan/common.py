"""What EntGAN's server and workers build alike: the models, the upload layouts, the schedule."""

from __future__ import annotations

from entgan.algorithms.aggregation import DiscriminatorLayout, discriminator_update_layouts
from entgan.control.overlap import OverlapController
from entgan.engine.compression import Codec, build_codec
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
        # With compression on, per-round traffic travels encoded (the start is exact).
        self.model_codec: Codec | None = None
        """How G, the synced D and gossip travel (None: float32)."""
        self.upload_codec: Codec | None = None
        """How D_k (or its change) travels up (None: float32)."""
        self.gossip_codec: Codec | None = None
        """How D_k (or its change) travels to its gossip peer (None: float32)."""
        self.uploads_changes = compression.enabled and compression.uploads == "changes"
        if compression.enabled:
            self.model_codec = build_codec(compression.codec, int8_chunk_size=compression.int8_chunk_size)
            self.upload_codec = self.gossip_codec = self.model_codec
            if self.uploads_changes:
                self.upload_codec = self.gossip_codec = build_codec(
                    compression.change_codec, compression.topk_ratio, compression.int8_chunk_size
                )

    def is_sync_round(self, round_index: int) -> bool:
        """Whether the averaged D goes down after round `round_index` (`aggregation.sync_every`)."""
        every = self.config.aggregation.sync_every
        return every > 0 and (round_index + 1) % every == 0
