"""`entgan generate`, `entgan evaluate`, `entgan serve`: what users do with a trained generator.

    entgan generate runs/demo --task digits-5-9 -n 2000 --out synthetic/   # an image folder, seeded
    entgan evaluate runs/demo                                              # train on synthetic, test on real
    entgan serve digits --port 8000                                        # HTTP; follows the deployed version

RUN_DIR_OR_JOB is a run directory, or the name of a lifelong job (its deployed version), looked up
in `--root` / `--db` as `entgan job` does (`entgan.deployed`). Argument definitions only here: torch,
fastapi and uvicorn are imported by the handlers, so `entgan --help` stays quick. User errors are
raised as ConfigError/DataError, which `entgan.cli.main` reports on one line with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import NoReturn


def _refuse(message: str) -> NoReturn:
    """A usage error, reported by `entgan.cli.main` like a bad config (imported here, not at the
    top: building the parser must not load pydantic)."""
    from entgan.config import ConfigError

    raise ConfigError(message)


def _job_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--root", default=None, help="jobs folder, for a job name (default: $ENTGAN_JOBS_DIR or ./entgan-jobs)")
    options.add_argument("--db", default=None, help="jobs database, for a job name (default: <root>/entgan-jobs.sqlite)")
    return options


def _threads(count: int | None) -> None:
    if count is not None:
        if count < 1:
            _refuse(f"--threads must be at least 1, found {count}")
        import torch

        torch.set_num_threads(count)


def _command_generate(args: argparse.Namespace) -> int:
    if args.n < 1:
        _refuse(f"-n must be at least 1, found {args.n}")
    if args.batch_size < 1:
        _refuse(f"--batch-size must be at least 1, found {args.batch_size}")
    from pathlib import Path

    from tqdm import tqdm

    from entgan.deployed import load_model
    from entgan.export import check_output_dir, export_images, select_tasks

    _threads(args.threads)
    check_output_dir(Path(args.out), args.overwrite)  # before loading anything
    model = load_model(args.source, jobs_root=args.root, db=args.db)
    tasks = select_tasks(model, args.task)
    with tqdm(total=args.n * len(tasks), unit="img", disable=args.no_progress, file=sys.stderr) as bar:
        report = export_images(
            model, Path(args.out), args.n, tasks=tasks, seed=args.seed, batch_size=args.batch_size,
            overwrite=args.overwrite, progress=bar.update,
        )
    for task in report.tasks:
        print(f"wrote {args.n} images of task '{task}' to {Path(args.out) / task}")
    print(f"model: {report.model}; seed {report.seed}; {report.seconds:.1f} s")
    print(f"read back as an image-folder source: data: {{source: image-folder, path: {args.out}}} "
          f"(labels {report.labels})")
    return 0


def _command_evaluate(args: argparse.Namespace) -> int:
    if args.samples_per_task < 1 or args.epochs < 1:
        _refuse("--samples-per-task and --epochs must be at least 1")
    from entgan.deployed import load_model
    from entgan.utility import evaluate_utility

    _threads(args.threads)
    model = load_model(args.source, jobs_root=args.root, db=args.db)
    report = evaluate_utility(
        model, samples_per_task=args.samples_per_task, epochs=args.epochs, seed=args.seed,
        max_test_per_task=args.max_test_per_task,
    )
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, sort_keys=True))
        return 0
    print(f"model: {report.model}")
    print(f"test images (real): {report.test_data}; per task {report.test_per_task}")
    print(f"training images per task, for each classifier: {report.train_per_task}; {report.epochs} epochs, seed {report.seed}")
    print(f"{'task':<24}{'train on synthetic':>20}{'train on real':>16}")
    for task in report.tasks:
        real = report.real_per_task.get(task) if report.real_per_task else None
        print(f"{task:<24}{report.synthetic_per_task[task]:>20.3f}{'' if real is None else f'{real:.3f}':>16}")
    real_text = "" if report.real is None else f"{report.real:.3f}"
    print(f"{'balanced accuracy':<24}{report.synthetic:>20.3f}{real_text:>16}")
    if report.ratio is not None:
        print(f"classification accuracy score (CAS) {report.synthetic:.3f} = {report.ratio:.2f} x the real-data reference")
    if not report.test_disjoint:
        print("warning: the test images were in the generator's training data; the score is optimistic", file=sys.stderr)
    for note in report.notes:
        print(f"note: {note}")
    return 0


def _command_serve(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        _refuse(f"--port must be in 0..65535, found {args.port}")
    from entgan.serve import serve

    _threads(args.threads)
    serve(args.source, host=args.host, port=args.port, max_n=args.max_n, jobs_root=args.root, db=args.db,
          log_level=args.log_level)
    return 0


def add_export_commands(commands: argparse._SubParsersAction) -> None:
    job = _job_options()

    generate = commands.add_parser(
        "generate", parents=[job], help="write N generated images per task as an image folder (PNG)"
    )
    generate.add_argument("source", metavar="RUN_DIR_OR_JOB", help="a run directory, or a job (its deployed version)")
    generate.add_argument("--task", action="append", help="a task to export (repeat for several; default: every task)")
    generate.add_argument("-n", type=int, required=True, help="images per task")
    generate.add_argument("--out", required=True, help="output folder: one sub-folder per task")
    generate.add_argument("--seed", type=int, default=0, help="latent seed (default 0): same seed, same images")
    generate.add_argument("--batch-size", type=int, default=256, help="images generated at once (default 256)")
    generate.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    generate.add_argument("--no-progress", action="store_true", help="no progress bar")
    generate.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    generate.set_defaults(handler=_command_generate)

    evaluate = commands.add_parser(
        "evaluate", parents=[job],
        help="train on synthetic, test on real: how useful the generated images are as training data",
    )
    evaluate.add_argument("source", metavar="RUN_DIR_OR_JOB", help="a run directory, or a job (its deployed version)")
    evaluate.add_argument("--samples-per-task", type=int, default=1000,
                          help="training images per task for each classifier (default 1000)")
    evaluate.add_argument("--epochs", type=int, default=4, help="classifier training epochs (default 4)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--max-test-per-task", type=int, default=2000, help="cap on real test images per task")
    evaluate.add_argument("--json", action="store_true", help="print the report as JSON")
    evaluate.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    evaluate.set_defaults(handler=_command_evaluate)

    serve = commands.add_parser(
        "serve", parents=[job], help="serve a generator over HTTP (follows a job's deployed version)"
    )
    serve.add_argument("source", metavar="JOB_OR_RUN_DIR", help="a job (its deployed version), or a run directory")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, printed)")
    serve.add_argument("--max-n", type=int, default=256, help="most images one request may ask for (default 256)")
    serve.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    serve.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(handler=_command_serve)
