"""Entry point for runs launched by torchrun, one process per rank, across machines.

    torchrun --nnodes=3 --nproc-per-node=1 --node-rank=N \\
             --rdzv-backend=c10d --rdzv-endpoint=SERVER_HOST:29400 \\
             -m entgan.run configs/demo.yaml --run-dir runs/demo

Rank 0 (the server) checks the config and its evaluation data, creates the run directory and
prepares the domain classifier; every worker checks and loads only its own data. Then all ranks
run the same code as the embedded launcher (`entgan.engine.launch.run_rank`).

Every process needs the job secret (`security.secret_file`, or the environment variable named by
`security.secret_env`, ENTGAN_JOB_SECRET by default). With `torchrun --max-restarts=N`, a group
restarted after a failure resumes from the last complete checkpoint. For restarts under the c10d
rendezvous, start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (README "Several machines").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import torch.distributed as dist

from entgan.config import ConfigError, load_config
from entgan.data import DataError


TORCHRUN_MARKER = "torchrun.json"
"""Written by rank 0 into a run directory it creates: which torchrun agent (and job) started it."""


def _torchrun_identity() -> dict[str, object]:
    """This process's torchrun job and agent: the agent is the parent of every rank it starts."""
    return {"run_id": os.environ.get("TORCHELASTIC_RUN_ID", ""), "agent_pid": os.getppid(), "host": socket.gethostname()}


def _restarted_by_torchrun(run_dir: Path) -> bool:
    """Whether torchrun restarted this node's process within one job (then the run resumes).

    TORCHELASTIC_RESTART_COUNT counts only the restarts after a failure on this node: when a worker
    on another node dies, its agent restarts and re-joins, and this node's agent, whose process may
    still look healthy, restarts it as a membership change with the count unchanged. So a server
    that finds the run directory it made earlier in the same job, under the same agent, resumes too.
    """
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return True
    try:
        recorded = json.loads((run_dir / TORCHRUN_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return bool(recorded == _torchrun_identity())


def main(argv: Sequence[str] | None = None) -> int:
    from entgan.engine.launch import LaunchOptions, domain_classifier, preflight, run_rank, select_backend
    from entgan.engine.security import load_secret
    from entgan.rundir import RunDirectory

    parser = argparse.ArgumentParser(prog="python -m entgan.run", description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on the server")
    args = parser.parse_args(argv)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        print("entgan.run: error: RANK/WORLD_SIZE are not set; start this module with torchrun "
              "(or use `entgan run CONFIG` on one machine)", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
        run_dir = Path(args.run_dir)
        # torchrun --max-restarts restarts the whole group after a failure: go on from the checkpoint.
        resume = args.resume or _restarted_by_torchrun(run_dir)
        may_restart = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
        preflight(config, resuming=resume or may_restart)
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if world_size != config.world_size:
            raise ConfigError(f"{args.config}: needs {config.world_size} processes (1 server + "
                              f"{config.num_workers} workers), torchrun started {world_size}")
        secret = load_secret(config.security)
        if rank == 0:
            if not resume:
                RunDirectory.create(run_dir, config, overwrite=args.overwrite)
                (run_dir / TORCHRUN_MARKER).write_text(json.dumps(_torchrun_identity()))
            domain_classifier(config)
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
    except (ConfigError, DataError) as error:
        print(f"entgan.run: error: {error}", file=sys.stderr)
        return 2

    dist.init_process_group(
        backend=select_backend(config, local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size))),
        timeout=datetime.timedelta(seconds=config.engine.start_timeout_s)
    )
    try:
        run_rank(config, rank, world_size, run_dir, LaunchOptions(show_progress=rank == 0 and not args.no_progress, resume=resume), secret)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
