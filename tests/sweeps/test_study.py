"""The Optuna study mirror: each of Tune's trials once, also when the driver restarts and records again."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna

from sweeps.study import TRIAL_KEY, StudyMirror

SPACE = {"r": {"choice": [8, 16]}}


def finished_trial(trial_id: str, eval_loss: float, best: float | None = None) -> Any:
    """What the mirror reads of Tune's Trial: its id, its last result, the lowest eval loss of all its
    results (Tune's metric_analysis) and its config."""
    return SimpleNamespace(
        trial_id=trial_id,
        last_result={"eval_loss": eval_loss, "step": 4},
        metric_analysis={"eval_loss": {"min": eval_loss if best is None else best, "last": eval_loss}},
        config={"r": 8},
    )


def test_a_restarted_driver_mirrors_each_trial_once(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = StudyMirror(storage=storage, study_name="mirror", space=SPACE, max_steps=4)
    first.record(finished_trial("a", 1.5), errored=False)
    first.record(finished_trial("a", 1.5), errored=False)  # told twice: Tune's complete, then its error
    first.record(finished_trial("b", 1.2), errored=False)
    # The driver was killed and resumed: a new mirror on the same study, told again of a trial it holds.
    second = StudyMirror(storage=storage, study_name="mirror", space=SPACE, max_steps=4)
    second.record(finished_trial("b", 1.2), errored=False)
    second.record(finished_trial("c", 1.1), errored=True)
    trials = optuna.load_study(study_name="mirror", storage=storage).trials
    assert [t.user_attrs[TRIAL_KEY] for t in trials] == ["a", "b", "c"]
    assert [t.value for t in trials] == [1.5, 1.2, None]
    assert trials[2].state == optuna.trial.TrialState.FAIL


def test_a_trial_is_recorded_with_the_best_eval_loss_it_reported(tmp_path: Path) -> None:
    """results.parquet and the report rank a trial by its best eval loss: the study holds the same."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    mirror = StudyMirror(storage=storage, study_name="best", space=SPACE, max_steps=4)
    mirror.record(finished_trial("overfit", 1.5, best=1.25), errored=False)
    (trial,) = optuna.load_study(study_name="best", storage=storage).trials
    assert trial.value == 1.25
    assert trial.intermediate_values == {4: 1.5}  # where it ended
