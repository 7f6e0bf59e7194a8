"""Seed re-checks: after the search, the best configurations trained again with new seeds.

    search: {num_samples: 16, recheck_top: 3, recheck_seeds: 2}   # 16 searched trials + 3 x 2 re-checks

A sweep's #1 by eval loss may owe its place to a lucky seed (LoRA's random init, data order, dropout).
With `search.recheck_top: K` and `search.recheck_seeds: N` the K best configurations (by best eval loss
among trials with a rankable status) each train N more times, with `train.seed + 1` ... `train.seed + N`,
after the search and on top of its `num_samples`: K x N more trials. The leaderboard then ranks
configurations by their mean over seeds and shows the spread (analysis/seeds.py).

Why a second Tune experiment (the `rechecks/` subfolder of the experiment) rather than more trials of the
search's own: which configurations to re-check is known only when the search has ended, and the search's
Tuner has a fixed num_samples and a searcher whose suggestions would be consumed, or its study told, by
extra trials. A Tuner of its own holds exactly the K x N re-checks as fixed points (Tune's
BasicVariantGenerator), runs them without the early-stopping scheduler (a re-check must train as long as
the run it checks), and is resumable the same way as the search: a driver killed during the re-checks
restores this experiment (finished re-checks are kept, unfinished ones continue from their checkpoints);
killed before they started (no run state in `rechecks/` yet), the resumed driver starts them, choosing
the same configurations from the same finished search. The Optuna study holds the search's trials only.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import pandas as pd

from analysis.experiment import RECHECKS, holds_run_state, join
from sweeps.budget import SECONDS_PER_HOUR, budget_seconds
from sweeps.config import SweepConfig
from sweeps.search import build_run_config
from trainable.outcome import METRIC, MODE, SEED_KEY
from trainable.schema import BEST_EVAL_LOSS, TRIAL_ID, usable

if TYPE_CHECKING:
    from ray.tune import Callback, Tuner

# A re-check's trial config names the trial whose configuration it trains again (results' config_id).
RECHECK_OF = "recheck_of"


def plan_rechecks(table: pd.DataFrame, config: SweepConfig) -> list[dict[str, Any]]:
    """The re-check trials' configs for a search's results table (sweeps.results.collect_results): the
    searched hyperparameters of the recheck_top best distinct configurations, each with recheck_seeds new
    seeds. Empty when re-checks are off or no trial has a rankable finite loss. With search.budget_gpu_hours,
    only configurations whose re-checks fit in what the search left of the budget."""
    search = config.search
    if not search.recheck_top or table.empty:
        return []
    keys = [k for k in search.space if k in table.columns]
    best = table[usable(table)].sort_values([BEST_EVAL_LOSS, TRIAL_ID], kind="stable")
    best = best.drop_duplicates(subset=keys).head(search.recheck_top)  # a configuration once
    left_s = math.inf
    if search.budget_gpu_hours is not None:
        left_s = search.budget_gpu_hours * SECONDS_PER_HOUR - float(budget_seconds(table).sum())
    points = []
    for row in best.to_dict("records"):
        # Each new seed costs about what the trial it re-checks cost; a configuration gets all its seeds or
        # none, so that its mean is over recheck_seeds + 1 runs like the others'.
        cost_s = search.recheck_seeds * float(budget_seconds(pd.DataFrame([row])).iloc[0])
        if cost_s > left_s:
            continue
        left_s -= cost_s
        searched = {k: _plain(row[k]) for k in keys}
        for i in range(1, search.recheck_seeds + 1):
            points.append({**searched, SEED_KEY: config.train.seed + i, RECHECK_OF: str(row[TRIAL_ID])})
    return points


def _plain(value: Any) -> Any:
    """A numpy scalar from the table as the Python value Tune and the trial expect."""
    return value.item() if hasattr(value, "item") else value


def build_recheck_tuner(
    points: list[dict[str, Any]],
    *,
    trainable: Any,
    experiment_uri: str,
    concurrency: int,
    reuse_workers: bool,
    callbacks: list[Callback],
    max_failures: int,
    resume: bool,
    verbosity: int = 1,
) -> Tuner:
    """The Tuner of the re-checks, in the experiment's `rechecks/` subfolder; restored from there when
    resuming and their run had started, else new."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    path = join(experiment_uri, RECHECKS)
    if resume and holds_run_state(path):
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable,
        # Tune sets a point's keys only where the space has them; None: no distribution, the point's value.
        param_space=dict.fromkeys(points[0]),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=BasicVariantGenerator(points_to_evaluate=points),
            num_samples=len(points),  # each point replaces one sample
            max_concurrent_trials=concurrency,
            reuse_actors=reuse_workers,  # sweeps.resources.worker_reuse_problem: where it is safe
        ),
        run_config=build_run_config(
            name=RECHECKS,
            storage=experiment_uri,
            callbacks=callbacks,
            max_failures=max_failures,
            verbosity=verbosity,
        ),
    )
