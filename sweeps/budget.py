"""The sweep's cost: GPU-seconds per trial, and `search.budget_gpu_hours`, which stops launching trials
once the trials have used it up.

A trial costs its wall time times the GPUs it held (1 / search.trials_per_gpu). A CPU trial holds no GPU
(0 GPU-seconds in results.parquet), but so that a budget can be rehearsed on CPUs, the budget counts a
CPU trial's wall-seconds as if it held one GPU.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ray.tune.result import TIME_TOTAL_S
from ray.tune.search import Searcher

if TYPE_CHECKING:
    import pandas as pd

SECONDS_PER_HOUR = 3600


def gpu_seconds(wall_time_s: float, gpu_share: float) -> float:
    return wall_time_s * gpu_share


def budget_seconds(table: pd.DataFrame) -> pd.Series:
    """What each trial of a results table counts against search.budget_gpu_hours: its GPU-seconds, or for a
    CPU trial its wall-seconds (the module docstring says why)."""
    rate = table["gpu_share"].where(table["gpu_share"] > 0, 1.0)
    return (table["wall_time_s"].fillna(0.0) * rate).fillna(0.0)


def dollars(gpu_seconds: float, price_per_gpu_hour: float | None) -> float:
    """NaN without a price."""
    return math.nan if price_per_gpu_hour is None else gpu_seconds / SECONDS_PER_HOUR * price_per_gpu_hour


class BudgetSearcher(Searcher):
    """Wraps the sweep's searcher: once the trials' GPU-seconds (the finished trials' and the running
    ones' so far) reach the budget, it suggests no more trials (Searcher.FINISHED), so Tune launches
    nothing new, lets the running trials finish and ends the sweep normally. Running trials may take the
    sweep past the budget by what they still have to do."""

    def __init__(self, searcher: Searcher, *, budget_gpu_hours: float, gpu_share: float) -> None:
        self.searcher = searcher
        self.budget_s = budget_gpu_hours * SECONDS_PER_HOUR
        self.rate = gpu_share or 1.0  # CPU trials count their wall-seconds (module docstring)
        self.seconds: dict[str, float] = {}  # trial id -> wall-seconds reported so far
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    @property
    def spent_s(self) -> float:
        return sum(self.seconds.values()) * self.rate

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        done: bool = self.searcher.set_search_properties(metric, mode, config, **spec)
        self._metric, self._mode = self.searcher.metric, self.searcher.mode
        return done

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return bool(self.searcher.set_max_concurrency(max_concurrent))

    def suggest(self, trial_id: str) -> dict | None:
        if self.spent_s >= self.budget_s:
            print(
                f"budget: {self.spent_s / SECONDS_PER_HOUR:.4g} of {self.budget_s / SECONDS_PER_HOUR:.4g} "
                "GPU-hours spent; no new trials",
                flush=True,
            )
            return Searcher.FINISHED  # type: ignore[return-value]  # Ray types suggest() without its str sentinel
        suggestion: dict | None = self.searcher.suggest(trial_id)
        return suggestion

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._count(trial_id, result)
        self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self._count(trial_id, result)
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def add_evaluated_point(self, *args: Any, **kwargs: Any) -> None:
        self.searcher.add_evaluated_point(*args, **kwargs)

    def _count(self, trial_id: str, result: dict | None) -> None:
        if result and TIME_TOTAL_S in result:
            self.seconds[trial_id] = float(result[TIME_TOTAL_S])

    # Tune saves a wrapper's state (the seconds counted) beside the wrapped searcher's own checkpoint and
    # restores both on --resume (ray.tune.search.SearchGenerator.save_to_dir).
    def get_state(self) -> dict:
        return {"seconds": dict(self.seconds)}

    def set_state(self, state: dict) -> None:
        self.seconds = dict(state["seconds"])
