"""The time-to-best replay (bench/search/replay.py) against a small synthetic table with a known best: lookups
return the recorded values, ASHA's stopped trials cost only what they ran, every method finds the best,
seeds change the order. Through Tune on 2 CPUs; a replay of a few trials takes seconds."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from analysis.experiment import RESULTS, write_summary, write_table
from bench.search.replay import (
    METHODS,
    Curve,
    Table,
    TableRow,
    load_table,
    main,
    merge_tables,
    nearest_row,
    quantile,
    ratio_interval,
    replay,
    sample_points,
    table_from_experiment,
)
from bench.search.replay import write_table as write_replay_table
from sweeps.baselines import QLORA_RECIPE
from sweeps.config import load_config
from sweeps.space import DEFAULT_SPACE, resolve_space
from tests.conftest import sweep_summary, trial_result
from trainable.schema import results_table as schema_table

REPO = Path(__file__).resolve().parents[2]
# Two parameters, four rows at the corners: each row owns a quarter of the space. QLoRA's recipe (a baseline
# the default runs first; the calibrated one's r=32 lies outside) maps to row 2, not to the best.
SPACE: dict[str, dict[str, list[Any]]] = {
    "r": {"choice": [8, 64]},
    "learning_rate": {"loguniform": [1e-4, 1e-3]},
}
POINTS = [(8, 1.5e-4), (8, 7e-4), (64, 1.5e-4), (64, 7e-4)]
CURVES = [[2.0, 1.9, 1.8, 1.7], [1.5, 1.4, 1.3, 1.2], [1.8, 1.2, 0.9, 0.7], [1.0, 0.8, 0.6, 0.5]]
BEST_ROW, BEST_LOSS = 3, 0.5  # best at every evaluation, so ASHA never stops it


def make_table() -> Table:
    rows = [
        # Every evaluation's cost differs (row i, evaluation j: 10(i+1) + j seconds) so that a sum tells
        # which evaluations were counted.
        TableRow({"r": r, "learning_rate": lr}, curve, [10.0 * (i + 1) + j for j in range(4)])
        for i, ((r, lr), curve) in enumerate(zip(POINTS, CURVES, strict=True))
    ]
    return Table(space=SPACE, rows=rows, source="synthetic", model="none", calibrated_learning_rate=5e-4)


@pytest.fixture
def table() -> Table:
    return make_table()


@pytest.fixture(scope="module")
def replayed(ray_cpus: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The replay command run once for the module: every method, seeds 0 and 1, 16 trials each."""
    folder = tmp_path_factory.mktemp("replay")
    path, out, plot = folder / "table.jsonl", folder / "replay.jsonl", folder / "replay.png"
    write_replay_table(make_table(), path)
    argv = ["replay", str(path), "--seeds", "2", "--trials", "16", "--out", str(out), "--plot", str(plot)]
    assert main(argv) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    curves = {(c["method"], c["seed"]): c for c in lines if c["kind"] == "curve"}
    return {"path": path, "lines": lines, "curves": curves, "plot": plot}


def test_nearest_row_is_the_recorded_configuration_or_the_closest(table: Table) -> None:
    for i, row in enumerate(table.rows):
        assert nearest_row(table, row.hyperparameters) == i
    assert nearest_row(table, {"r": 64, "learning_rate": 9e-4}) == BEST_ROW
    assert nearest_row(table, {"r": 8, "learning_rate": 1.1e-4}) == 0
    assert nearest_row(table, {"r": 64, "learning_rate": QLORA_RECIPE["learning_rate"]}) == 2


def test_lookup_reports_the_recorded_losses_and_costs(table: Table, replayed: dict[str, Any]) -> None:
    curve = replayed["curves"][("random", 0)]
    assert curve["evaluations"] == [4] * 16  # no scheduler: every trial runs to the end
    expected_losses = [loss for row in curve["rows"] for loss in table.rows[row].eval_loss]
    assert curve["losses"] == expected_losses
    expected_cost = [s for row in curve["rows"] for s in table.rows[row].eval_seconds]
    assert curve["gpu_seconds"] == pytest.approx(list(pd.Series(expected_cost).cumsum()))
    assert curve["best_loss"] == list(pd.Series(expected_losses).cummin())


