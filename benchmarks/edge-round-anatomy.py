#!/usr/bin/env python3
"""Where a run's edge-clock time goes: compute, links, and how much of the two overlapped.

Each recorded run (a bench's `runs/<row>-s<seed>`, recorded with `engine.timeline: true`) is
replayed on each profile of a bench config three times (`entgan.bench.edge_clock`):

- as the profile says (the bench's edge clock);
- with every link unlimited and without latency (compute alone: the devices' speeds still apply);
- with every device infinitely fast (links alone: bandwidths and latencies still apply).

If compute and communication never overlapped, the first would be the sum of the other two; the
table gives the seconds per round of each and the share of the shorter one that was hidden.

    python benchmarks/edge-round-anatomy.py benchmarks/edge-generator.yaml RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from entgan.bench.edge_clock import load_programs, replay
from entgan.bench.profiles import DeviceProfile, EdgeProfile, load_profiles

INSTANT = 1e9
"""Speed factor of a device whose compute takes no time."""


def links_only(profile: EdgeProfile) -> EdgeProfile:
    def fast(device: DeviceProfile) -> DeviceProfile:
        return device.model_copy(update={"speed": INSTANT})

    return profile.model_copy(update={"server": fast(profile.server), "workers": [fast(w) for w in profile.workers]})


def compute_only(profile: EdgeProfile) -> EdgeProfile:
    def free(device: DeviceProfile) -> DeviceProfile:
        return DeviceProfile(speed=device.speed)

    return EdgeProfile(server=free(profile.server), workers=[free(w) for w in profile.workers])


def anatomy(run_dir: Path, profiles: dict[str, EdgeProfile]) -> list[str]:
    programs = load_programs(run_dir)
    rows = []
    for name, profile in profiles.items():
        whole, compute, links = (replay(programs, p) for p in (profile, compute_only(profile), links_only(profile)))
        rounds = max(len(whole.rounds), 1)
        per_round = [clock.total_s / rounds for clock in (whole, compute, links)]
        hidden = (per_round[1] + per_round[2] - per_round[0]) / max(min(per_round[1], per_round[2]), 1e-12)
        rows.append(
            f"| {run_dir.name} | {name} | {rounds} | {per_round[0]:.2f} | {per_round[1]:.2f} | {per_round[2]:.2f} | {hidden:.0%} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_config", type=Path, help="bench YAML whose profiles to replay on")
    parser.add_argument("runs", type=Path, nargs="+", help="recorded run folders")
    args = parser.parse_args()
    profiles = load_profiles(args.bench_config)
    print("| run | profile | rounds | s/round | compute alone | links alone | overlap (of the shorter) |")
    print("|---|---|---|---|---|---|---|")
    for run_dir in args.runs:
        for row in anatomy(run_dir, profiles):
            print(row)


if __name__ == "__main__":
    main()
