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
import math
import os
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import sweeps
from analysis.experiment import RESULTS, SUMMARY, holds_run_state, is_remote, write_summary, write_table
from sweeps.budget import BudgetSearcher
from sweeps.config import ConfigError, SearchSettings, load_config
from sweeps.plan import (
    SweepPlan,
    faults_from_environment,
    plan_sweep,
    resume_plan,
    study_file,
    with_base_eval_loss,
)
from sweeps.recheck import build_recheck_tuner, plan_rechecks
from sweeps.resources import TrialResources, plan_resources, trial_gpus
from sweeps.results import collect_results, format_results
from sweeps.space import to_tune_space
from sweeps.study import StudyMirror
from trainable.data import DataError
from trainable.evaluate import evaluate_base
from trainable.model import ModelError, quiet_libraries
from trainable.outcome import METRIC, MODE
from trainable.prepare import TrialSettings

Verbosity = Literal[0, 1, 2]


@dataclasses.dataclass
class StartClock:
    """Where the driver's time goes before Tune starts the first trial: each part from the previous mark,
    printed once as `driver ready in 45 s: imports 6.1 s, plan 3.0 s, ...` (docs/cost.md#the-drivers-start)."""

    last: float = dataclasses.field(default_factory=time.perf_counter)
    parts: list[tuple[str, float]] = dataclasses.field(default_factory=list)

    def mark(self, part: str) -> None:
        now = time.perf_counter()
        self.parts.append((part, now - self.last))
        self.last = now

    def describe(self) -> str:
        total = sum(seconds for _, seconds in self.parts)
        spent = ", ".join(f"{part} {seconds:.1f} s" for part, seconds in self.parts)
        return f"driver ready in {total:.0f} s: {spent}"


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
    run_sweep(plan, resume=args.resume, verbosity=args.verbosity, clock=clock)
    return 0


def start_experiment(plan: SweepPlan) -> None:
    """Write sweep.json, before Ray starts: storage that cannot be written to stops the sweep here."""
    try:
        write_summary(plan.experiment_uri, {"config": dataclasses.asdict(plan.config), **plan.summary})
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
    unless given; bench/scale.py gives trials that only report, to time the driver alone. `clock`: the
    driver's start so far, continued here and printed when Tune starts."""
    import optuna
    import ray

    clock = clock or StartClock()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per created study or trial is noise here
    ray.init(address=ray_address(), ignore_reinit_error=True)
    clock.mark("Ray")
    resources = plan_resources(plan, ray.cluster_resources())
    print(describe_resources(resources), flush=True)
    clock.mark("resources")  # on GPUs, the card's memory asked of a GPU worker
    if plan.trial.base_eval_loss is None:  # a resumed sweep keeps the one it measured
        plan = with_base_eval_loss(plan, measure_base_eval_loss(plan, resources))
        write_summary(plan.experiment_uri, {"config": dataclasses.asdict(plan.config), **plan.summary})
        clock.mark("base model eval")
    trainable = (build_trainable or trial_trainable)(plan, resources)
    tuner = build_tuner(plan, trainable, resources, resume=resume, verbosity=verbosity)
    clock.mark("searcher and Tune")
    print(clock.describe(), flush=True)
    grid = tuner.fit()
    table = collect_results(grid, plan.config)
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
        table = collect_results(grid, plan.config, rechecks=rechecks)
        path = write_table(table, plan.experiment_uri, RESULTS)
    print(format_results(table, path), flush=True)
    if plan.config.report.enabled:
        start_report(plan)
    return path


def ray_address() -> str | None:
    """The address for ray.init: None (Ray's own choice: RAY_ADDRESS, else the cluster `ray start` last
    recorded on this machine, else a new local Ray) unless that recorded cluster no longer answers; then
    "local", with a note. Ray would wait about five minutes on a recorded cluster that is gone, then fail."""
    from ray._private.services import find_bootstrap_address

    recorded = None if os.environ.get("RAY_ADDRESS") else find_bootstrap_address(None)
    if recorded is None:
        return None
    host, _, port = recorded.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError:
        print(f"note: the Ray cluster last started on this machine ({recorded}) does not answer; starting a "
              "local Ray instead. Set RAY_ADDRESS to use a cluster.", flush=True)  # fmt: skip
        return "local"
    return None


def measure_base_eval_loss(plan: SweepPlan, resources: TrialResources) -> float:
    """The base model's eval loss (trainable.evaluate.evaluate_base), once per sweep, as a Ray task with a
    trial's resources: on a cluster it runs on a worker with a GPU, not on the head node."""
    import ray

    # max_calls=1: the worker process exits afterwards, returning the model's memory (and the GPU's).
    task = ray.remote(max_calls=1)(evaluate_base_quietly).options(
        num_cpus=plan.config.search.cpus_per_trial, num_gpus=resources.gpu_share
    )
    start = time.perf_counter()
    loss = float(ray.get(task.remote(plan.trial)))
    print(f"base model: eval loss {loss:.4f} (measured once for the sweep, {time.perf_counter() - start:.0f} s)",
          flush=True)  # fmt: skip
    return loss


