"""The time-to-best replay (bench/replay.py) against a small synthetic table with a known best: lookups
return the recorded values, ASHA's stopped trials cost only what they ran, every method finds the best,
seeds change the order. Through Tune on 2 CPUs; a replay of a few trials takes seconds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from analysis.experiment import RESULTS, write_summary, write_table
from bench.replay import (
    METHODS,
    Table,
    TableRow,
    load_table,
    main,
    nearest_row,
    replay,
    sample_points,
    table_from_experiment,
)
from sweeps.config import load_config
from sweeps.space import DEFAULT_SPACE, QLORA_RECIPE

REPO = Path(__file__).resolve().parents[2]
# Two parameters, four rows at the corners: each row owns a quarter of the space. QLoRA's recipe
# (r=64, lr 2e-4), which the TPE methods try first, lies in it and maps to row 2, not to the best.
SPACE = {"r": {"choice": [8, 64]}, "learning_rate": {"loguniform": [1e-4, 1e-3]}}
POINTS = [(8, 1.5e-4), (8, 7e-4), (64, 1.5e-4), (64, 7e-4)]
CURVES = [[2.0, 1.9, 1.8, 1.7], [1.5, 1.4, 1.3, 1.2], [1.8, 1.2, 0.9, 0.7], [1.0, 0.8, 0.6, 0.5]]
BEST_ROW, BEST_LOSS = 3, 0.5  # best at every evaluation, so ASHA never stops it


@pytest.fixture
def table() -> Table:
    rows = [
        # Every evaluation's cost differs (row i, evaluation j: 10(i+1) + j seconds) so that a sum tells
        # which evaluations were counted.
        TableRow({"r": r, "learning_rate": lr}, curve, [10.0 * (i + 1) + j for j in range(4)])
        for i, ((r, lr), curve) in enumerate(zip(POINTS, CURVES, strict=True))
    ]
    return Table(space=SPACE, rows=rows, source="synthetic", model="none")


def test_nearest_row_is_the_recorded_configuration_or_the_closest(table: Table) -> None:
    for i, row in enumerate(table.rows):
        assert nearest_row(table, row.hyperparameters) == i
    assert nearest_row(table, {"r": 64, "learning_rate": 9e-4}) == BEST_ROW
    assert nearest_row(table, {"r": 8, "learning_rate": 1.1e-4}) == 0
    assert nearest_row(table, {"r": 64, "learning_rate": QLORA_RECIPE["learning_rate"]}) == 2


def test_lookup_reports_the_recorded_losses_and_costs(table: Table, ray_cpus: None) -> None:
    curve = replay(table, method="random", seed=0, trials=5)
    assert curve.evaluations == [4] * 5  # no scheduler: every trial runs to the end
    expected_losses = [loss for row in curve.rows for loss in table.rows[row].eval_loss]
    assert curve.losses == expected_losses
    expected_cost = [s for row in curve.rows for s in table.rows[row].eval_seconds]
    assert curve.gpu_seconds == pytest.approx(list(pd.Series(expected_cost).cumsum()))
    assert curve.best_loss == list(pd.Series(expected_losses).cummin())


def test_a_trial_stopped_by_asha_costs_only_the_evaluations_it_ran(table: Table, ray_cpus: None) -> None:
    # Grace 1, factor 2: a trial worse than the median at its first evaluation stops after it.
    curve = replay(table, method="random+asha", seed=0, trials=10, grace_period=1, reduction_factor=2)
    assert 1 in curve.evaluations, curve.evaluations  # some trial was stopped at rung 1
    assert min(curve.evaluations) < max(curve.evaluations) == 4
    expected = [
        s for row, ran in zip(curve.rows, curve.evaluations, strict=True) for s in table.rows[row].eval_seconds[:ran]
    ]
    assert curve.gpu_seconds == pytest.approx(list(pd.Series(expected).cumsum()))
    full = sum(sum(table.rows[row].eval_seconds) for row in curve.rows)
    assert curve.gpu_seconds[-1] < full


@pytest.mark.parametrize("method", METHODS)
def test_every_method_finds_the_known_best(table: Table, ray_cpus: None, method: str) -> None:
    curve = replay(table, method=method, seed=0, trials=16)  # type: ignore[arg-type]
    assert BEST_ROW in curve.rows
    assert curve.best_loss[-1] == BEST_LOSS
    assert math.isfinite(curve.time_to(BEST_LOSS * 1.02))


def test_seeds_change_the_order_and_a_seed_repeats_it(table: Table, ray_cpus: None) -> None:
    first = replay(table, method="random", seed=0, trials=8)
    again = replay(table, method="random", seed=0, trials=8)
    other = replay(table, method="random", seed=1, trials=8)
    assert first.rows == again.rows
    assert first.rows != other.rows


def test_replay_command_writes_curves_summary_and_plot(table: Table, ray_cpus: None, tmp_path: Path) -> None:
    from bench.replay import write_table as write_replay_table

    path = tmp_path / "table.jsonl"
    write_replay_table(table, path)
    assert load_table(path) == table
    out, plot = tmp_path / "replay.jsonl", tmp_path / "replay.png"
    argv = ["replay", str(path), "--methods", "tpe+asha", "random", "--seeds", "2", "--trials", "6"]
    assert main([*argv, "--out", str(out), "--plot", str(plot)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    curves = [line for line in lines if line["kind"] == "curve"]
    assert sorted((c["method"], c["seed"]) for c in curves) == [("random", 0), ("random", 1), ("tpe+asha", 0), ("tpe+asha", 1)]
    summaries = {line["method"]: line for line in lines if line["kind"] == "summary"}
    assert summaries["random"]["threshold"] == pytest.approx(BEST_LOSS * 1.02)
    assert summaries["random"]["seeds"] == 2
    ratio = next(line for line in lines if line["kind"] == "ratio")
    if summaries["random"]["median_gpu_s"] and summaries["tpe+asha"]["median_gpu_s"]:
        assert ratio["median_ratio"] == pytest.approx(
            summaries["tpe+asha"]["median_gpu_s"] / summaries["random"]["median_gpu_s"]
        )
    assert plot.stat().st_size > 10_000


def test_table_from_an_experiment_keeps_completed_trials(tmp_path: Path) -> None:
    write_summary(tmp_path, {"config": {"model": {"name_or_path": "smollm2"}, "search": {"space": SPACE}}})
    results = pd.DataFrame(
        {
            "status": ["completed", "oom", "completed"],
            "r": [8, 64, 64],
            "lora_alpha": [16, 16, 16],
            "learning_rate": [1e-4, 2e-4, 7e-4],
            "eval_history": [[2.0, 1.5], [], [1.0, 0.5]],
            "wall_time_s": [40.0, 3.0, 60.0],
        }
    )
    write_table(results, tmp_path, RESULTS)
    table = table_from_experiment(tmp_path)
    assert [row.hyperparameters for row in table.rows] == [
        {"r": 8, "learning_rate": 1e-4},
        {"r": 64, "learning_rate": 7e-4},
    ]
    assert table.rows[1].eval_loss == [1.0, 0.5]
    assert table.rows[1].eval_seconds == [30.0, 30.0]  # the trial's time, spread over its evaluations
    assert table.best_loss == 0.5 and table.model == "smollm2"


def test_the_recording_config_holds_the_seeded_sample_of_the_default_space() -> None:
    config = load_config(str(REPO / "bench/gpu/table.yaml"))
    assert config.search.space == DEFAULT_SPACE
    assert config.search.scheduler == "none"
    assert config.search.num_samples == len(config.search.initial_points)
    # Regenerate with `python -m bench.replay points --trials 32 --seed 0` when the default space changes.
    assert config.search.initial_points == sample_points(DEFAULT_SPACE, config.search.num_samples, seed=0)
