"""Per-node link profiles: each edge worker behind its own shaped link (`network.mode: per-node`).

A link profile uses the fields of the edge clock's device profiles where they overlap (uplink,
downlink, latency); a device's speed factor has no meaning for a real link and is not part of it.
The emulated cluster (`entgan.bench.cluster`) gives worker rank r the r-th profile: its uplink
shapes what the worker sends, its downlink what it receives. The server's own link is unshaped
(it stands for the data centre).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

PositiveFloat = Annotated[float, Field(gt=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class LinkProfile(_Strict):
    """One edge node's link to the others."""

    name: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    """A label for reports (e.g. `phone-5mbit`); default: the rates."""
    uplink_mbit: PositiveFloat
    """Rate of what the node sends (token-bucket filter on its side of the link)."""
    downlink_mbit: PositiveFloat | None = None
    """Rate of what the node receives (token-bucket filter on the switch's side); default: the uplink."""
    latency_ms: Annotated[float, Field(ge=0, le=10_000)] = 0.0
    """One-way delay added in each direction (`netem`); needs a kernel with sch_netem."""

    @property
    def downlink(self) -> float:
        return self.downlink_mbit if self.downlink_mbit is not None else self.uplink_mbit

    def label(self) -> str:
        if self.name is not None:
            return self.name
        words = f"{self.uplink_mbit:g}/{self.downlink:g} Mbit/s"
        return f"{words} +{self.latency_ms:g} ms" if self.latency_ms else words


class PerNodeNetworkConfig(_Strict):
    """Every rank in a network namespace of its own, each worker behind its own shaped link, and
    the run started with torchrun on every node (`entgan.bench.cluster`). Needs root."""

    mode: Literal["per-node"]
    links: Annotated[list[LinkProfile], Field(min_length=1)]
    """One profile per worker, in rank order (rank 1 first); as many as the run has workers."""
    queue_ms: PositiveFloat = 100.0
    """Longest a packet may wait in a link's token bucket before it is dropped (tbf `latency`)."""
    port: Annotated[int, Field(ge=1024, le=65535)] = 29400
    """Rendezvous port on the server node's address."""
    required: bool = True
    """If the cluster cannot be made (not root, no `ip netns` or `tc`): stop with an error (true)
    or run unconstrained on loopback and say so in the report (false)."""


EDGE_UNEVEN_UPLINKS_MBIT = (5.0, 10.0, 20.0, 50.0)
"""The `edge-uneven` profiles: these uplinks, two workers each (rank order), downlinks 4x."""


def edge_uneven(workers: int = 8) -> list[LinkProfile]:
    """`workers` links cycling through 5, 10, 20, 50 Mbit/s uplinks (downlinks 4x): for 8 workers,
    two workers on each; for 4, one on each. Ranks sharing an uplink sit next to each other."""
    if workers < 1:
        raise ValueError("edge_uneven needs at least one worker")
    each = max(1, workers // len(EDGE_UNEVEN_UPLINKS_MBIT))
    uplinks = [EDGE_UNEVEN_UPLINKS_MBIT[min(index // each, len(EDGE_UNEVEN_UPLINKS_MBIT) - 1)] for index in range(workers)]
    return [LinkProfile(uplink_mbit=rate, downlink_mbit=4 * rate) for rate in uplinks]
