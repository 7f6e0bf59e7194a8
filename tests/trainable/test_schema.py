"""results.parquet's row and sweep.json as types (trainable.schema): what the driver writes is what the
report reads back, and a table that lacks what the report needs is refused by name."""

from __future__ import annotations

import dataclasses
import math

import pandas as pd
import pytest

from tests.conftest import sweep_summary, trial_result
from trainable.outcome import TrialReport
from trainable.schema import SweepSummary, check_results, describe_cost, is_usable, results_table, usable
from trainable.settings import HYPERPARAMETERS


def test_a_row_has_a_column_for_every_report_field_and_hyperparameter() -> None:
    """A figure added to TrialReport, or a hyperparameter added to Hyperparameters, reaches results.parquet
    with no other edit."""
    row = trial_result("a", r=64, last=TrialReport(step=7, tokens=123, peak_memory_gib=1.5)).to_row()
    assert set(dataclasses.asdict(TrialReport())) <= set(row) and set(HYPERPARAMETERS) <= set(row)
    assert row["r"] == 64 and row["step"] == 7 and row["tokens"] == 123 and row["peak_memory_gib"] == 1.5
    assert list(row)[:2] == ["rank", "trial_id"] and not {"hparams", "last"} & set(row)


def test_the_table_ranks_usable_trials_first_then_by_best_eval_loss() -> None:
    rows = [
        trial_result("slow", 0.9),
        trial_result("crashed", 0.1, status="error"),
        trial_result("none", math.nan),
        trial_result("best", 0.5),
        trial_result("stopped", 0.7, status="stopped"),
    ]
    table = results_table(rows)
    assert list(table["trial_id"]) == ["best", "stopped", "slow", "crashed", "none"]
    assert list(table["rank"]) == [1, 2, 3, 4, 5]
    assert list(usable(table)) == [True, True, True, False, False]
    assert is_usable("stopped", 0.7) and not is_usable("oom", 0.1) and not is_usable("completed", math.inf)


def test_a_table_read_back_is_checked_and_filled() -> None:
    table = results_table([trial_result("a")])
    with pytest.raises(ValueError, match=r"^exp/results\.parquet: no column origin, best_eval_loss; "):
        check_results(table.drop(columns=["origin", "best_eval_loss"]), source="exp/results.parquet")
    # Written before these columns existed: each filled with its default; the old name `steps` read as `step`.
    older = table.drop(columns=["use_dora", "base_copied", "step"]).assign(steps=9)
    read = check_results(older, source="x")
    assert not read["use_dora"].iloc[0] and not read["base_copied"].iloc[0] and read["step"].iloc[0] == 9


def test_sweep_json_round_trips_and_names_what_it_lacks() -> None:
    summary = sweep_summary({"train": {"eval_every": 5}}, base_eval_loss=2.5)
    assert SweepSummary.from_json(summary.to_json(), source="s") == summary
    assert summary.section("train") == {"eval_every": 5} and summary.section("report") == {}
    older = {k: v for k, v in summary.to_json().items() if k != "base_eval_loss"}  # before it was measured
    assert SweepSummary.from_json(older, source="s").base_eval_loss is None
    with pytest.raises(ValueError, match=r"^exp/sweep\.json: no fingerprint, environment; "):
        SweepSummary.from_json(
            {k: v for k, v in older.items() if k not in ("fingerprint", "environment")},
            source="exp/sweep.json",
        )


def test_the_cost_in_words() -> None:
    gpu = results_table(
        [
            trial_result("a", gpu_seconds=1800.0, wall_time_s=3600.0, last=TrialReport(gpu_share=0.5)),
            trial_result(
                "b", gpu_seconds=1800.0, wall_time_s=3600.0, cost_usd=2.0, last=TrialReport(gpu_share=0.5)
            ),
        ]
    )
    assert describe_cost(gpu) == "1 GPU-hours over 2 trial-hours, $2.00"
    cpu = results_table([trial_result("a", wall_time_s=1800.0)])
    assert describe_cost(cpu) == "CPU trials: 0 GPU-hours, 0.5 trial-hours"
    assert isinstance(cpu, pd.DataFrame)
