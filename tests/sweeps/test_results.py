"""The results table's origin column: which trials were the baselines, which the user's, which the searcher's."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest

from sweeps.baselines import QLORA_RECIPE, claim_points
from sweeps.config import load_config
from sweeps.results import collect_results
from trainable.outcome import METRIC, MODE, TrialReport

RECIPE = {"r": 64, "lora_alpha": 16}
USER = {"r": 8, "lora_alpha": 32}


def test_each_point_belongs_to_the_first_trial_holding_it() -> None:
    configs = [
        {**RECIPE, "learning_rate": 1e-4},  # a point may fix some parameters; the searcher fills the rest
        {**USER, "learning_rate": 3e-4},
        {**RECIPE, "learning_rate": 1e-4},  # the searcher suggested the recipe again: its own trial
        {"r": 8, "lora_alpha": 16, "learning_rate": 1e-4},
    ]
    assert claim_points(configs, [RECIPE, USER]) == [0, 1, None, None]


def test_a_users_point_equal_to_the_recipe_is_still_the_users() -> None:
    assert claim_points([RECIPE, RECIPE, USER], [RECIPE, dict(RECIPE)]) == [0, 1, None]


def test_values_must_match_exactly() -> None:
    assert claim_points([{"r": 64, "lora_alpha": 17}], [RECIPE]) == [None]


def report_trial(config: dict[str, Any]) -> None:
    """A stand-in for train_trial: one report with a checkpoint, its loss a function of the config."""
    from ray import tune

    checkpoint = tempfile.mkdtemp()
    Path(checkpoint, "adapter_config.json").write_text("{}")
    loss = config["learning_rate"] * 1000 + config["r"] / 100
    report = TrialReport(eval_loss=loss, step=4, tokens=128, retries=0, base_eval_loss=2.5)
    tune.report(report.to_tune(), checkpoint=tune.Checkpoint.from_directory(checkpoint))


@pytest.mark.usefixtures("ray_cpus")
def test_results_table_through_tune(tmp_path: Path) -> None:
    import sys

    from ray import cloudpickle, tune
    from ray.tune.search.optuna import OptunaSearch

    from sweeps.space import to_tune_space

    # Tests are not an installed package: send this module's trainable to the workers by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])

    user = {"r": 8, "lora_alpha": 32, "learning_rate": 1e-4}
    config = load_config(
        "local",
        [
            "search.num_samples=5",
            "search.baselines=[qlora]",
            f"search.initial_points=[{user}]",
            "search.space={r: {choice: [8, 16, 64]}, lora_alpha: {choice: [16, 32]}, "
            "learning_rate: {loguniform: [1.0e-5, 1.0e-3]}}",
            "train.max_steps=4",
            "train.eval_every=2",
        ],
    )
    points = config.starting_points(None)
    assert [p.origin for p in points] == ["baseline", "initial"]  # the recipe, then the user's point
    grid = tune.Tuner(
        report_trial,
        param_space=to_tune_space(config.search.space),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=OptunaSearch(points_to_evaluate=[p.values for p in points], seed=0),
            num_samples=config.search.num_samples,
            max_concurrent_trials=2,
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="origins"),
    ).fit()
    table = collect_results(grid, config, points)

    assert sorted(table["origin"]) == ["baseline", "initial", "search", "search", "search"]
    recipe = table[table["origin"] == "baseline"].iloc[0]
    assert recipe["baseline"] == "qlora" and set(table.loc[table["origin"] != "baseline", "baseline"]) == {""}
    assert {k: recipe[k] for k in ("r", "lora_alpha", "learning_rate")} == {
        k: QLORA_RECIPE[k] for k in ("r", "lora_alpha", "learning_rate")
    }
    initial = table[table["origin"] == "initial"].iloc[0]
    assert {k: initial[k] for k in user} == user
    # The rest of the row comes from the trial's report, read back through TrialReport.from_tune.
    assert set(table["status"]) == {"completed"} and set(table["step"]) == {4}
    assert set(table["base_eval_loss"]) == {2.5} and set(table["tokens"]) == {128}
    assert table.iloc[0]["best_eval_loss"] == table["best_eval_loss"].min()
    assert table["adapter_path"].notna().all()
