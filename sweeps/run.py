"""The sweep driver.

    python -m sweeps.run                                   # one trial of the embedded model, CPU or GPU
    python -m sweeps.run --config llama2-7b search.num_samples=64
    python -m sweeps.run --config path/to/my.yaml train.max_steps=50
    python -m sweeps.run --config llama2-7b --resume       # continue the newest interrupted llama2-7b sweep

Checks the config, model and data first (nothing starts on bad input), tokenizes the data once, measures
the base model's eval loss once, then runs Ray Tune with Optuna's TPE over the search space, ASHA stopping
trials that trail, one GPU (or a few CPU cores) per trial, then the seed re-checks of the best
configurations (search.recheck_top, sweeps/recheck.py). Writes results.parquet (one row per trial) into the
experiment folder, then the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any, Literal

from analysis.experiment import RESULTS, STUDY, is_remote, write_file, write_summary, write_table
from sweeps.config import ConfigError, SweepConfig, load_config
from sweeps.plan import (
    SweepPlan,
    faults_from_environment,
    plan_sweep,
    resume_plan,
    study_folder,
    with_base_eval_loss,
)
from sweeps.recheck import build_recheck_tuner, plan_rechecks
from sweeps.results import collect_results, format_results
from sweeps.space import to_tune_space
from sweeps.study import StudyMirror
from trainable.data import DataError
from trainable.model import ModelError
from trainable.outcome import METRIC, MODE
from trainable.train import evaluate_base, train_trial

Verbosity = Literal[0, 1, 2]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        plan = plan_sweep(config, faults=faults_from_environment())
        if args.resume:
            plan = resume_plan(plan)
    except (ConfigError, DataError, ModelError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(describe_plan(plan), flush=True)
    run_sweep(plan, resume=args.resume, verbosity=args.verbosity)
    return 0


def run_sweep(plan: SweepPlan, *, resume: bool = False, verbosity: Verbosity = 1) -> str:
    """Run (or resume) the planned sweep, write its results and report; returns where results.parquet is.
    `verbosity`: Tune's console output, 0 none, 1 the progress table, 2 each trial's start and results too;
    every trial prints one line per evaluation at any verbosity."""
    import optuna
    import ray

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per created study or trial is noise here
    ray.init(ignore_reinit_error=True)
    if plan.trial.base_eval_loss is None:  # a resumed sweep keeps the one it measured
        plan = with_base_eval_loss(plan, measure_base_eval_loss(plan))
        write_summary(plan.experiment_uri, {"config": dataclasses.asdict(plan.config), **plan.summary})
    grid = build_tuner(plan, resume=resume, verbosity=verbosity).fit()
    table = collect_results(grid, plan.config)
    path = write_table(table, plan.experiment_uri, RESULTS)  # the search's, kept should the re-checks fail
    points = plan_rechecks(table, plan.config)
    if points:
        print(f"rechecks: {len(points)} trial(s), {plan.config.search.recheck_seeds} new seed(s) for each of "
              f"the best {len(points) // plan.config.search.recheck_seeds} configuration(s)", flush=True)  # fmt: skip
        trainable, concurrency = trial_trainable(plan)
        rechecks = build_recheck_tuner(
            points,
            trainable=trainable,
            experiment_uri=plan.experiment_uri,
            concurrency=concurrency,
            callbacks=build_loggers(plan.config.search.loggers),
            max_failures=plan.config.search.max_failures,
            resume=resume,
            verbosity=verbosity,
        ).fit()
        table = collect_results(grid, plan.config, rechecks=rechecks)
        path = write_table(table, plan.experiment_uri, RESULTS)
    if is_remote(plan.storage_uri) and not plan.config.search.study_storage:
        # SQLite needs a local file: the study lived beside the driver; keep a copy with the results.
        with open(os.path.join(study_folder(plan), STUDY), "rb") as f:
            write_file(plan.experiment_uri, STUDY, f.read())
    print(format_results(table, path), flush=True)
    if plan.config.report.enabled:
        start_report(plan)
    return path


def measure_base_eval_loss(plan: SweepPlan) -> float:
    """The base model's eval loss (trainable.train.evaluate_base), once per sweep, as a Ray task with a
    trial's resources: on a cluster it runs on a worker with a GPU, not on the head node."""
    import ray

    resources, _ = trial_resources(plan)
    # max_calls=1: the worker process exits afterwards, returning the model's memory (and the GPU's).
    task = ray.remote(max_calls=1)(evaluate_base).options(
        num_cpus=resources["cpu"], num_gpus=resources["gpu"]
    )
    start = time.perf_counter()
    loss = float(ray.get(task.remote(plan.trial)))
    print(f"base model: eval loss {loss:.4f} (measured once for the sweep, {time.perf_counter() - start:.0f} s)",
          flush=True)  # fmt: skip
    return loss


def describe_plan(plan: SweepPlan) -> str:
    data = plan.summary["data"]
    dropped = data["dropped"]["train"] + data["dropped"]["eval"]
    return (
        f"experiment {plan.experiment_uri}\n"
        f"model {plan.summary['model_path']}\n"
        f"data: {data['train_examples']} train / {data['eval_examples']} eval examples, "
        f"{data['truncated']['train']} train and {data['truncated']['eval']} eval cut at "
        f"data.max_length={plan.config.data.max_length}, {dropped} dropped (nothing left to learn after the cut)"
    )


