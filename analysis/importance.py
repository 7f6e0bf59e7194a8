"""Hyperparameter importance: Optuna's fANOVA evaluator on the sweep's study.

The study is read from the experiment's optuna.db (a copy: reading must not migrate or lock the
original); when the file is missing it is rebuilt from results.parquet, with each searched parameter's
distribution taken from the recorded search space.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.experiment import RESULTS, STUDY, Experiment
from trainable.outcome import DIRECTION
from trainable.schema import BEST_EVAL_LOSS, usable
from trainable.settings import HYPERPARAMETERS

# fANOVA fits a random forest; fewer finished trials than this say nothing about importance.
MIN_TRIALS = 2


@dataclass(frozen=True)
class Importance:
    values: dict[str, float]  # parameter -> share of the loss variance it explains (sums to 1); may be empty
    source: str  # where the trials came from
    trials: int
    note: str  # why values are missing, or how to read them


def load_study(experiment: Experiment) -> tuple[Any, str]:
    """(optuna study, source): the recorded study, or one rebuilt from the results table."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = experiment.path / STUDY
    if db.is_file():
        copy = Path(tempfile.mkdtemp(prefix="study-")) / STUDY
        shutil.copyfile(db, copy)
        storage = f"sqlite:///{copy}"
        names = optuna.get_all_study_names(storage)
        # The driver names the study after the experiment folder; a renamed copy keeps the old name.
        name = experiment.name if experiment.name in names else (names[0] if len(names) == 1 else None)
        if name is not None:
            return optuna.load_study(study_name=name, storage=storage), STUDY
    return rebuild_study(experiment), RESULTS


def rebuild_study(experiment: Experiment) -> Any:
    """An in-memory study with one finished trial per usable row of results.parquet (value: best eval loss)."""
    import optuna
    from optuna.distributions import CategoricalDistribution

    results = experiment.results
    recorded = {name: d.to_optuna() for name, d in experiment.space.items() if name in results}
    distributions: dict[str, Any] = {}
    for name in HYPERPARAMETERS:
        if name in recorded:
            distributions[name] = recorded[name]
        elif name in results:
            # Not in the recorded space (an edited sweep.json): the values the trials had, if they vary.
            choices = sorted(results[name].dropna().unique().tolist(), key=str)
            if len(choices) > 1:
                distributions[name] = CategoricalDistribution([_plain(c) for c in choices])
    study = optuna.create_study(direction=DIRECTION)
    for row in results[usable(results)].to_dict("records"):
        loss = row[BEST_EVAL_LOSS]
        params = {k: _plain(row[k]) for k in distributions}
        try:
            study.add_trial(
                optuna.trial.create_trial(params=params, distributions=distributions, value=float(loss))
            )
        except ValueError:
            continue  # a value outside the recorded space (edited config): leave that trial out
    return study


def compute_importance(experiment: Experiment, *, seed: int = 0) -> Importance:
    """fANOVA importances of the searched hyperparameters for eval loss, or a note saying why there are none."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator

    study, source = load_study(experiment)
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(finished) < MIN_TRIALS:
        return Importance(
            {},
            source,
            len(finished),
            f"{len(finished)} finished trial(s): importance needs at least {MIN_TRIALS} "
            "(and more than a handful to mean much); run more trials (search.num_samples)",
        )
    try:
        values = optuna.importance.get_param_importances(
            study, evaluator=FanovaImportanceEvaluator(seed=seed)
        )
    except (RuntimeError, ValueError) as err:
        return Importance({}, source, len(finished), f"importance could not be computed: {err}")
    note = (
        f"fANOVA on {len(finished)} trials from {source}: each parameter's share of the eval-loss variance. "
        + ("Few trials: read it as a hint, not a finding." if len(finished) < 20 else "")
    )
    return Importance({k: float(v) for k, v in values.items()}, source, len(finished), note.strip())


def _plain(value: Any) -> Any:
    """numpy scalars as Python values (Optuna's categorical choices must be plain)."""
    return value.item() if hasattr(value, "item") else value
