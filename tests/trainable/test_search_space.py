"""The search space's one conversion into Optuna distributions."""

from __future__ import annotations

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from trainable.search_space import to_optuna_distributions

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
    with pytest.raises(ValueError, match=r"search\.space\.r: kind 'normal'"):
        to_optuna_distributions({"r": {"normal": [0, 1]}})