def evaluate_base_quietly(settings: TrialSettings) -> float:
    """evaluate_base with a trial's console manners (no loading bars or library warnings)."""
    quiet_libraries()
    return evaluate_base(settings)


def describe_rechecks(points: list[dict[str, Any]], search: SearchSettings) -> str:
    configurations = len(points) // search.recheck_seeds
    return (f"rechecks: {len(points)} trial(s), {search.recheck_seeds} new seed(s) for each of the best "
            f"{configurations} configuration(s)")  # fmt: skip


def describe_plan(plan: SweepPlan) -> str:
    data = plan.summary["data"]
    dropped = data["dropped"]["train"] + data["dropped"]["eval"]
    return (
        f"experiment {plan.experiment_uri}\n"
        f"model {plan.summary['model_path']}\n"
        f"data: {data['train_examples']} train / {data['eval_examples']} eval examples, "
        f"{data['truncated']['train']} train and {data['truncated']['eval']} eval cut at "
        f"data.max_length={plan.config.data.max_length}, {dropped} dropped (nothing left to learn after the cut)"
        + "".join(f"\n{warning}" for warning in data["warnings"])
    )


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


def build_tuner(
    plan: SweepPlan,
    trainable: Any,
    resources: TrialResources,
    *,
    resume: bool = False,
    verbosity: Verbosity = 1,
) -> Any:  # ray.tune.Tuner
    from ray import tune

    config, search = plan.config, plan.config.search
    # With remote storage the SQLite study lives in the cache and the mirror keeps a copy in the experiment.
    keep_with = plan.experiment_uri if is_remote(plan.storage_uri) and not search.study_storage else None
    study_storage = search.study_storage or f"sqlite:///{study_file(plan, resume=resume)}"
    searcher = build_searcher(search, config.points_to_evaluate)
    mirror = StudyMirror(
        storage=study_storage,
        study_name=plan.experiment,
        space=search.space,
        max_steps=config.train.max_steps,
        keep_with=keep_with,
    )
    scheduler = build_scheduler(search, reports=math.ceil(config.train.max_steps / config.train.eval_every))
    if resume and holds_run_state(plan.experiment_uri):
        # Finished trials stay as they are; unfinished and crashed ones continue from their last checkpoint;
        # the searcher is restored from the experiment's state, the RDB study only gains the trials that end.
        # Killed before the run state was first saved, nothing ran: the sweep starts anew below.
        return tune.Tuner.restore(plan.experiment_uri, trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=to_tune_space(search.space),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=searcher
            if search.budget_gpu_hours is None
            else BudgetSearcher(
                searcher, budget_gpu_hours=search.budget_gpu_hours, gpu_share=resources.gpu_share
            ),
            scheduler=scheduler,
            num_samples=search.num_samples,
            max_concurrent_trials=resources.concurrency,
            reuse_actors=resources.reuse_workers,
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


def build_searcher(search: SearchSettings, points: list[dict[str, Any]]) -> Any:  # OptunaSearch
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
            # that never get within 2% of the best (docs/speed.md).
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
    return OptunaSearch(points_to_evaluate=points or None, sampler=sampler)


def build_scheduler(search: SearchSettings, *, reports: int) -> Any:  # ASHAScheduler | None
    """ASHA over the trials' `reports` evaluations, or None when search.scheduler says none (or "auto" with
    a single trial, where there is nothing to compare)."""
    from ray.tune.schedulers import ASHAScheduler

    if not (search.scheduler == "asha" or (search.scheduler == "auto" and search.num_samples > 1)):
        return None
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=reports,
        grace_period=min(search.grace_period, reports),
        reduction_factor=search.reduction_factor,
    )


def describe_resources(resources: TrialResources) -> str:
    memory = resources.memory
    where = f"{resources.trials_per_gpu} trial(s) per GPU" if resources.gpus else "CPU trials"
    check = (
        f"memory check: each trial's estimate against {memory.card_gib * memory.share:.3g} GiB "
        f"(1/{resources.trials_per_gpu} of {memory.card_gib:.3g} GiB)"
        if memory
        else "memory check: off"
    )
    workers = (
        "workers reused between trials"
        if resources.reuse_workers
        else f"a new worker process per trial ({resources.no_reuse_reason or 'search.reuse_workers is off'})"
    )
    line = f"resources: {where}, {resources.concurrency} at once; {check}; {workers}"
    if resources.gpus and resources.trials_per_gpu > 1 and resources.mps is not None:
        line += (
            "; CUDA MPS on: the trials sharing a card run side by side"
            if resources.mps
            else "\nnote: no CUDA MPS on the GPU worker asked, so the trials sharing a card take turns on it, each "
            "less than half as fast as alone; start `nvidia-cuda-mps-control -d` on each GPU node first "
            "(docs/cost.md#mps)"
        )
    return line


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
