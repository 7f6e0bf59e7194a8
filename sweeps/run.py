"""The sweep driver.

    python -m sweeps.run                                   # one trial of the embedded model, CPU or GPU
    python -m sweeps.run --config llama2-7b search.num_samples=64
    python -m sweeps.run --config path/to/my.yaml train.max_steps=50

Checks the config, model and data first (nothing starts on bad input), tokenizes the data once, then runs
Ray Tune with Optuna's TPE over the search space, ASHA stopping trials that trail, one GPU (or a few CPU
cores) per trial. Writes results.parquet (one row per trial) into the experiment folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sweeps.config import ConfigError, SweepConfig, load_config
from sweeps.results import collect_results, format_summary, write_table
from sweeps.space import to_tune_space
from sweeps.study import StudyMirror, local_study
from trainable.data import DataError, choose_chat_template, load_splits, tokenize_examples
from trainable.model import (
    ModelError,
    load_module_names,
    load_tokenizer,
    resolve_model,
    resolve_target_modules,
)
from trainable.outcome import METRIC, MODE
from trainable.train import TrialSettings, train_trial


@dataclass(frozen=True)
class SweepPlan:
    """A checked sweep, ready for Ray: the config plus what was resolved from it."""

    config: SweepConfig
    experiment: str
    storage_uri: str
    trial: TrialSettings
    summary: dict[str, Any]  # what was resolved (model path, data counts, template), saved as sweep.json

    @property
    def experiment_uri(self) -> str:
        return f"{self.storage_uri.rstrip('/')}/{self.experiment}"


def prepare_sweep(config: SweepConfig) -> SweepPlan:
    """Resolve the model, check every target_modules value against it, load and tokenize the data.

    Raises ConfigError or DataError naming the key, file or line; nothing has started yet when it does.
    """
    model_path = resolve_model(config.model.name_or_path)
    available = load_module_names(model_path, config.model)
    problems = []
    targets = {("lora.target_modules", config.lora.target_modules)}
    space_targets = config.search.space.get("target_modules", {}).get("choice", [])
    targets |= {("search.space.target_modules", t) for t in space_targets}
    targets |= {
        (f"search.initial_points[{i}].target_modules", p["target_modules"])
        for i, p in enumerate(config.initial_points)
        if "target_modules" in p
    }
    for key, spec in sorted(targets):
        try:
            resolve_target_modules(spec, available)
        except ValueError as err:
            problems.append(f"{key}: {err}")
    if problems:
        raise ConfigError("\n".join(problems))

    tokenizer = load_tokenizer(model_path, config.model)
    template = choose_chat_template(tokenizer, config.data.chat_template)
    splits = load_splits(config.data)
    max_length = config.data.max_length
    train = tokenize_examples(splits.train, tokenizer, template=template, max_length=max_length)
    evals = tokenize_examples(splits.eval, tokenizer, template=template, max_length=max_length)
    if len(train.input_ids) < 8 or not evals.input_ids:
        raise DataError(
            f"data: after cutting to data.max_length={max_length}, {len(train.input_ids)} training and "
            f"{len(evals.input_ids)} eval examples keep a trained token; raise data.max_length"
        )
    cpus = config.search.cpus_per_trial
    trial = TrialSettings(
        model_path=model_path,
        model=config.model,
        train=config.train,
        lora=config.lora,
        train_data=train.as_columns(),
        eval_data=evals.as_columns(),
        cpus=cpus,
    )
    summary = {
        "fingerprint": fingerprint(config, model_path, trial),
        "model_path": model_path,
        "chat_template": template,
        "linear_modules": sorted(available),
        "data": {
            "train_examples": len(train.input_ids),
            "eval_examples": len(evals.input_ids),
            "test_examples": len(splits.test),
            "train_tokens": train.tokens,
            "truncated": {"train": train.truncated, "eval": evals.truncated},
            "dropped": {"train": train.dropped, "eval": evals.dropped},
        },
    }
    return SweepPlan(config, config.experiment_name(), config.storage_uri(), trial, summary)


def fingerprint(config: SweepConfig, model_path: str, trial: TrialSettings) -> dict[str, str]:
    """Hashes of what a resumed sweep must share with the interrupted one, part by part."""

    def digest(value: Any) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]

    return {
        "model": digest([model_path, dataclasses.asdict(config.model)]),
        "data": digest([trial.train_data, trial.eval_data]),
        "search space": digest([config.search.space, config.initial_points, config.search.num_samples]),
        "training settings": digest([dataclasses.asdict(config.train), dataclasses.asdict(config.lora)]),
    }


def find_experiment(config: SweepConfig) -> str:
    """The experiment to resume: `experiment` when the config names one, else the newest of this config."""
    from pyarrow import fs

    storage = config.storage_uri().rstrip("/")
    if config.experiment:
        return f"{storage}/{config.experiment}"
    filesystem, root = fs.FileSystem.from_uri(storage)
    infos = filesystem.get_file_info(fs.FileSelector(root, allow_not_found=True))
    names = sorted(
        i.base_name
        for i in infos
        if i.type == fs.FileType.Directory and i.base_name.startswith(f"{config.name}-")
    )
    if not names:
        raise ConfigError(f"--resume: no experiment of config {config.name!r} under {storage}")
    return f"{storage}/{names[-1]}"


def check_resumable(plan: SweepPlan) -> None:
    """Refuse to resume an experiment with another model, data, search space or training settings."""
    from pyarrow import fs

    filesystem, root = fs.FileSystem.from_uri(plan.experiment_uri)
    try:
        with filesystem.open_input_stream(f"{root}/sweep.json") as f:
            saved = json.loads(f.read())
    except (FileNotFoundError, OSError) as err:
        raise ConfigError(f"--resume: {plan.experiment_uri} holds no sweep.json; nothing to resume") from err
    changed = [
        part for part, value in plan.summary["fingerprint"].items() if saved["fingerprint"].get(part) != value
    ]
    if changed:
        raise ConfigError(
            f"--resume: the {', '.join(changed)} differ from those of {plan.experiment_uri}; a resumed sweep "
            "must be the same sweep. Rerun with the original config and overrides, or start a new experiment."
        )


def build_tuner(plan: SweepPlan, *, resume: bool = False) -> Any:  # ray.tune.Tuner
    import optuna
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    config, search = plan.config, plan.config.search
    resources = ray.cluster_resources()
    gpus = trial_gpus(config, resources)
    # As many trials at once as the cluster holds now (an autoscaling cluster should set the cap itself):
    # with a searcher, Tune only keeps one trial pending, so without a cap trials would run one by one.
    capacity = int(resources.get("GPU", 0)) if gpus else int(resources.get("CPU", 1)) // search.cpus_per_trial
    concurrency = search.max_concurrent_trials or max(1, capacity)
    remote = "://" in plan.storage_uri
    if search.study_storage:
        study_storage, keep_with = search.study_storage, None
    elif remote:
        study_storage, keep_with = (
            f"sqlite:///{local_study(plan.experiment_uri, resume=resume)}",
            plan.experiment_uri,
        )
    else:
        study_storage, keep_with = f"sqlite:///{plan.experiment_uri}/optuna.db", None
    searcher = OptunaSearch(
        points_to_evaluate=config.initial_points or None,
        sampler=optuna.samplers.TPESampler(seed=search.seed),
    )
    mirror = StudyMirror(
        storage=study_storage,
        study_name=plan.experiment,
        space=search.space,
        max_steps=config.train.max_steps,
        keep_with=keep_with,
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
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, settings=plan.trial), {"cpu": search.cpus_per_trial, "gpu": gpus}
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
                num_to_keep=2, checkpoint_score_attribute=METRIC, checkpoint_score_order=MODE
            ),
            failure_config=tune.FailureConfig(max_failures=search.max_failures),
        ),
    )


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


def start_experiment(plan: SweepPlan) -> None:
    """Write sweep.json, before Ray starts: storage that cannot be written to stops the sweep here."""
    summary = {"config": dataclasses.asdict(plan.config), **plan.summary}
    try:
        write_table_json(plan.experiment_uri, "sweep.json", summary)
    except OSError as err:
        raise ConfigError(
            f"storage_path={plan.config.storage_path!r}: cannot write {plan.experiment_uri}/sweep.json ({err}). "
            "Check that the bucket exists and the credentials may write to it; for an S3-compatible store "
            "set AWS_ENDPOINT_URL (docs/cluster.md)"
        ) from err


def run_sweep(plan: SweepPlan, *, resume: bool = False) -> str:
    """Run (or resume) the sweep of an experiment that start_experiment began; returns where
    results.parquet is."""
    import ray

    if "://" not in plan.storage_uri:
        os.makedirs(plan.experiment_uri, exist_ok=True)  # the SQLite study is made there
    ray.init(ignore_reinit_error=True)
    grid = build_tuner(plan, resume=resume).fit()
    table = collect_results(grid, plan.config)
    path = write_table(table, plan.experiment_uri, "results.parquet")
    print(format_summary(table, path), flush=True)
    if plan.config.report.enabled:
        run_report(plan)
    return path


def run_report(plan: SweepPlan) -> None:
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


def write_table_json(experiment_uri: str, name: str, data: dict[str, Any]) -> None:
    from sweeps.results import write_bytes

    write_bytes(experiment_uri, name, json.dumps(data, indent=2, default=str).encode())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sweeps.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="local", help="a name in sweeps/configs/ or a YAML path")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted sweep: the newest of this config, or the one named by experiment=NAME",
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=50")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        plan = prepare_sweep(config)
        if args.resume:
            uri = find_experiment(config)
            storage, _, name = uri.rpartition("/")
            plan = dataclasses.replace(plan, experiment=name, storage_uri=storage)
            check_resumable(plan)
        else:
            start_experiment(plan)
    except (ConfigError, DataError, ModelError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    data = plan.summary["data"]
    print(
        f"experiment {plan.experiment_uri}\n"
        f"model {plan.summary['model_path']}\n"
        f"data: {data['train_examples']} train / {data['eval_examples']} eval examples, "
        f"{data['truncated']['train']} train and {data['truncated']['eval']} eval cut at "
        f"data.max_length={config.data.max_length}, {data['dropped']['train'] + data['dropped']['eval']} dropped "
        "(nothing left to learn after the cut)",
        flush=True,
    )
    run_sweep(plan, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
