"""`entgan --help` and every `entgan CMD --help` answer without importing torch or the other heavy
packages: the parser is light, and each command's handler imports what it needs when it runs.

Checked on imports, in a fresh interpreter (this test process has torch loaded already), never on
wall time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src"

HEAVY = ("torch", "numpy", "pydantic", "matplotlib", "PIL", "tensorboard", "torchmetrics", "sklearn", "scipy",
         "opacus", "mlxtend", "yaml", "tqdm")
"""Top-level packages that `--help` must not import (each costs from tens of ms to over a second)."""

_PROBE = """
import argparse, contextlib, io, json, sys
HEAVY = set(sys.argv[1].split(","))

def heavy():
    return sorted({name.split(".")[0] for name in sys.modules} & HEAVY)

from entgan import cli  # the console script's own import

def commands(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*prefix, name))
    if prefix:
        yield prefix

found = {"import": heavy()}
for argv in [(), *commands(cli.build_parser())]:
    with contextlib.redirect_stdout(io.StringIO()) as shown:
        try:
            cli.main([*argv, "--help"])
        except SystemExit:
            pass
    found[" ".join([*argv, "--help"])] = {"heavy": heavy(), "usage": shown.getvalue().startswith("usage:")}
print(json.dumps(found))
"""


def _probe() -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, ",".join(HEAVY)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(SOURCE)}, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_help_of_every_command_imports_nothing_heavy() -> None:
    found = _probe()

    assert found.pop("import") == []
    assert {"--help", "run --help", "sample --help", "bench --help", "job create --help", "kb show --help"} <= set(found)
    assert all(outcome["usage"] for outcome in found.values()), found
    offenders = {argv: outcome["heavy"] for argv, outcome in found.items() if outcome["heavy"]}
    assert offenders == {}, f"--help imported heavy packages: {offenders}"


def test_module_entry_help_imports_no_torch() -> None:
    """`python -m entgan.cli --help`, with the import log of the interpreter itself."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "entgan.cli", "--help"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(SOURCE)}, timeout=120,
    )

    assert result.returncode == 0 and result.stdout.startswith("usage: entgan"), result.stderr[-3000:]
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert {"entgan", "entgan.cli_bench", "entgan.cli_job"} <= imported  # the log sees the parser's modules
    assert not {name for name in imported if name.split(".")[0] in HEAVY}


def test_public_api_is_imported_on_first_use() -> None:
    code = (
        "import sys, entgan\n"
        "assert 'torch' not in sys.modules and 'entgan.api' not in sys.modules\n"
        "from entgan import EntGAN, RunConfig, Task, ConfigError, load_config, load_generator, sample_run\n"
        "import entgan.api, entgan.config\n"
        "assert EntGAN is entgan.api.EntGAN and RunConfig is entgan.config.RunConfig\n"
        "assert set(entgan.__all__) <= set(dir(entgan))\n"
        "try:\n"
        "    entgan.NoSuchThing\n"
        "except AttributeError as error:\n"
        "    assert 'NoSuchThing' in str(error)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
        "print(entgan.__version__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(SOURCE)}, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
