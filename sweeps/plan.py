"""Planning a sweep: check the config against the model, prepare the trials' inputs once, and, for
--resume, find the interrupted experiment and make sure it is the same sweep.

    plan = plan_sweep(load_config("local"))                     # a new experiment
    plan = resume_plan(plan_sweep(load_config("local")))         # the newest experiment of this config

Everything here runs before Ray starts; a problem raises ConfigError or DataError naming the key, file or
line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.experiment import (
    STUDY,
    experiment_names,
    is_remote,
    join,
    read_file,
    read_summary,
)
from sweeps.baselines import StartingPoint, model_learning_rate
from sweeps.config import ConfigError, SweepConfig, validate_config
from trainable.faults import ENV as FAULTS_ENV
from trainable.faults import Fault, parse_faults
from trainable.hardware import describe_environment, environment_changes
from trainable.model import cache_dir, load_module_names, resolve_model, resolve_target_modules
from trainable.outcome import DESCRIPTIONS
from trainable.prepare import TrialSettings, prepare_trial
from trainable.schema import SweepSummary


@dataclass(frozen=True)
class SweepPlan:
    """A checked sweep, ready for Ray: the config plus what was resolved from it."""

    config: SweepConfig
    experiment: str  # the experiment folder's name
    storage_uri: str  # where experiment folders live: an absolute local path or a storage URI
    trial: TrialSettings
    summary: SweepSummary  # the config and what was resolved (model path, data counts, template): sweep.json
    points: list[StartingPoint]  # the baselines and initial points, run first (SweepConfig.starting_points)

    @property
    def experiment_uri(self) -> str:
        return join(self.storage_uri, self.experiment)


def plan_sweep(config: SweepConfig, *, faults: tuple[Fault, ...] = ()) -> SweepPlan:
    """Resolve the model; calibrate the learning rate to its width (the calibrated baseline, and the space's
    bounds written relative to it); check every target_modules value against it; load and tokenize the data."""
    model_path = resolve_model(config.model.name_or_path)
    try:
        calibrated_lr = model_learning_rate(model_path, config.model)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    config = validate_config(
        dataclasses.asdict(config),
        origin=f"config (learning rate calibrated to {calibrated_lr:.3g})",
        calibrated_lr=calibrated_lr,
    )
    points = config.starting_points(calibrated_lr)
    available = load_module_names(model_path, config.model)
    check_target_modules(config, available, points)
    prepared = prepare_trial(
        model=config.model,
        data=config.data,
        train=config.train,
        default_hparams=config.lora,
        cpus=config.search.cpus_per_trial,
        faults=faults,
    )
    summary = SweepSummary(
        config=dataclasses.asdict(config),
        fingerprint=fingerprint(config, prepared.settings, points),
        model_path=prepared.settings.model_path,
        chat_template=prepared.chat_template,
        linear_modules=sorted(available),
        data=prepared.data,
        environment=describe_environment(config.model.compute_dtype),
        calibrated_learning_rate=calibrated_lr,
    )
    return SweepPlan(
        config, config.experiment_name(), config.storage_uri(), prepared.settings, summary, points
    )


def faults_from_environment() -> tuple[Fault, ...]:
    """The faults to inject (tests of the fault handling only), read once here in the driver from
    QLORA_SWEEPS_FAULTS; a bad specification is a ConfigError before Ray starts."""
    try:
        return parse_faults(os.environ.get(FAULTS_ENV, ""))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_target_modules(config: SweepConfig, available: set[str], points: list[StartingPoint]) -> None:
    """Every target_modules value the sweep may use (defaults, space, points) must name linear layers of the
    model; all problems at once."""
    targets = {("lora.target_modules", config.lora.target_modules)}
    space_targets = config.search.space.get("target_modules", {}).get("choice", [])
    targets |= {("search.space.target_modules", t) for t in space_targets}
    targets |= {
        (f"search.initial_points[{i}].target_modules", p["target_modules"])
        for i, p in enumerate(config.search.initial_points)
        if "target_modules" in p
    }
    targets |= {
        (
            f"search.baselines: {p.baseline} ({DESCRIPTIONS[p.baseline]}'s target_modules)",
            p.values["target_modules"],
        )
        for p in points
        if p.origin == "baseline" and "target_modules" in p.values
    }
    problems = []
    for key, spec in sorted(targets):
        try:
            resolve_target_modules(spec, available)
        except ValueError as err:
            problems.append(f"{key}: {err}")
    if problems:
        raise ConfigError("\n".join(problems))


def fingerprint(config: SweepConfig, trial: TrialSettings, points: list[StartingPoint]) -> dict[str, str]:
    """Hashes of what a resumed sweep must share with the interrupted one, part by part."""

    def digest(value: Any) -> str:
        # 16 hex digits (64 bits): plenty to tell one user's sweeps apart, short enough to read in sweep.json.
        return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]

    search = config.search
    # The re-checks join the hash only when on, so that sweeps without them keep their earlier fingerprint.
    rechecks = [search.recheck_top, search.recheck_seeds] if search.recheck_top else []
    return {
        "model": digest([trial.model_path, dataclasses.asdict(config.model)]),
        "data": digest([trial.train_data, trial.eval_data]),
        "search space": digest([search.space, [p.values for p in points], search.num_samples, *rechecks]),
        "training settings": digest([dataclasses.asdict(config.train), dataclasses.asdict(config.lora)]),
    }


def find_experiment(config: SweepConfig) -> str:
    """The name of the experiment to resume: `experiment` when the config names one, else the newest of
    this config under its storage."""
    if config.experiment:
        return config.experiment
    names = experiment_names(config.storage_uri(), prefix=f"{config.name}-")
    if not names:
        raise ConfigError(f"--resume: no experiment of config {config.name!r} under {config.storage_uri()}")
    return names[-1]


def resume_plan(plan: SweepPlan) -> SweepPlan:
    """The plan pointed at the experiment to resume, after checking that it is the same sweep: the same
    model, data, search space and training settings as the interrupted one. The base model's eval loss
    measured by the interrupted sweep is kept, not measured again."""
    plan = dataclasses.replace(plan, experiment=find_experiment(plan.config))
    try:
        saved = read_summary(plan.experiment_uri)
    except FileNotFoundError as err:
        raise ConfigError(f"--resume: {plan.experiment_uri} holds no sweep.json; nothing to resume") from err
    except ValueError as err:
        raise ConfigError(f"--resume: {err}") from err
    changed = [
        part for part, value in plan.summary.fingerprint.items() if saved.fingerprint.get(part) != value
    ]
    if changed:
        raise ConfigError(
            f"--resume: the {', '.join(changed)} differ from those of {plan.experiment_uri}; a resumed sweep "
            "must be the same sweep. Rerun with the original config and overrides, or start a new experiment."
        )
    changes = environment_changes(saved.environment, plan.summary.environment)
    if changes:
        # Not refused: a library upgrade or another machine may be why the sweep was interrupted; said, so
        # that figures of trials before and after the resume are compared knowingly.
        print(
            f"warning: --resume: the environment differs from the one {plan.experiment} started in:\n  "
            + "\n  ".join(changes),
            flush=True,
        )
    if saved.base_eval_loss is not None:
        plan = with_base_eval_loss(plan, float(saved.base_eval_loss))
    return plan


def with_base_eval_loss(plan: SweepPlan, loss: float) -> SweepPlan:
    """The plan with the base model's eval loss in its trials' settings and in its summary (sweep.json)."""
    return dataclasses.replace(
        plan,
        trial=dataclasses.replace(plan.trial, base_eval_loss=loss),
        summary=dataclasses.replace(plan.summary, base_eval_loss=loss),
    )


def study_file(plan: SweepPlan, *, resume: bool) -> Path:
    """The SQLite file of the sweep's study, which needs a real filesystem: in the experiment folder when
    storage is local; else in the node's cache (QLORA_SWEEPS_CACHE or XDG_CACHE_HOME), from where the
    StudyMirror copies it into the experiment after each trial. There a new sweep starts without one (an
    earlier experiment of the same name may have left one), and a resumed sweep keeps the one it finds,
    else takes the copy kept in the experiment (resumed on another machine, or the cache was cleared)."""
    if not is_remote(plan.storage_uri):
        os.makedirs(plan.experiment_uri, exist_ok=True)
        return Path(plan.experiment_uri) / STUDY
    digest = hashlib.sha256(plan.experiment_uri.encode()).hexdigest()[:8]  # one name in two storages
    path = cache_dir() / "studies" / f"{plan.experiment}-{digest}" / STUDY
    path.parent.mkdir(parents=True, exist_ok=True)
    if not resume:
        path.unlink(missing_ok=True)
    elif not path.exists():
        # Killed before its first trial ended, the experiment holds no study yet: it starts empty.
        with contextlib.suppress(FileNotFoundError):
            path.write_bytes(read_file(plan.experiment_uri, STUDY))
    return path