def test_a_trial_stopped_by_asha_costs_only_the_evaluations_it_ran(
    table: Table, replayed: dict[str, Any]
) -> None:
    # The driver's ASHA over 4 evaluations: grace period 2, so its first rung is at evaluation 2.
    for seed in (0, 1):
        curve = replayed["curves"][("random+asha", seed)]
        assert 2 in curve["evaluations"], curve["evaluations"]  # some trial was stopped at the first rung
        assert set(curve["evaluations"]) <= {2, 4}
        ran = zip(curve["rows"], curve["evaluations"], strict=True)
        expected = [s for row, n in ran for s in table.rows[row].eval_seconds[:n]]
        assert curve["gpu_seconds"] == pytest.approx(list(pd.Series(expected).cumsum()))
        assert curve["gpu_seconds"][-1] < sum(sum(table.rows[row].eval_seconds) for row in curve["rows"])


@pytest.mark.parametrize("method", METHODS)
def test_every_method_finds_the_known_best(replayed: dict[str, Any], method: str) -> None:
    for seed in (0, 1):
        curve = replayed["curves"][(method, seed)]
        assert BEST_ROW in curve["rows"]
        assert curve["best_loss"][-1] == BEST_LOSS


def test_seeds_change_the_order_and_a_seed_repeats_it(table: Table, replayed: dict[str, Any]) -> None:
    curves = replayed["curves"]
    assert curves[("random", 0)]["rows"] != curves[("random", 1)]["rows"]
    assert curves[("tpe+asha", 0)]["rows"] != curves[("tpe+asha", 1)]["rows"]
    again = replay(table, method="tpe+asha", seed=0, trials=16)  # the same seed replays the same curve
    assert again.rows == curves[("tpe+asha", 0)]["rows"]
    assert again.gpu_seconds == curves[("tpe+asha", 0)]["gpu_seconds"]


@pytest.mark.parametrize("method", METHODS)
def test_the_direct_engine_replays_what_tune_replays(
    table: Table, replayed: dict[str, Any], method: str
) -> None:
    """Without Tune, the same searcher and scheduler run the same trials, stop them at the same
    evaluations and charge the same GPU-seconds, seed for seed."""
    for seed in (0, 1):
        through_tune = replayed["curves"][(method, seed)]
        direct = replay(table, method=method, seed=seed, trials=16, engine="direct")
        assert {k: v for k, v in through_tune.items() if k != "kind"} == dataclasses.asdict(direct)


def test_replay_command_writes_the_table_summaries_and_plot(table: Table, replayed: dict[str, Any]) -> None:
    assert load_table(replayed["path"]) == table
    lines = replayed["lines"]
    summaries = {line["method"]: line for line in lines if line["kind"] == "summary"}
    assert set(summaries) == set(METHODS)
    for method, summary in summaries.items():
        times = [
            Curve(**{k: v for k, v in c.items() if k != "kind"}).time_to(BEST_LOSS * 1.02)
            for (m, _), c in replayed["curves"].items()
            if m == method
        ]
        assert summary["threshold"] == pytest.approx(BEST_LOSS * 1.02)
        assert summary["reached"] == 2 and summary["median_gpu_s"] == pytest.approx(sum(times) / 2)
        assert summary["min_gpu_s"] == min(times) and summary["max_gpu_s"] == max(times)
    ratio = next(line for line in lines if line["kind"] == "ratio")
    assert ratio["median_ratio"] == pytest.approx(
        summaries["tpe+asha"]["median_gpu_s"] / summaries["random"]["median_gpu_s"]
    )
    low, high = ratio["interval_95"]
    assert low <= ratio["median_ratio"] <= high
    assert replayed["plot"].stat().st_size > 10_000