def build_tuner(plan: SweepPlan, *, resume: bool = False, verbosity: Verbosity = 1) -> Any:  # ray.tune.Tuner
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    config, search = plan.config, plan.config.search
    trainable, concurrency = trial_trainable(plan)
    study_storage = search.study_storage or f"sqlite:///{study_folder(plan)}/{STUDY}"
    searcher = OptunaSearch(
        points_to_evaluate=config.points_to_evaluate or None,
        sampler=optuna.samplers.TPESampler(seed=search.seed),
    )
    mirror = StudyMirror(
        storage=study_storage,
        study_name=plan.experiment,
        space=search.space,
        max_steps=config.train.max_steps,
    )
    reports = math.ceil(config.train.max_steps / config.train.eval_every)
    use_asha = search.scheduler == "asha" or (search.scheduler == "auto" and search.num_samples > 1)
    scheduler = (
        ASHAScheduler(
            time_attr="training_iteration",
            max_t=reports,
            grace_period=min(search.grace_period, reports),
            reduction_factor=search.reduction_factor,
        )
        if use_asha
        else None
    )
    if resume:
        # Finished trials stay as they are; unfinished and crashed ones continue from their last checkpoint;
        # the searcher is restored from the experiment's state, the RDB study only gains the trials that end.
        return tune.Tuner.restore(plan.experiment_uri, trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=to_tune_space(search.space),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=search.num_samples,
            max_concurrent_trials=concurrency,
        ),
        run_config=tune.RunConfig(
            name=plan.experiment,
            storage_path=plan.storage_uri,
            callbacks=[mirror, *build_loggers(search.loggers)],
            checkpoint_config=tune.CheckpointConfig(
                # The best checkpoint (the adapter the results point at) and the latest (to resume from).
                num_to_keep=2,
                checkpoint_score_attribute=METRIC,
                checkpoint_score_order=MODE,
            ),
            failure_config=tune.FailureConfig(max_failures=search.max_failures),
            verbose=verbosity,
        ),
    )


def trial_resources(plan: SweepPlan) -> tuple[dict[str, float], int]:
    """A trial's resources ({"cpu": ..., "gpu": ...}) and how many trials run at once: as many as the
    cluster holds now (an autoscaling cluster should set search.max_concurrent_trials itself)."""
    import ray

    search = plan.config.search
    resources = ray.cluster_resources()
    gpus = trial_gpus(plan.config, resources)
    # With a searcher, Tune only keeps one trial pending, so without a cap trials would run one by one.
    capacity = int(resources.get("GPU", 0)) if gpus else int(resources.get("CPU", 1)) // search.cpus_per_trial
    return {"cpu": search.cpus_per_trial, "gpu": gpus}, search.max_concurrent_trials or max(1, capacity)


def trial_trainable(plan: SweepPlan) -> tuple[Any, int]:
    """Tune's trainable (train_trial with the plan's settings and a trial's resources) and the number of
    trials at once."""
    from ray import tune

    resources, concurrency = trial_resources(plan)
    return tune.with_resources(tune.with_parameters(train_trial, settings=plan.trial), resources), concurrency


def trial_gpus(config: SweepConfig, resources: dict[str, float]) -> int:
    """GPUs per trial: `search.gpus_per_trial`, where "auto" means 1 if the cluster has GPUs."""
    gpus = config.search.gpus_per_trial
    if gpus == "auto":
        return 1 if resources.get("GPU", 0) >= 1 else 0
    return gpus


def build_loggers(names: Sequence[str]) -> list[Any]:
    callbacks: list[Any] = []
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


def start_report(plan: SweepPlan) -> None:
    """The report, as a separate process that reads only the experiment's files (as it does on a laptop).

    Where the trials had GPUs and the driver has none (a cluster's head node), it runs on a GPU worker
    instead, as one Ray task holding one GPU: generating with every candidate on the head node's CPUs
    would take hours for a 7B model. A failed report leaves the sweep's results as they are.
    """
    import ray
    import torch

    if trial_gpus(plan.config, ray.cluster_resources()) and not torch.cuda.is_available():
        task = ray.remote(report_on_this_worker).options(
            num_gpus=1, num_cpus=plan.config.search.cpus_per_trial
        )
        where = ray.get(task.remote(plan.experiment_uri))
        print(f"report: ran on a GPU worker ({where})", flush=True)
    else:
        report_on_this_worker(plan.experiment_uri)


def report_on_this_worker(experiment_uri: str) -> str:
    """Run `python -m analysis.report` here; says where that was."""
    import ray

    done = subprocess.run([sys.executable, "-m", "analysis.report", experiment_uri], check=False)
    if done.returncode:
        print(f"report: failed (exit {done.returncode}); rerun: python -m analysis.report {experiment_uri}")
    context = ray.get_runtime_context()
    return f"node {context.get_node_id()[:12]}, GPU ids {ray.get_gpu_ids()}, exit {done.returncode}"


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
        "--quiet", dest="verbosity", action="store_const", const=0, default=1,
        help="no progress table: the plan, one line per trial evaluation, the summary",
    )  # fmt: skip
    loudness.add_argument(
        "--verbose", dest="verbosity", action="store_const", const=2,
        help="also Tune's box for every trial's start and results",
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=50")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
