"""Device profiles for the edge clock: how fast each node computes and what its link carries.

A profile describes the emulated deployment the edge clock (`entgan.bench.edge_clock`) replays a
run on: the server's device, the workers' devices (a list cycled over the workers in rank order,
so one entry means every worker alike and K entries one each), and optionally one link that every
transfer shares (`shared_link_mbit`, e.g. every rank behind one 20 Mbit/s bottleneck, as the
bench's `network: {mode: shared}` shapes it). Profiles live in bench configs under `profiles:`
(by name) or in a file of their own (`load_profiles`):

    profiles:
      edge-lan:
        workers: [{speed: 0.5, uplink_mbit: 100, latency_ms: 1}]
      edge-uneven:
        workers:
          - {speed: 0.25, uplink_mbit: 5, downlink_mbit: 20, latency_ms: 20}
          - {speed: 0.5, uplink_mbit: 50, downlink_mbit: 200, latency_ms: 10}
      shared-20mbit:
        shared_link_mbit: 20

The link fields are the ones of the bench's per-node link profiles (`entgan.bench.links`); an
omitted rate is unlimited, an omitted downlink equals the uplink.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from entgan.config import ConfigError, format_validation_error, read_yaml_file

PositiveFloat = Annotated[float, Field(gt=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DeviceProfile(_Strict):
    """One node of the emulated edge: its compute speed and its own link."""

    speed: PositiveFloat = 1.0
    """Compute speed relative to the machine the run was recorded on: each phase takes its recorded
    CPU time divided by this (0.25: a device four times slower)."""
    uplink_mbit: PositiveFloat | None = None
    """Rate of what the node sends, in Mbit/s (None: unlimited)."""
    downlink_mbit: PositiveFloat | None = None
    """Rate of what the node receives, in Mbit/s (None: the uplink's)."""
    latency_ms: Annotated[float, Field(ge=0, le=10_000)] = 0.0
    """One-way delay of the node's link; a message between two nodes crosses both nodes' links."""

    @property
    def downlink(self) -> float | None:
        return self.downlink_mbit if self.downlink_mbit is not None else self.uplink_mbit


class EdgeProfile(_Strict):
    """The whole emulated deployment: the server's device, the workers', an optional shared link."""

    server: DeviceProfile = DeviceProfile()
    workers: Annotated[list[DeviceProfile], Field(min_length=1)] = [DeviceProfile()]
    """Cycled over the workers in rank order: worker rank r gets entry (r - 1) mod len."""
    shared_link_mbit: PositiveFloat | None = None
    """One link every transfer crosses besides the nodes' own (the bench's shared, `tc`-shaped
    loopback): concurrent transfers share its rate. None: no such link."""
    wire_overhead: Annotated[float, Field(ge=1, le=2)] = 1.0
    """Bytes on a link per payload byte: packet headers (TCP/IPv4 with timestamps on a 1500-byte
    MTU, and the 14-byte link header a shaper counts: 1514 / 1448 = 1.046). 1: payload only."""

    def device(self, rank: int) -> DeviceProfile:
        """Rank 0's device is the server's; rank r >= 1 gets its worker entry."""
        if rank == 0:
            return self.server
        return self.workers[(rank - 1) % len(self.workers)]


UNLIMITED = EdgeProfile()
"""Every rank at the recorded speed, every link unlimited: the run's own compute and waits alone."""


def parse_profiles(data: object, origin: str, default_name: str = "profile") -> dict[str, EdgeProfile]:
    """Profiles from a mapping: its `profiles:` section (a profiles file, or a bench config), or
    the mapping itself as one profile named `default_name`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping at the top level, found {type(data).__name__}")
    named: dict[str, Any] = data["profiles"] if "profiles" in data else {default_name: data}
    if not isinstance(named, dict) or not named:
        raise ConfigError(f"{origin}: profiles: expected a mapping of names to profiles")
    profiles = {}
    for name, profile in named.items():
        try:
            profiles[str(name)] = EdgeProfile.model_validate(profile)
        except ValidationError as error:
            message = format_validation_error(error, origin)
            raise ConfigError(message.replace("  - ", f"  - profiles.{name}." if "profiles" in data else "  - ")) from None
    return profiles


def load_profiles(path: str | Path) -> dict[str, EdgeProfile]:
    """The profiles of a YAML file: a single profile, a `profiles:` mapping, or a bench config."""
    path = Path(path)
    data = read_yaml_file(path, "profile file")
    return parse_profiles(data, str(path), default_name=path.stem)