def test_table_from_an_experiment_keeps_completed_trials(tmp_path: Path) -> None:
    write_summary(tmp_path, sweep_summary({"model": {"name_or_path": "smollm2"}, "search": {"space": SPACE}}))
    rows = [
        trial_result(
            "a", 1.5, r=8, lora_alpha=16, learning_rate=1e-4, eval_history=[2.0, 1.5], gpu_seconds=40.0
        ),
        trial_result(
            "b",
            math.nan,
            status="oom",
            r=64,
            lora_alpha=16,
            learning_rate=2e-4,
            eval_history=[],
            gpu_seconds=3.0,
        ),
        trial_result(
            "c", 0.5, r=64, lora_alpha=16, learning_rate=7e-4, eval_history=[1.0, 0.5], gpu_seconds=60.0
        ),
    ]
    write_table(schema_table(rows).sort_values("trial_id"), tmp_path, RESULTS)
    table = table_from_experiment(tmp_path)
    assert [row.hyperparameters for row in table.rows] == [
        {"r": 8, "learning_rate": 1e-4},
        {"r": 64, "learning_rate": 7e-4},
    ]
    assert table.rows[1].eval_loss == [1.0, 0.5]
    assert table.rows[1].eval_seconds == [30.0, 30.0]  # the trial's time, spread over its evaluations
    assert table.best_loss == 0.5 and table.model == "smollm2"


@pytest.mark.parametrize(
    ("config_file", "seed", "calibrated_lr"),
    [("table.yaml", 0, 2e-4), ("table-b.yaml", 1, 2e-4), ("table-c.yaml", 2, 1.32e-3)],
)
def test_the_recording_configs_hold_seeded_samples_of_the_default_space(
    config_file: str, seed: int, calibrated_lr: float
) -> None:
    """table.yaml and table-b.yaml recorded the default space of their time (learning rates 2e-5 to 2e-3, the
    range centred on 2e-4); table-c.yaml the default space centred on SmolLM2-135M's calibrated rate."""
    config = load_config(str(REPO / "bench/search" / config_file))
    space = resolve_space(DEFAULT_SPACE, calibrated_lr)[0]
    assert resolve_space(config.search.space, calibrated_lr)[0] == space
    assert config.search.scheduler == "none"
    points = config.search.initial_points
    assert config.search.num_samples == len(points) + len(config.search.baselines)
    # Regenerate with `python -m bench.search.replay points --trials 32 --seed N` when the default space changes.
    assert points == sample_points(space, len(points), seed=seed)


