"""The level bench: figures over reporting seeds, paired ratios with confidence intervals, the FID
area, and equal tuning (`entgan tune`) whose choices the bench applies."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from test_bench import _context, _entgan, _result, bench_data

from entgan.bench import plan_runs
from entgan.bench.config import load_bench_config, parse_bench_config
from entgan.bench.plan import plan_tuning_runs
from entgan.bench.report import over_seeds, render_markdown, report_data
from entgan.bench.results import EdgeFigures, RunResult, TargetHit, bytes_sent_until, fid_area
from entgan.bench.statistics import Observation, paired_ratio, spread
from entgan.bench.tuning import choose
from entgan.config import ConfigError

# --- statistics -------------------------------------------------------------------------------


def test_spread_gives_median_and_quartiles_and_counts_censored_seeds() -> None:
    summary = spread([Observation(v) for v in (4.0, 1.0, 3.0, 2.0)] + [Observation(10.0, censored=True)])

    assert summary is not None
    assert (summary.n, summary.median, summary.q1, summary.q3, summary.censored) == (5, 3.0, 2.0, 4.0, 1)
    assert spread([]) is None


def test_paired_ratio_is_the_geometric_mean_with_an_interval_around_it() -> None:
    reference = {seed: Observation(10.0) for seed in range(6)}
    half = {seed: Observation(5.0 * (1.1 if seed % 2 else 0.9)) for seed in range(6)}

    ratio = paired_ratio(half, reference)

    assert ratio is not None and ratio.n == 6 and ratio.censored == 0
    assert ratio.geometric_mean == pytest.approx(math.sqrt(0.55 * 0.45))
    assert ratio.ci_low < ratio.geometric_mean < ratio.ci_high < 1  # clearly below the reference
    assert ratio.wilcoxon_p is not None and ratio.wilcoxon_p < 0.05


def test_paired_ratio_pairs_by_seed_and_says_when_it_is_a_bound() -> None:
    reference = {0: Observation(10.0), 1: Observation(20.0), 2: Observation(40.0, censored=True)}
    row = {1: Observation(10.0), 2: Observation(40.0), 3: Observation(1.0)}  # seed 3 has no pair

    ratio = paired_ratio(row, reference)

    assert ratio is not None and ratio.n == 2 and ratio.censored == 1
    assert ratio.geometric_mean == pytest.approx(math.sqrt(0.5))
    # An interval from 2 seeds spans the two ratios.
    assert ratio.ci_low == pytest.approx(0.5) and ratio.ci_high == pytest.approx(1.0)
    assert paired_ratio({0: Observation(1.0)}, reference) is None


def test_an_identical_row_has_ratio_one_and_no_test() -> None:
    same = {seed: Observation(float(seed + 1)) for seed in range(6)}

    ratio = paired_ratio(same, same)

    assert ratio is not None and ratio.geometric_mean == 1.0 == ratio.ci_low == ratio.ci_high
    assert ratio.wilcoxon_p is None


def test_fid_area_holds_each_evaluation_until_the_next_and_runs_to_the_budget() -> None:
    curve = [(1.0, 300.0), (3.0, 100.0), (5.0, 50.0)]

    # 300 for 2 s, 100 for 2 s, 50 for the last 5 s up to the 10-s budget, over 9 s.
    assert fid_area(curve, 10.0) == pytest.approx((600 + 200 + 250) / 9)
    assert fid_area(curve, 3.0) == pytest.approx(300.0)  # evaluations at or after the budget do not count
    assert fid_area([], 10.0) is None
    assert fid_area([(1.0, float("nan")), (2.0, 80.0)], 4.0) == pytest.approx(80.0)


# --- configuration ----------------------------------------------------------------------------


TUNING = {"seeds": [7], "grid": {"entgan": [{"engine.participation": 0.5}, {"engine.participation": 1.0}],
                                 "flgan": [{}, {"engine.participation": 0.5}]}}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"seeds": [0, 1], "tuning": {**TUNING, "seeds": [1, 9]}}, "disjoint from seeds (reporting), both have [1]"),
        ({"tuning": {**TUNING, "grid": {**TUNING["grid"], "flgan": [{}]}}}, "the same number of candidates"),
        ({"tuning": {**TUNING, "grid": {"flgan": [{}, {}]}}}, "every method needs candidates, missing ['entgan']"),
        ({"tuning": {**TUNING, "grid": {**TUNING["grid"], "flgan": [{}, {"engine.participaton": 0.5}]}}},
         "tuning.grid.flgan.1"),
        ({"seeds": [3, 3]}, "seeds must be distinct"),
        ({"tuning": {**TUNING, "clock": "edge-lan"}}, "tuning.clock: 'edge-lan' is not one of the bench's profiles []"),
    ],
)
def test_bad_seeds_or_tuning_name_the_problem(overrides: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_bench_config(bench_data(methods=["entgan", "flgan"], ablations=[], **overrides), origin="bench.yaml")
    assert expected in str(caught.value)


def test_seeds_multiply_the_runs_and_tuned_settings_reach_only_the_methods(tmp_path: Path) -> None:
    (tmp_path / "tuned.yaml").write_text(yaml.safe_dump({"methods": {"flgan": {"engine.participation": 0.5}}}))
    bench = parse_bench_config(
        bench_data(methods=["entgan", "flgan"], seeds=[4, 5], tuned="tuned.yaml", tuning=TUNING,
                   ablations=[{"name": "flgan-all", "algorithm": "flgan", "overrides": {}}]),
        origin="bench.yaml", relative_to=tmp_path,
    )

    runs = plan_runs(bench)

    assert [run.key for run in runs] == ["entgan-s4", "flgan-s4", "flgan-all-s4", "entgan-s5", "flgan-s5", "flgan-all-s5"]
    assert {run.key: run.seed for run in runs}["flgan-s5"] == 5
    participation = {run.key: run.config.engine.participation for run in runs}
    assert participation["flgan-s4"] == 0.5 and participation["flgan-all-s4"] is None
    assert participation["entgan-s4"] is None
    tuning = plan_tuning_runs(bench)
    assert [run.key for run in tuning] == ["entgan-c0-s7", "entgan-c1-s7", "flgan-c0-s7", "flgan-c1-s7"]
    assert [run.config.engine.participation for run in tuning] == [0.5, 1.0, None, 0.5]
    with pytest.raises(ConfigError, match="tuned file not found"):
        parse_bench_config(bench_data(tuned="missing.yaml"), origin="bench.yaml", relative_to=tmp_path)


# --- choosing and reporting -------------------------------------------------------------------


def test_tuning_chooses_the_lowest_median_area_and_never_a_failed_candidate() -> None:
    bench = parse_bench_config(bench_data(methods=["entgan", "flgan"], ablations=[], tuning={**TUNING, "seeds": [7, 8]}),
                               origin="bench.yaml")
    results = [
        _result("entgan-c0", seed=7, fid_area=90.0), _result("entgan-c0", seed=8, fid_area=110.0),
        _result("entgan-c1", seed=7, fid_area=95.0), _result("entgan-c1", seed=8, fid_area=96.0),
        _result("flgan-c0", seed=7, fid_area=50.0),
        _result("flgan-c1", seed=7, fid_area=80.0), _result("flgan-c1", seed=8, fid_area=80.0),
    ]
    failed = _result("flgan-c0", seed=8, fid_area=None)
    failed.status = "failed"

    tuned = choose(bench, [*results, failed])

    assert tuned["methods"] == {"entgan": {"engine.participation": 1.0}, "flgan": {"engine.participation": 0.5}}
    entgan = tuned["tuning"]["candidates"]["entgan"]
    assert [entry["chosen"] for entry in entgan] == [False, True]
    assert [run["seed"] for run in entgan[0]["runs"]] == [7, 8]
    assert math.isinf(tuned["tuning"]["candidates"]["flgan"][0]["score"])  # median of 50 and a failure


def test_tuning_on_an_edge_clock_chooses_the_fastest_to_the_target_there() -> None:
    """A candidate that never reaches the target on the tuning clock loses to one that does, even
    with a better FID area; where none reach it, the area decides."""
    profile = {"workers": [{"speed": 0.5, "uplink_mbit": 5, "downlink_mbit": 20}]}
    bench = parse_bench_config(
        bench_data(methods=["entgan", "flgan"], ablations=[], profiles={"slow": profile},
                   tuning={**TUNING, "seeds": [7, 8], "clock": "slow"}),
        origin="bench.yaml",
    )

    def run(label: str, seed: int, area: float, edge_s: float | None) -> RunResult:
        return _result(label, seed=seed, fid_area=area, edge={"slow": EdgeFigures(clock_s=500.0, time_to_target_s=edge_s)})

    results = [
        run("entgan-c0", 7, 80.0, None), run("entgan-c0", 8, 80.0, 300.0),  # best area, median miss
        run("entgan-c1", 7, 95.0, 400.0), run("entgan-c1", 8, 99.0, 450.0),
        run("flgan-c0", 7, 90.0, None), run("flgan-c0", 8, 90.0, None),
        run("flgan-c1", 7, 85.0, None), run("flgan-c1", 8, 85.0, None),
    ]

    tuned = choose(bench, results)

    assert tuned["methods"] == {"entgan": {"engine.participation": 1.0}, "flgan": {"engine.participation": 0.5}}
    entgan = tuned["tuning"]["candidates"]["entgan"]
    assert entgan[1]["edge_time_to_target_s"] == 425.0 and math.isinf(entgan[0]["edge_time_to_target_s"])
    assert [figures["edge_time_to_target_s"] for figures in entgan[1]["runs"]] == [400.0, 450.0]
    assert "'slow' edge clock" in tuned["tuning"]["selection"]


def test_the_report_summarises_each_row_over_seeds_against_the_reference() -> None:
    bench = parse_bench_config(bench_data(methods=["entgan", "flgan"], ablations=[], seeds=[0, 1, 2, 3]),
                               origin="bench.yaml")
    results = []
    for seed in range(4):
        results.append(_result("entgan", seed=seed, target=TargetHit(20.0 + seed, 10, 90.0), fid_area=100.0))
        flgan_target = TargetHit(10.0 + seed, 10, 90.0) if seed < 3 else None  # seed 3 never reaches it
        results.append(_result("flgan", seed=seed, target=flgan_target, fid_area=50.0))

    table = over_seeds(bench, results)

    time = table["flgan"]["figures"]["time_to_target_s"]
    assert time["per_seed"]["3"] == {"value": bench.time_budget_s, "censored": True}
    assert time["spread"]["censored"] == 1
    ratio = time["ratio_to_reference"]
    expected = np.exp(np.mean(np.log([10 / 20, 11 / 21, 12 / 22, bench.time_budget_s / 23])))
    assert ratio["geometric_mean"] == pytest.approx(expected) and ratio["censored"] == 1
    assert table["flgan"]["figures"]["fid_area"]["ratio_to_reference"]["geometric_mean"] == pytest.approx(0.5)
    assert table["entgan"]["figures"]["fid_area"]["ratio_to_reference"] is None
    data = report_data(bench, results, _context())
    assert data["seeds"] == [0, 1, 2, 3] and data["over_seeds"] == json.loads(json.dumps(table))
    markdown = render_markdown(bench, results, _context(), data)
    assert "## Over seeds" in markdown and "| flgan | 4 |" in markdown and "(1×≥)" in markdown


def test_bytes_until_the_target_count_the_servers_running_total_and_the_workers_reports() -> None:
    rows = [
        {"round": 1, "server/bytes_sent": 1000.0, "workers/bytes_sent": 30.0},
        {"round": 2, "server/bytes_sent": 1100.0, "workers/bytes_sent": 40.0},
        {"round": 3, "server/bytes_sent": 1200.0, "workers/bytes_sent": 50.0},
    ]
    assert bytes_sent_until(rows, 2) == 1100.0 + 30.0 + 40.0
    assert bytes_sent_until(rows, 3) == 1200.0 + 120.0

    bench = parse_bench_config(bench_data(methods=["entgan", "flgan"], ablations=[], seeds=[0]), origin="bench.yaml")
    reached = _result("entgan", target=TargetHit(20.0, 2, 90.0), bytes_to_target=1170.0)
    missed = _result("flgan", target=None, server_bytes_sent=5000.0, workers_bytes_sent=700.0)
    table = over_seeds(bench, [reached, missed])
    assert table["entgan"]["figures"]["bytes_to_target"]["per_seed"]["0"] == {"value": 1170.0, "censored": False}
    assert table["flgan"]["figures"]["bytes_to_target"]["per_seed"]["0"] == {"value": 5700.0, "censored": True}


# --- a real tuning and bench ------------------------------------------------------------------


@pytest.mark.slow
def test_tune_writes_choices_that_the_bench_then_applies(tmp_path: Path, cache_dir: Path) -> None:
    data = bench_data(methods=["entgan", "flgan"], ablations=[], seeds=[0, 1], tuned="tuned.yaml",
                      tuning={**TUNING, "seeds": [7]}, time_budget_s=1.0, eval_every_s=0.5)
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(data))

    tune = _entgan("tune", str(tmp_path / "bench.yaml"), "--write", str(tmp_path / "tuned.yaml"),
                   "--out", str(tmp_path / "tuning"), cache_dir=cache_dir)

    assert tune.returncode == 0, tune.stderr[-3000:]
    tuned = yaml.safe_load((tmp_path / "tuned.yaml").read_text())
    assert set(tuned["methods"]) == {"entgan", "flgan"}
    assert all(len(tuned["tuning"]["candidates"][method]) == 2 for method in ("entgan", "flgan"))
    bench = load_bench_config(tmp_path / "bench.yaml")
    assert bench.tuned is not None and bench.tuned.methods == tuned["methods"]
    chosen = tuned["methods"]["flgan"].get("engine.participation")
    out = tmp_path / "bench"
    run = _entgan("bench", str(tmp_path / "bench.yaml"), "--out", str(out), cache_dir=cache_dir)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert report["tuned"]["methods"] == tuned["methods"]
    assert report["over_seeds"]["flgan"]["seeds"] == [0, 1]
    config = yaml.safe_load((out / "configs" / "flgan-s1.yaml").read_text())
    assert config["seed"] == 1 and config["engine"]["participation"] == chosen
