"""The scale benchmark at a tiny size: a sweep of 8 report-only trials through the real driver on a
two-node cluster (the head, and one worker node of four fake GPUs), with every figure recorded and every
trial ended."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.scale import simulate


def test_a_tiny_sweep_records_every_figure_and_every_trial_ends(tmp_path: Path) -> None:
    out = tmp_path / "scale.jsonl"
    argv = ["--trials", "8", "--repeats", "1", "--nodes", "1", "--gpus-per-node", "4", "--out", str(out)]
    assert simulate.main(argv) == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["trials"] == record["trials_in_table"] == 8 and record["all_ended"]
    # ASHA stopped some trials at its first rung (2 of 4 evaluations) and let the others finish.
    assert set(record["statuses"]) == {"completed", "stopped"}
    assert sum(record["statuses"].values()) == 8
    # Every step of the driver was timed, and the steps fit inside the sweep's wall time.
    for name in ("setup_s", "fit_s", "searcher_s", "mirror_s", "collect_s", "write_s", "driver_cpu_s"):
        assert record[name] > 0, name
    assert record["setup_s"] + record["fit_s"] + record["collect_s"] + record["write_s"] <= record["wall_s"]
    assert record["searcher_s"] + record["mirror_s"] < record["fit_s"]  # both run inside Tune's loop
    assert 0 < record["driver_rss_start_mib"] <= record["driver_rss_peak_mib"]
    summary = [json.loads(line) for line in (tmp_path / "scale-summary.jsonl").read_text().splitlines()]
    assert [row["trials"] for row in summary] == [8] and summary[0]["wall_s"]["median"] == record["wall_s"]


def test_the_trial_reports_a_loss_that_falls_and_is_lowest_at_the_best_learning_rate() -> None:
    best = {"learning_rate": simulate.BEST_LEARNING_RATE, "r": 16}
    worse = {**best, "learning_rate": simulate.BEST_LEARNING_RATE * 10}
    assert simulate.simulated_loss(best, 1.0) < simulate.simulated_loss(best, 0.5) < simulate.BASE_EVAL_LOSS
    assert simulate.simulated_loss(best, 1.0) < simulate.simulated_loss(worse, 1.0)


def test_summary_gives_median_and_range_and_growth_per_trial() -> None:
    def record(trials: int, wall_s: float, rss: float) -> dict[str, float]:
        zeros = dict.fromkeys(simulate.FIGURES, 0.0)
        return {**zeros, "trials": trials, "all_ended": True, "wall_s": wall_s, "driver_rss_peak_mib": rss}

    records = [record(10, 9, 600), record(10, 10, 600), record(10, 14, 600), record(100, 200, 690)]
    small, large = simulate.summarize(records)
    assert small["wall_s"] == {"median": 10, "min": 9, "max": 14} and small["repeats"] == 3
    assert "per_trial_vs_smallest" not in small
    # 1 s per trial at 10 trials, 2 s at 100: twice the time per trial; figures that are 0 have no ratio.
    assert large["per_trial_vs_smallest"] == {"wall_s": 2.0, "driver_rss_peak_mib": pytest.approx(0.115)}
    assert large["rss_mib_per_extra_trial"] == 1.0  # 90 MiB more for 90 more trials
