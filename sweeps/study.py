"""The sweep's Optuna study in an RDB, for Optuna Dashboard and for analysis.

Tune's OptunaSearch keeps its own in-memory study, saved and restored with Tune's experiment state, so a
resumed sweep's searcher agrees with Tune about which trials exist. This callback mirrors each finished
trial into the RDB study once (keyed by Tune's trial id), so the stored study holds exactly the trials
that ran, even when the driver was killed and resumed several times.

SQLite needs a local disk: with remote storage the study lives in the driver's cache (sweeps.plan.study_file) and a
copy is put into the experiment each time a trial is recorded, so that a driver resumed on another machine
(or after the cache was lost) starts from the study as it was.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ray.tune import Callback

from trainable.outcome import DIRECTION, METRIC, Status, TrialReport, trial_status
from trainable.search_space import to_optuna_distributions

TRIAL_KEY = "tune_trial_id"


class StudyMirror(Callback):
    def __init__(
        self,
        *,
        storage: str,
        study_name: str,
        space: dict[str, dict[str, list[Any]]],
        max_steps: int,
        keep_with: str | None = None,
    ) -> None:
        """`keep_with`: the experiment's URI, to put a copy of the SQLite `storage` into after each trial."""
        if keep_with is not None and not storage.startswith("sqlite:///"):
            raise ValueError(f"StudyMirror: keep_with needs a SQLite storage, got {storage!r}")
        self.storage = storage
        self.keep_with = keep_with
        self.study_name = study_name
        self.distributions = to_optuna_distributions(space)
        self.max_steps = max_steps
        self._study: Any = None  # optuna.Study, opened at the first record
        self._mirrored: set[str] = set()  # Tune's ids of the trials the study holds

    def study(self) -> Any:
        """The RDB study, opened once per driver, with the Tune trial ids it holds read once. Opened and read
        back at every record, each record cost more as the study grew (0.52 s at a sweep's start, 1.40 s
        after 300 trials: python -m bench.scale.simulate on a loaded 2-core machine, docs/cost.md)."""
        import optuna

        if self._study is None:
            self._study = optuna.create_study(
                storage=self.storage, study_name=self.study_name, direction=DIRECTION, load_if_exists=True
            )
            self._mirrored = {t.user_attrs.get(TRIAL_KEY) for t in self._study.get_trials(deepcopy=False)}
        return self._study

    def record(self, trial: Any, *, errored: bool) -> None:
        import optuna

        study = self.study()
        if trial.trial_id in self._mirrored:
            return  # already mirrored before the driver was restarted
        last = TrialReport.from_tune(trial.last_result or {})
        # A trial's value is the best eval loss it reported, what results.parquet and the report rank by
        # (its adapter is the best checkpoint's): the lowest of every result Tune got of it, which Tune
        # keeps with the trial, across a resumed driver too.
        best = float(trial.metric_analysis.get(METRIC, {}).get("min", math.nan))
        status = trial_status(last, errored=errored, best_eval_loss=best, max_steps=self.max_steps)
        states: dict[Status, optuna.trial.TrialState] = {
            "completed": optuna.trial.TrialState.COMPLETE,
            "stopped": optuna.trial.TrialState.PRUNED,  # stopped early by the scheduler
        }
        state = states.get(status, optuna.trial.TrialState.FAIL)
        # Where it stood when it ended: all that a pruned trial has, as Optuna gives it no value.
        ended_at = {} if state == optuna.trial.TrialState.FAIL else {last.step: last.eval_loss}
        params = {name: trial.config[name] for name in self.distributions if name in trial.config}
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions={name: self.distributions[name] for name in params},
                value=best if state == optuna.trial.TrialState.COMPLETE else None,
                intermediate_values=ended_at,
                state=state,
                user_attrs={TRIAL_KEY: trial.trial_id},
            )
        )
        self._mirrored.add(trial.trial_id)
        if self.keep_with is not None:
            from analysis.experiment import STUDY, write_file

            write_file(self.keep_with, STUDY, Path(self.storage.removeprefix("sqlite:///")).read_bytes())

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.record(trial, errored=False)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.record(trial, errored=True)
