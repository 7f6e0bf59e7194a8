"""The search space parsed once into typed dimensions: their ranges, Optuna's and Tune's forms."""

from __future__ import annotations

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from trainable.search_space import Dimension, parse_space, to_optuna_distributions

SPACE = {
    "r": {"choice": [8, 16, 64]},
    "target_modules": {"choice": ["qv", "all-linear"]},
    "lora_dropout": {"uniform": [0.0, 0.2]},
    "learning_rate": {"loguniform": [2e-5, 1e-3]},
    "lora_alpha": {"randint": [8, 33]},
}


def test_each_kind_maps_to_its_distribution() -> None:
    distributions = to_optuna_distributions(SPACE)
    assert distributions == {
        "r": CategoricalDistribution([8, 16, 64]),
        "target_modules": CategoricalDistribution(["qv", "all-linear"]),
        "lora_dropout": FloatDistribution(0.0, 0.2),
        "learning_rate": FloatDistribution(2e-5, 1e-3, log=True),
        "lora_alpha": IntDistribution(8, 32),  # randint's high is exclusive, Optuna's inclusive
    }


def test_same_distributions_as_the_searcher_uses() -> None:
    """The driver's searcher gets the space through Tune; the recorded study must agree with it."""
    from ray.tune.search.optuna import OptunaSearch

    from sweeps.space import to_tune_space

    assert to_optuna_distributions(SPACE) == OptunaSearch.convert_search_space(to_tune_space(SPACE))


def test_unknown_kind_names_the_parameter() -> None:
    with pytest.raises(ValueError, match=r"search\.space\.r: must be one of \{choice"):
        to_optuna_distributions({"r": {"normal": [0, 1]}})
    with pytest.raises(
        ValueError, match=r"search\.space\.lora_alpha\.randint: must be \[low, high\] integers"
    ):
        parse_space({"lora_alpha": {"randint": [1, 2.5]}})


def test_dimensions_know_their_range_scale_and_largest_value() -> None:
    space = parse_space({**SPACE, "use_dora": {"choice": [False, True]}})
    assert space["learning_rate"] == Dimension("learning_rate", "loguniform", (2e-5, 1e-3))
    assert [name for name, d in space.items() if d.log] == ["learning_rate"]
    assert space["lora_alpha"].bounds == (8, 32) and space["lora_alpha"].contains(32)
    assert not space["lora_alpha"].contains(33) and not space["lora_alpha"].contains(True)
    assert (
        space["r"].largest() == 64 and space["lora_dropout"].largest() == 0.2 and space["use_dora"].largest()
    )
    assert space["learning_rate"].contains(1e-3) and not space["learning_rate"].contains(1.1e-3)
    assert space["target_modules"].contains("qv") and not space["target_modules"].contains("mlp")
    assert {name: d.to_spec() for name, d in space.items()} == {
        **SPACE,
        "use_dora": {"choice": [False, True]},
    }
