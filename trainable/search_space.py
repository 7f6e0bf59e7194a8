"""The search space's format, shared by the driver (the study it records) and the report (a study it
rebuilds): each parameter a one-key mapping {kind: values}, turned into Optuna distributions here.

sweeps/space.py holds the space itself and checks it; this module only reads the format, so that the
report, which does not import the driver, converts a recorded space the same way the driver does.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

SpaceKind = Literal["choice", "uniform", "loguniform", "randint"]
KINDS: tuple[SpaceKind, ...] = get_args(SpaceKind)


def to_optuna_distributions(space: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    """{name: optuna distribution} for a checked search space (sweeps.space.check_space)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    distributions: dict[str, Any] = {}
    for name, spec in space.items():
        kind, values = next(iter(spec.items()))
        if kind == "choice":
            distributions[name] = CategoricalDistribution(list(values))
        elif kind == "uniform":
            distributions[name] = FloatDistribution(float(values[0]), float(values[1]))
        elif kind == "loguniform":
            distributions[name] = FloatDistribution(float(values[0]), float(values[1]), log=True)
        elif kind == "randint":
            # high is exclusive, as in tune.randint; Optuna's bounds are inclusive.
            distributions[name] = IntDistribution(int(values[0]), int(values[1]) - 1)
        else:
            raise ValueError(f"search.space.{name}: kind {kind!r} is not one of {', '.join(KINDS)}")
    return distributions
