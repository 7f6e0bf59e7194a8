"""The search, assembled for Ray Tune: Optuna's TPE as the searcher, ASHA as the scheduler, the loggers, and
the one run configuration (storage, checkpoints kept, retries) that the search and the seed re-checks share.

    tuner = build_tuner(plan, trainable, resources)          # sweeps.run.run_sweep
    searcher = build_searcher(search, points)                # also bench/search/replay.py
    scheduler = build_scheduler(search, reports=6)

docs/search.md says why each setting is what it is, and how the time-to-best replay measured them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from analysis.experiment import holds_run_state, is_remote
from sweeps.baselines import holds_point
from sweeps.budget import BudgetSearcher
from sweeps.config import SearchSettings
from sweeps.plan import SweepPlan, study_file
from sweeps.resources import TrialResources
from sweeps.space import to_tune_space
from sweeps.study import StudyMirror
from trainable.outcome import METRIC, MODE

if TYPE_CHECKING:
    from ray.tune import Callback, RunConfig, Tuner
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch


def build_tuner(
    plan: SweepPlan, trainable: Any, resources: TrialResources, *, resume: bool = False, verbosity: int = 1
) -> Tuner:
    """The search's Tuner, or on `resume` the interrupted one restored from the experiment's run state."""
    from ray import tune

    config, search = plan.config, plan.config.search
    # With remote storage the SQLite study lives in the cache and the mirror keeps a copy in the experiment.
    # Made before a restore too: study_file puts the experiment's copy of the study back into the cache,
    # where the restored mirror (Tune unpickles the original callbacks) writes.
    keep_with = plan.experiment_uri if is_remote(plan.storage_uri) and not search.study_storage else None
    mirror = StudyMirror(
        storage=search.study_storage or f"sqlite:///{study_file(plan, resume=resume)}",
        study_name=plan.experiment,
        space=search.space,
        max_steps=config.train.max_steps,
        keep_with=keep_with,
    )
    if resume and holds_run_state(plan.experiment_uri):
        # Finished trials stay as they are; unfinished and crashed ones continue from their last checkpoint;
        # the searcher is restored from the experiment's state, the RDB study only gains the trials that end.
        # Killed before the run state was first saved, nothing ran: the sweep starts anew below.
        return tune.Tuner.restore(plan.experiment_uri, trainable, resume_unfinished=True, resume_errored=True)
    searcher: Searcher = build_searcher(search, [p.values for p in plan.points])
    if search.budget_gpu_hours is not None:
        searcher = BudgetSearcher(
            searcher, budget_gpu_hours=search.budget_gpu_hours, gpu_share=resources.gpu_share
        )
    return tune.Tuner(
        trainable,
        param_space=to_tune_space(search.space),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=searcher,
            scheduler=build_scheduler(
                search,
                reports=math.ceil(config.train.max_steps / config.train.eval_every),
                baselines=[p.values for p in plan.points if p.origin == "baseline"],
            ),
            num_samples=search.num_samples,
            max_concurrent_trials=resources.concurrency,
            reuse_actors=resources.reuse_workers,
        ),
        run_config=build_run_config(
            name=plan.experiment,
            storage=plan.storage_uri,
            callbacks=[mirror, *build_loggers(search.loggers)],
            max_failures=search.max_failures,
            verbosity=verbosity,
        ),
    )


def build_run_config(
    *, name: str, storage: str, callbacks: list[Callback], max_failures: int, verbosity: int
) -> RunConfig:
    """Where a Tune experiment lives and what it keeps: the search's (sweeps.run) and the seed re-checks'
    (sweeps.recheck) alike."""
    from ray import tune

    return tune.RunConfig(
        name=name,
        storage_path=storage,
        callbacks=callbacks,
        checkpoint_config=tune.CheckpointConfig(
            # Two per trial: the best by eval loss (the adapter results.parquet points at and the report
            # loads) and the latest (what a retried or resumed trial continues from); when the latest is
            # the best, only one. Every other checkpoint is deleted, so storage holds two adapters and
            # optimizer states per trial, not one per evaluation.
            num_to_keep=2,
            checkpoint_score_attribute=METRIC,
            checkpoint_score_order=MODE,
        ),
        # A crashed trial (its process died, a node was preempted) is retried from its last checkpoint.
        failure_config=tune.FailureConfig(max_failures=max_failures),
        verbose=verbosity,
    )


def build_searcher(search: SearchSettings, points: list[dict[str, Any]]) -> OptunaSearch:
    """Optuna's TPE behind Tune's OptunaSearch: `points` first (the recipe, initial points), random trials
    until search.startup_trials have finished, then TPE. Tune gives it the space, metric and mode
    (Tuner's param_space and TuneConfig; by hand: `set_search_properties(METRIC, MODE, to_tune_space(...))`)."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    with warnings.catch_warnings():
        # Optuna 4.9 deprecated prior_weight and consider_magic_clip, to be removed in 6 (pyproject keeps
        # optuna below 6). Their replacements, if any, must be measured on the time-to-best replay before
        # moving (docs/search.md).
        for deprecated in ("prior_weight", "consider_magic_clip"):
            warnings.filterwarnings("ignore", message=f".*{deprecated}.*", category=FutureWarning)
        sampler = optuna.samplers.TPESampler(
            n_startup_trials=search.startup_trials,
            # Also spreads each categorical kernel over every choice (prior_weight / (n + 1) on each), so at
            # 20 TPE models mainly the learning rate and samples r, alpha, layers and dropout broadly.
            prior_weight=search.prior_weight,
            # No floor under the numerical kernels' widths (Optuna's magic clip: (high - low) / (n + 2) for n
            # trials, a factor of 1.5 in learning rate at 10), so TPE can place a learning rate as finely as
            # its good trials are spaced. On the time-to-best replay: the same median time, and fewer sweeps
            # that never get within 2% of the best (docs/search.md).
            consider_magic_clip=False,
            # One joint model of all parameters: the best learning rate depends on r and lora_alpha (the
            # update scales with alpha/r), which independent per-parameter models cannot see (Falkner et al.
            # 2018, BOHB).
            multivariate=True,
            # Trials that are still running count as bad results, so parallel trials spread out instead of
            # all sampling next to the current best.
            constant_liar=True,
            seed=search.seed,
        )
    # TPE is told each trial's last reported eval loss (OptunaSearch.on_trial_complete reads the trial's
    # last result): for a finished trial usually its best too, as the schedule decays to the end; for one
    # that ASHA stopped, the loss at its rung. The recorded study and results.parquet value a trial by its
    # best eval loss. Telling TPE the best instead would score a trial whose loss rises late by the adapter
    # the sweep keeps, but it changes what TPE models, so it waits for a measurement on the time-to-best
    # replay (bench/search/replay.py, which tells it the last result too).
    return OptunaSearch(points_to_evaluate=points or None, sampler=sampler)


def build_scheduler(
    search: SearchSettings, *, reports: int, baselines: Sequence[Mapping[str, Any]] = ()
) -> ASHAWithBaselines | None:
    """ASHA over the trials' `reports` evaluations, never stopping the trials of `baselines` (the
    configurations of sweeps.baselines), or None when search.scheduler says none (or "auto" with a single
    trial, where there is nothing to compare)."""
    if not (search.scheduler == "asha" or (search.scheduler == "auto" and search.num_samples > 1)):
        return None

    return ASHAWithBaselines(
        baselines=baselines,
        time_attr="training_iteration",
        max_t=reports,
        grace_period=min(search.grace_period, reports),
        reduction_factor=search.reduction_factor,
    )


class ASHAWithBaselines(ASHAScheduler):  # type: ignore[misc]  # Ray's classes are untyped
    """ASHA, except that a baseline's trial is never stopped early: its evaluations still enter the
    rungs, so a searched trial has to keep up with the baselines to go on, but a baseline trains to the
    end, a full-length baseline for the report to compare with. The baselines are the first trials
    whose configs hold their values (sweeps.baselines.claim_points); a resumed sweep's Tune adds its
    trials again in their order, so they are found again."""

    def __init__(self, *, baselines: Sequence[Mapping[str, Any]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.unclaimed = [dict(point) for point in baselines]
        self.baseline_trials: set[str] = set()

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        for index, point in enumerate(self.unclaimed):
            if holds_point(trial.config, point):
                self.baseline_trials.add(trial.trial_id)
                del self.unclaimed[index]
                break

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        action: str = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and trial.trial_id in self.baseline_trials:
            self._num_stopped -= 1
            return TrialScheduler.CONTINUE
        return action


def build_loggers(names: Sequence[str]) -> list[Callback]:
    """Tune's logger callbacks for search.loggers: TensorBoard, MLflow, Weights & Biases."""
    callbacks: list[Callback] = []
    if "tensorboard" in names:
        from ray.tune.logger import TBXLoggerCallback

        callbacks.append(TBXLoggerCallback())
    if "mlflow" in names:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(MLflowLoggerCallback(experiment_name="qlora-sweeps"))
    if "wandb" in names:
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(WandbLoggerCallback(project="qlora-sweeps"))
    return callbacks