def test_points_command_prints_the_seeded_sample_as_a_configs_initial_points(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """What a recording config's initial_points are pasted from."""
    assert main(["points", "--trials", "4", "--seed", "3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == {"initial_points": sample_points(resolve_space(DEFAULT_SPACE, 1.32e-3)[0], 4, seed=3)}
    assert len({json.dumps(point, sort_keys=True) for point in printed["initial_points"]}) == 4


def test_the_two_recording_configs_differ_only_in_their_points_and_name() -> None:
    """The halves of one table must be recorded alike, or their rows' losses and GPU-seconds differ for
    reasons other than the configuration."""
    first, second = (
        load_config(str(REPO / "bench/search" / name)) for name in ("table.yaml", "table-b.yaml")
    )
    assert first.model == second.model and first.data == second.data and first.train == second.train
    assert not set(map(str, first.search.initial_points)) & set(map(str, second.search.initial_points))
    assert dataclasses.replace(
        second.search, initial_points=first.search.initial_points, reuse_workers=True
    ) == (dataclasses.replace(first.search, reuse_workers=True))


def test_merged_tables_keep_every_row_and_refuse_another_space(tmp_path: Path) -> None:
    table = make_table()
    merged = merge_tables([table, dataclasses.replace(table, source="b")])
    assert merged.rows == table.rows + table.rows and merged.space == table.space
    with pytest.raises(ValueError, match="space differs"):
        merge_tables([table, dataclasses.replace(table, space={"r": {"choice": [8]}}, source="b")])
    short = [
        dataclasses.replace(row, eval_loss=row.eval_loss[:1], eval_seconds=row.eval_seconds[:1])
        for row in table.rows
    ]
    with pytest.raises(ValueError, match="same number"):
        merge_tables([table, dataclasses.replace(table, rows=short, source="b")])
    # The command takes tables written earlier as well as experiment folders.
    write_replay_table(table, tmp_path / "a.jsonl")
    assert (
        main(
            [
                "table",
                str(tmp_path / "a.jsonl"),
                str(tmp_path / "a.jsonl"),
                "--out",
                str(tmp_path / "ab.jsonl"),
            ]
        )
        == 0
    )
    assert load_table(tmp_path / "ab.jsonl").rows == table.rows + table.rows


def test_quartiles_count_a_seed_that_never_got_there_as_slowest() -> None:
    assert quantile([4.0, 1.0, 3.0, 2.0], 0.25) == pytest.approx(1.75)  # numpy's default interpolation
    assert quantile([1.0, 2.0, 3.0, math.inf], 0.5) == 2.5
    assert quantile([1.0, 2.0, 3.0, math.inf], 0.75) == math.inf
    assert quantile([1.0, math.inf, math.inf], 0.5) == math.inf


def test_ratio_interval_brackets_the_ratio_of_medians_and_is_seeded() -> None:
    assert ratio_interval([1.0] * 5, [2.0] * 5) == (0.5, 0.5)
    times, baseline = [10.0, 12.0, 20.0, 30.0, math.inf], [15.0, 30.0, 40.0, 60.0, 90.0]
    low, high = ratio_interval(times, baseline)
    assert low < 20.0 / 40.0 < high
    assert ratio_interval(times, baseline) == (low, high)
    # A method that never reaches the band is infinitely slow, not left out.
    assert ratio_interval([math.inf] * 3, [1.0, 2.0, 3.0]) == (math.inf, math.inf)


def test_replay_command_replays_a_variant_on_later_seeds(ray_cpus: None, tmp_path: Path) -> None:
    """--search overrides the driver's search settings for the replay (here ASHA's grace period, so that
    trials are stopped at the first evaluation, which the default never does), --first-seed moves the
    seeds, and the header records what ran."""
    path, out = tmp_path / "table.jsonl", tmp_path / "replay.jsonl"
    write_replay_table(make_table(), path)
    argv = [
        "replay",
        str(path),
        "--methods",
        "tpe+asha",
        "--seeds",
        "2",
        "--first-seed",
        "7",
        "--trials",
        "8",
    ]
    assert main([*argv, "--out", str(out), "--search", "grace_period=1", "startup_trials=2"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    header, curves = lines[0], [line for line in lines if line["kind"] == "curve"]
    assert header["seeds"] == [7, 8] and [c["seed"] for c in curves] == [7, 8]
    assert header["search"]["grace_period"] == 1 and header["search"]["startup_trials"] == 2
    assert any(1 in c["evaluations"] for c in curves)
    again = replay(
        make_table(), method="tpe+asha", seed=7, trials=8, settings={"grace_period": 1, "startup_trials": 2}
    )
    assert again.rows == curves[0]["rows"] and again.evaluations == curves[0]["evaluations"]
    direct = out.with_name("direct.jsonl")
    assert (
        main(
            [
                *argv,
                "--out",
                str(direct),
                "--search",
                "grace_period=1",
                "startup_trials=2",
                "--engine",
                "direct",
            ]
        )
        == 0
    )
    direct_lines = [json.loads(line) for line in direct.read_text().splitlines()]
    assert direct_lines[0]["engine"] == "direct" and header["engine"] == "tune"
    assert direct_lines[1:] == lines[1:]  # the same curves, summaries and ratio
    # A wider band: the summary's threshold and times are measured against it.
    assert main([*argv, "--out", str(direct), "--engine", "direct", "--band", "0.5"]) == 0
    wide = [json.loads(line) for line in direct.read_text().splitlines()]
    (summary,) = [line for line in wide if line["kind"] == "summary"]
    wide_curves = [Curve(**{k: v for k, v in c.items() if k != "kind"}) for c in wide if c["kind"] == "curve"]
    assert wide[0]["band"] == 0.5 and summary["threshold"] == pytest.approx(BEST_LOSS * 1.5)
    assert summary["median_gpu_s"] == pytest.approx(sum(c.time_to(BEST_LOSS * 1.5) for c in wide_curves) / 2)
    with pytest.raises(SystemExit, match="grace_period"):
        main([*argv, "--out", str(out), "--search", "grace=1"])
