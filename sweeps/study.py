"""The sweep's Optuna study in an RDB, for Optuna Dashboard and for analysis.

Tune's OptunaSearch keeps its own in-memory study, saved and restored with Tune's experiment state, so a
resumed sweep's searcher agrees with Tune about which trials exist. This callback mirrors each finished
trial into the RDB study once (keyed by Tune's trial id), so the stored study holds exactly the trials
that ran, even when the driver was killed and resumed several times.
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune import Callback

from trainable.settings import METRIC

TRIAL_KEY = "tune_trial_id"


class StudyMirror(Callback):
    def __init__(self, *, storage: str, study_name: str, space: dict[str, Any], max_steps: int) -> None:
        from ray.tune.search.optuna import OptunaSearch

        self.storage = storage
        self.study_name = study_name
        self.distributions = OptunaSearch.convert_search_space(space)
        self.max_steps = max_steps

    def study(self) -> Any:
        import optuna

        return optuna.create_study(
            storage=self.storage, study_name=self.study_name, direction="minimize", load_if_exists=True
        )

    def record(self, trial: Any, *, errored: bool) -> None:
        import optuna

        study = self.study()
        if any(t.user_attrs.get(TRIAL_KEY) == trial.trial_id for t in study.get_trials(deepcopy=False)):
            return  # already mirrored before the driver was restarted
        result = trial.last_result or {}
        value = result.get(METRIC)
        state = optuna.trial.TrialState.COMPLETE
        if errored or value is None or not math.isfinite(value):
            state, value = optuna.trial.TrialState.FAIL, None
        elif int(result.get("step", 0)) < self.max_steps:
            state = optuna.trial.TrialState.PRUNED  # stopped early by the scheduler
        params = {name: trial.config[name] for name in self.distributions if name in trial.config}
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions={name: self.distributions[name] for name in params},
                value=value if state == optuna.trial.TrialState.COMPLETE else None,
                intermediate_values={int(result.get("step", 0)): value} if value is not None else {},
                state=state,
                user_attrs={TRIAL_KEY: trial.trial_id},
            )
        )

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.record(trial, errored=False)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.record(trial, errored=True)
