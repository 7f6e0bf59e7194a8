"""The sweep driver.

    python -m sweeps.run                                   # one trial of the embedded model, CPU or GPU
    python -m sweeps.run --config llama2-7b search.num_samples=64
    python -m sweeps.run --config path/to/my.yaml train.max_steps=50
    python -m sweeps.run --config llama2-7b --resume       # continue the newest interrupted llama2-7b sweep

Checks the config, model and data first (nothing starts on bad input), tokenizes the data once, then runs
Ray Tune with Optuna's TPE over the search space, ASHA stopping trials that trail, one GPU (or a few CPU
cores) per trial. Writes results.parquet (one row per trial) into the experiment folder, then the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from typing import Any, Literal

import sweeps
from analysis.experiment import RESULTS, SUMMARY, write_summary, write_table
from sweeps.capacity import check_capacity
from sweeps.cluster import measure_base_eval_loss, ray_address, start_report
from sweeps.config import ConfigError, load_config
from sweeps.console import StartClock, describe_plan, describe_rechecks, describe_resources
from sweeps.plan import SweepPlan, faults_from_environment, plan_sweep, resume_plan, with_base_eval_loss
from sweeps.recheck import build_recheck_tuner, plan_rechecks
from sweeps.resources import TrialResources, plan_resources
from sweeps.results import collect_results, format_results
from sweeps.search import build_loggers, build_tuner
from trainable.data import DataError
from trainable.model import ModelError

Verbosity = Literal[0, 1, 2]


def main(argv: list[str] | None = None) -> int:
    clock = StartClock(last=sweeps.IMPORTED_AT)
    clock.mark("imports")
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        plan = plan_sweep(config, faults=faults_from_environment())
        if args.resume:
            plan = resume_plan(plan)
        else:
            start_experiment(plan)
    except (ConfigError, DataError, ModelError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(describe_plan(plan), flush=True)
    clock.mark("plan")
    try:
        run_sweep(plan, resume=args.resume, verbosity=args.verbosity, clock=clock)
    except ConfigError as err:  # what the cluster cannot hold (sweeps.capacity); sweep.json stays for a rerun
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def start_experiment(plan: SweepPlan) -> None:
    """Write sweep.json, before Ray starts: storage that cannot be written to stops the sweep here."""
    try:
        write_summary(plan.experiment_uri, plan.summary)
    except OSError as err:
        raise ConfigError(
            f"storage_path={plan.config.storage_path!r}: cannot write {plan.experiment_uri}/{SUMMARY} ({err}). "
            "Check that the bucket exists and the credentials may write to it; for an S3-compatible store "
            "set AWS_ENDPOINT_URL (docs/cluster.md)"
        ) from err


def run_sweep(
    plan: SweepPlan,
    *,
    resume: bool = False,
    verbosity: Verbosity = 1,
    build_trainable: Callable[[SweepPlan, TrialResources], Any] | None = None,
    clock: StartClock | None = None,
) -> str:
    """Run (or resume) the sweep of an experiment that start_experiment began, write its results and report;
    returns where results.parquet is. `verbosity`: Tune's console output, 0 none, 1 the progress table, 2
    each trial's start and results too; every trial prints one line per evaluation at any verbosity.
    `build_trainable`: Tune's trainable for the plan and its resources, trial_trainable (the real trial)
    unless given; bench/scale/simulate.py gives trials that only report, to time the driver alone. `clock`:
    the driver's start so far, continued here and printed when Tune starts."""
    import optuna
    import ray

    clock = clock or StartClock()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per created study or trial is noise here
    ray.init(address=ray_address(), ignore_reinit_error=True)
    clock.mark("Ray")
    check_capacity(plan.config, ray.cluster_resources())  # before anything waits on a node that never comes
    resources = plan_resources(plan, ray.cluster_resources())
    print(describe_resources(resources), flush=True)
    clock.mark("resources")  # on GPUs, the card's memory asked of a GPU worker
    if plan.trial.base_eval_loss is None:  # a resumed sweep keeps the one it measured
        plan = with_base_eval_loss(plan, measure_base_eval_loss(plan, resources))
        write_summary(plan.experiment_uri, plan.summary)
        clock.mark("base model eval")
    trainable = (build_trainable or trial_trainable)(plan, resources)
    tuner = build_tuner(plan, trainable, resources, resume=resume, verbosity=verbosity)
    clock.mark("searcher and Tune")
    print(clock.describe(), flush=True)
    grid = tuner.fit()
    table = collect_results(grid, plan.config, plan.points)
    path = write_table(table, plan.experiment_uri, RESULTS)  # the search's, kept should the re-checks fail
    points = plan_rechecks(table, plan.config)
    if points:
        print(describe_rechecks(points, plan.config.search), flush=True)
        rechecks = build_recheck_tuner(
            points,
            trainable=trainable,
            experiment_uri=plan.experiment_uri,
            concurrency=resources.concurrency,
            reuse_workers=resources.reuse_workers,
            callbacks=build_loggers(plan.config.search.loggers),
            max_failures=plan.config.search.max_failures,
            resume=resume,
            verbosity=verbosity,
        ).fit()
        table = collect_results(grid, plan.config, plan.points, rechecks=rechecks)
        path = write_table(table, plan.experiment_uri, RESULTS)
    print(format_results(table, path), flush=True)
    if plan.config.report.enabled:
        start_report(plan)
    return path


def trial_trainable(plan: SweepPlan, resources: TrialResources) -> Any:
    """Tune's trainable: train_trial with the plan's trial settings, the memory plan and a trial's share of
    the cluster (search.cpus_per_trial, resources.gpu_share)."""
    from ray import tune

    from trainable.train import train_trial  # the training libraries (peft, trl): not for the driver's start

    trial = dataclasses.replace(
        plan.trial,
        gpu_share=resources.gpu_share,
        memory=resources.memory,
        reused_worker=resources.reuse_workers,
    )
    return tune.with_resources(
        tune.with_parameters(train_trial, settings=trial),
        {"cpu": plan.config.search.cpus_per_trial, "gpu": resources.gpu_share},
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sweeps.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="local", help="a name in sweeps/configs/ or a YAML path")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted sweep: the newest of this config, or the one named by experiment=NAME",
    )
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument(
        "--quiet",
        dest="verbosity",
        action="store_const",
        const=0,
        default=1,
        help="no progress table: the plan, one line per trial evaluation, the summary",
    )
    loudness.add_argument(
        "--verbose",
        dest="verbosity",
        action="store_const",
        const=2,
        help="also Tune's box for every trial's start and results",
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=50")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
