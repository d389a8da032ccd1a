"""Fuzzing the configuration layer: whatever a user feeds it, the answer is a valid config or a
clear `ConfigError` (exit status 2 from `entgan validate`), never another exception."""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import tempfile
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from entgan.cli import EXIT_USAGE, main
from entgan.config import ConfigError, RunConfig, load_config, parse_config

from conftest import tiny_config_data

EXAMPLES = int(os.environ.get("ENTGAN_FUZZ_EXAMPLES", "60"))
"""Examples per property; raise it for a deeper search (e.g. ENTGAN_FUZZ_EXAMPLES=2000)."""
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _field_paths(model: type[BaseModel], prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every field of the config, nested models included (items of a list of models at index 0)."""
    paths = []
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        paths.append(path)
        is_list = typing.get_origin(field.annotation) is list
        for member in typing.get_args(field.annotation) or (field.annotation,):
            if isinstance(member, type) and issubclass(member, BaseModel):
                paths.extend(_field_paths(member, (*path, 0) if is_list else path))
    return paths


FIELD_PATHS = _field_paths(RunConfig)
FIELD_NAMES = sorted({str(path[-1]) for path in FIELD_PATHS})

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-3, max_value=3),
    st.sampled_from([2**63, -(2**63) - 1, 10**40]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(FIELD_NAMES),
    st.binary(max_size=8),
)
keys = st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=8), st.integers(), st.booleans(), st.none())
nested = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
    max_leaves=16,
)


def _set(data: Any, path: tuple[Any, ...], value: Any) -> Any:
    """Put `value` at `path` inside `data`, creating (or overwriting) containers on the way."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(head, int):
        items = data if isinstance(data, list) and data else [{}]
        items[0] = _set(items[0], rest, value)
        return items
    mapping = data if isinstance(data, dict) else {}
    mapping[head] = _set(mapping.get(head), rest, value)
    return mapping


def _get(data: Any, path: tuple[Any, ...]) -> Any:
    """The value at `path`, or None where an earlier mutation left something else on the way."""
    for part in path:
        if isinstance(part, int) and isinstance(data, list) and data:
            data = data[0]
        elif isinstance(part, str) and isinstance(data, dict):
            data = data.get(part)
        else:
            return None
    return data


@st.composite
def mutated_configs(draw: st.DrawFn) -> dict[str, Any]:
    """A valid tiny config with a few real fields set to junk, deleted, or joined by unknown ones."""
    data = copy.deepcopy(tiny_config_data())
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        path = draw(st.sampled_from(FIELD_PATHS))
        action = draw(st.sampled_from(["replace", "replace", "delete", "unknown"]))
        if action == "replace":
            data = _set(data, path, draw(nested))
        elif action == "delete":
            parent = _get(data, path[:-1])
            if isinstance(parent, dict):
                parent.pop(path[-1], None)
        else:
            data = _set(data, (*path[:-1], draw(st.text(min_size=1, max_size=10))), draw(scalars))
    return data


def _parse(data: object) -> RunConfig | ConfigError:
    try:
        config = parse_config(data, origin="fuzz.yaml")
    except ConfigError as error:
        assert str(error).startswith("fuzz.yaml: "), error
        return error
    # A config that validates must also survive its own YAML form (what a run directory stores).
    assert parse_config(yaml.safe_load(config.to_yaml())) == config
    assert config.world_size == len(config.worker_tasks()) + 1
    assert all(math.isfinite(value) for value in _floats(config.model_dump())), "non-finite number accepted"
    return config


def _floats(value: object) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, dict):
        return [f for item in value.values() for f in _floats(item)]
    if isinstance(value, list | tuple):
        return [f for item in value for f in _floats(item)]
    return []


def _validate_file(content: bytes) -> tuple[int, str]:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "config.yaml"
        path.write_bytes(content)
        stderr, stdout = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            status = main(["validate", str(path)])
    if status == EXIT_USAGE:
        assert stderr.getvalue().startswith("entgan: error: ") and len(stderr.getvalue()) > 20
    else:
        assert status == 0 and '"ok": true' in stdout.getvalue()
    return status, stderr.getvalue()


@FUZZ
@given(nested)
def test_random_structures_give_a_config_or_a_config_error(data: object) -> None:
    _parse(data)


@FUZZ
@given(mutated_configs())
def test_junk_in_real_fields_gives_a_config_or_an_error_naming_the_field(data: dict[str, Any]) -> None:
    outcome = _parse(data)
    if isinstance(outcome, ConfigError):  # one line per problem, each starting with where it is
        assert str(outcome).startswith("fuzz.yaml: invalid configuration\n  - "), outcome


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_random_files_give_a_config_or_a_config_error(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "config.yaml"
        path.write_bytes(content)
        try:
            load_config(path)
        except ConfigError as error:
            assert str(path) in str(error)


@settings(max_examples=max(1, EXAMPLES // 3), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_configs(), st.integers(min_value=0, max_value=40), st.binary(min_size=1, max_size=3))
def test_validate_command_exits_0_or_2_on_mutated_and_corrupted_files(
    data: dict[str, Any], cut: int, junk: bytes
) -> None:
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode()
    _validate_file(text)
    corrupted = text[:cut] + junk + text[cut:]
    _validate_file(corrupted)


TASKS = b"\ntasks: [{name: a, labels: [0]}]"


@pytest.mark.parametrize(
    "content",
    [
        b"&a [*a]",
        b"tasks: &t [*t]",
        b"[" * 2000 + b"]" * 2000,
        b"rounds: !!binary aGVsbG8=" + TASKS,
        b"seed: 2001-01-01" + TASKS,
        b"tasks: !!set {a, b}",
        b"\xff\xfe\x00rounds: 3",
        b"",
        b"rounds: .inf" + TASKS,
        b"engine: {start_timeout_s: .inf}" + TASKS,
        b"stop: {time_budget_s: .nan}" + TASKS,
        b"privacy: {enabled: yes, delta: 1.0}" + TASKS,
        b'data: {source: idx, path: "a\\0b"}' + TASKS,
    ],
    ids=[
        "self-alias", "recursive-tasks", "deep-nesting", "binary", "date", "set", "not-utf8", "empty",
        "inf-rounds", "inf-timeout", "nan-budget", "delta-out-of-range", "nul-in-path",
    ],
)
def test_nasty_inputs_random_search_rarely_reaches_exit_with_status_2(content: bytes) -> None:
    status, message = _validate_file(content)
    assert status == EXIT_USAGE, message


def test_a_valid_file_passes_validate() -> None:
    assert _validate_file(b"data: {max_per_class: 5}" + TASKS)[0] == 0
