"""Overlap controller: decides when a transfer is waited for, so computation hides communication.

On: a received generator is consumed layer by layer as it arrives (the worker starts its forward
pass, or its real-data half of the D step, while later layers are in flight); sends are left in
flight until their buffers are about to change. Off: every
transfer is waited for as soon as it is posted, which is the sequential baseline.
"""

from __future__ import annotations

from torch import nn

from entgan.config import OverlapConfig
from entgan.engine.parameters import LayerStream
from entgan.engine.transport import Transfer


class OverlapController:
    def __init__(self, config: OverlapConfig) -> None:
        self.enabled = config.enabled

    def incoming_model(self, module: nn.Module, transfer: Transfer) -> LayerStream | None:
        """Let `module` be used while its tensors arrive; returns the stream to `finish()` later."""
        if not self.enabled:
            transfer.wait()
            return None
        return LayerStream(module, transfer)

    def outgoing(self, transfer: Transfer) -> Transfer | None:
        """Leave a send in flight (returned, to be waited later) or complete it now."""
        if not self.enabled:
            transfer.wait()
            return None
        return transfer

    @property
    def real_half_first(self) -> bool:
        """Run the real-data half of the first D step before the generator has arrived."""
        return self.enabled


def settle(*transfers: Transfer | LayerStream | None) -> None:
    """Wait for whatever is still in flight (None entries are already settled)."""
    for transfer in transfers:
        if isinstance(transfer, LayerStream):
            transfer.finish()
        elif transfer is not None:
            transfer.wait()
