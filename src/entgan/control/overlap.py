"""Overlap controller: decides when a transfer is waited for, so computation hides communication.

On: a received generator is consumed layer by layer as it arrives (the worker starts its forward
pass, or its real-data half of the D step, while later layers are in flight); sends are left in
flight until their buffers are about to change. Off: every
transfer is waited for as soon as it is posted, which is the sequential baseline.

Working ahead (`OverlapConfig.work_ahead`), a worker's local round runs while the next models are
on their way, so they land beside the models in use (`ArrivingModels`) and are adopted later.
"""

from __future__ import annotations

import torch
from torch import nn

from entgan.config import OverlapConfig
from entgan.engine.compression import Codec
from entgan.engine.context import SERVER_RANK
from entgan.engine.parameters import LayerStream, model_tensors
from entgan.engine.transport import Transfer, Transport


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


class ArrivingModels:
    """Models the server sends, received beside the worker's own copies while those are still
    being trained, and copied into them when the worker is ready (`adopt`)."""

    def __init__(self, *models: nn.Module) -> None:
        self.landing = {id(model): [torch.empty_like(tensor) for tensor in model_tensors(model)] for model in models}
        self.in_flight: list[tuple[Transfer, nn.Module]] = []

    def receive(self, transport: Transport, model: nn.Module, kind: str, codec: Codec | None) -> None:
        """Post the receive of the server's next `model` (of message kind `kind`)."""
        transfer = transport.receive(self.landing[id(model)], SERVER_RANK, kind, codec)
        self.in_flight.append((transfer, model))

    def adopt(self) -> None:
        """Wait for every model posted and make it the worker's own (a no-op when none is)."""
        for transfer, model in self.in_flight:
            transfer.wait()
            with torch.no_grad():
                for tensor, value in zip(model_tensors(model), self.landing[id(model)], strict=True):
                    tensor.copy_(value)
        self.in_flight = []
