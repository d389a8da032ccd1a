"""What EntGAN's server and workers build alike: the models, the upload layouts, the schedule."""

from __future__ import annotations

from entgan.algorithms.aggregation import DiscriminatorLayout, discriminator_update_layouts
from entgan.algorithms.local_training import named_state
from entgan.control.overlap import OverlapController
from entgan.engine.compression import Codec, LinkCodecs
from entgan.engine.method import Role
from entgan.engine.updates import UpdateLayout
from entgan.gan import build_models


class EntGANRole(Role):
    """Builds G, D and the plumbing both roles share; says which rounds sync D."""

    def build_models(self) -> None:
        self.G, self.D = build_models(self.config, self.context.device)
        self.layout = DiscriminatorLayout(self.D)
        self.update_layouts = discriminator_update_layouts(self.layout, self.D)
        self.overlap = OverlapController(self.config.control.overlap)
        # With compression on, per-round traffic travels coded (the start is exact).
        self.codecs = codecs = LinkCodecs.from_config(self.config.control.compression)
        self.model_codec: Codec | None = codecs.model
        """How G and the synced D travel (None: float32)."""
        self.upload_codec: Codec | None = codecs.upload
        """How D_k, or its change since the sync, travels up and to its gossip peer (None: float32)."""
        self.uploads_changes = codecs.changes
        self.edge_generator = self.config.control.edge_generator.enabled
        self.generator_layout = UpdateLayout.of(named_state(self.G))
        """What G_k's change looks like on the wire (`control.edge_generator`)."""

    def is_sync_round(self, round_index: int) -> bool:
        """Whether the averaged D goes down after round `round_index` (`aggregation.sync_every`)."""
        every = self.config.aggregation.sync_every
        return every > 0 and (round_index + 1) % every == 0
