"""The search space's format, parsed once into typed dimensions that everything reads: the driver's checks
and searcher (sweeps.space, sweeps.search), the memory check (sweeps.resources), the report's study and
plots (analysis.importance, analysis.plots) and the time-to-best replay.

A sweep's YAML gives each searched hyperparameter as a one-key mapping, {kind: values}:

    learning_rate: {loguniform: [2.0e-5, 2.0e-3]}    # uniform and loguniform: [low, high]
    r: {choice: [8, 16, 32, 64]}
    warmup: {randint: [0, 10]}                      # high exclusive, as in tune.randint

This module lives beside the trial's settings, not in the driver, so that the report (which does not import
the driver) reads a recorded space the same way.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal, get_args

SpaceKind = Literal["choice", "uniform", "loguniform", "randint"]
KINDS: tuple[SpaceKind, ...] = get_args(SpaceKind)


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One searched hyperparameter: a choice among values, or a range (uniform, log-uniform, integers)."""

    name: str
    kind: SpaceKind
    values: tuple[Any, ...]  # choice: the choices; the others: (low, high), randint's high exclusive

    @property
    def log(self) -> bool:
        """Sampled (and drawn) on a log scale."""
        return self.kind == "loguniform"

    @property
    def bounds(self) -> tuple[float, float]:
        """The inclusive range of a numeric dimension (randint's high less one); choice: its min and max."""
        if self.kind == "choice":
            return min(self.values), max(self.values)
        low, high = self.values
        return (low, high - 1) if self.kind == "randint" else (low, high)

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in self.values
        if not isinstance(value, int | float) or isinstance(value, bool):
            return False
        low, high = self.bounds
        return low <= value <= high

    def largest(self) -> Any:
        """The largest value the dimension allows (booleans: True), for the memory check."""
        return self.bounds[1]

    def to_spec(self) -> dict[str, list[Any]]:
        """Back to the YAML form."""
        return {self.kind: list(self.values)}

    def to_optuna(self) -> Any:
        """The Optuna distribution (the study the driver records and the report rebuilds)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "choice":
            return CategoricalDistribution(list(self.values))
        if self.kind == "randint":
            low, high = self.bounds
            return IntDistribution(int(low), int(high))
        return FloatDistribution(float(self.values[0]), float(self.values[1]), log=self.log)

    def to_tune(self) -> Any:
        """The Ray Tune domain, which OptunaSearch turns into the same distribution as to_optuna."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.values))
        maker = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[self.kind]
        return maker(*self.values)


def parse_dimension(name: str, spec: Any) -> Dimension | str:
    """`spec` ({kind: values}) as a Dimension, or why it is not one (the problem, naming the key)."""
    key = f"search.space.{name}"
    if not isinstance(spec, Mapping) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        return f"{key}: must be one of {{choice: [...]}}, {{uniform|loguniform|randint: [low, high]}}; got {spec!r}"
    [(kind, values)] = spec.items()
    if not isinstance(values, list | tuple) or not values:
        return f"{key}.{kind}: must be a non-empty list, got {values!r}"
    if kind != "choice":
        numbers = len(values) == 2 and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in values
        )
        if not numbers or values[0] >= values[1] or not all(math.isfinite(v) for v in values):
            return f"{key}.{kind}: must be [low, high] numbers with low < high, got {values!r}"
        if kind == "loguniform" and values[0] <= 0:
            return f"{key}.loguniform: low must be > 0, got {values[0]}"
        if kind == "randint" and not all(isinstance(v, int) for v in values):
            return f"{key}.randint: must be [low, high] integers, got {values!r}"
    return Dimension(name=name, kind=kind, values=tuple(values))


def parse_space(space: Mapping[str, Any]) -> dict[str, Dimension]:
    """A space checked by sweeps.space.check_space (or recorded in sweep.json) as {name: Dimension}.
    Raises ValueError on a malformed entry."""
    dimensions = {}
    for name, spec in space.items():
        parsed = parse_dimension(name, spec)
        if isinstance(parsed, str):
            raise ValueError(parsed)
        dimensions[name] = parsed
    return dimensions


def to_optuna_distributions(space: Mapping[str, Any]) -> dict[str, Any]:
    """{name: optuna distribution} for a space."""
    return {name: dimension.to_optuna() for name, dimension in parse_space(space).items()}
