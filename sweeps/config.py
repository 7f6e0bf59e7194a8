"""Sweep configuration: one frozen dataclass tree, loaded from YAML, overridden with dotted keys.

    config = load_config("local", ["train.max_steps=50", "search.num_samples=4"])

Everything is checked here, before Ray starts: unknown keys, wrong types, values out of range and the
search space; all problems are collected and raised once as a ConfigError that names each key.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import math
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from analysis.settings import ReportSettings
from sweeps.baselines import BASELINES, QLORA_RECIPE, StartingPoint, calibrated_point
from sweeps.space import DEFAULT_SPACE, check_space, check_value, resolve_space
from trainable.outcome import DESCRIPTIONS, BaselineName
from trainable.search_space import Dimension, parse_dimension
from trainable.settings import (
    HYPERPARAMETERS,
    STRICT,
    DataSettings,
    Hyperparameters,
    ModelSettings,
    TrainSettings,
    apply_override,
    format_problems,
    parse_yaml,
    validation_problems,
)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A configuration that cannot run; the message lists every problem, one per line."""


@dataclass(frozen=True, config=STRICT)
class SearchSettings:
    num_samples: Annotated[int, Field(ge=1)] = 1  # trials in the sweep
    space: dict[str, dict[str, list[Any]]] = field(default_factory=lambda: dict(DEFAULT_SPACE))
    # The trials a sweep has to beat, run first, never stopped early, always among the report's finalists
    # (sweeps/baselines.py): QLoRA's recipe and the calibrated default, each restricted to the searched keys
    # (the others take the `lora` section's values). auto: both, or for a single-trial sweep the calibrated
    # default alone (the one trial is then the default a user would train). [] for none.
    baselines: Literal["auto"] | list[BaselineName] = "auto"
    # More hand-picked first trials, after the baselines; each must fit in num_samples.
    initial_points: list[dict[str, Any]] = field(default_factory=list)
    # Optuna's TPE sampler: the same seed (and results) give the same suggestions; another seed, another sweep.
    seed: int = 0
    # Finished trials (the recipe and initial points count) before TPE models the results; the trials until
    # then are sampled at random. 3, the fewest that TPE can split into good and bad, at any sweep size: the
    # time-to-best replay found the sweep faster the fewer start-up trials down to 3 (docs/search.md).
    startup_trials: Annotated[int, Field(ge=1)] = 3
    # The weight of TPE's prior (a broad density over the whole space) against the trials seen, in both its
    # "good" and "bad" models (Optuna's prior_weight, default 1). With few trials TPE's "good" model is the
    # single best trial, and at weight 1 it mostly suggests near copies of it; at 20 its candidates come from
    # the whole space and the one most like the good trials is taken. On the time-to-best replay: 0.50 of
    # random search's GPU time against 0.67 at weight 1 (1000 held-out seeds; docs/search.md).
    prior_weight: Annotated[float, Field(gt=0)] = 20.0
    # Seed re-checks (sweeps/recheck.py): after the search, the recheck_top best configurations are trained
    # again with recheck_seeds new seeds each (train.seed + 1, + 2, ...), on top of num_samples, so that the
    # leaderboard can rank configurations by their mean over seeds. 0: off.
    recheck_top: Annotated[int, Field(ge=0)] = 0
    recheck_seeds: Annotated[int, Field(ge=0)] = 0
    # ASHA stops trials whose eval loss trails at a rung; "auto" turns it on for sweeps of 2+ trials.
    scheduler: Literal["auto", "asha", "none"] = "auto"
    # Evaluations every trial gets before it may be stopped. With 1 the replay's rungs fell on noisy early
    # evaluations that stopped its best configuration: 21% of seeds never reached the band, 6% with 2.
    grace_period: Annotated[int, Field(ge=1)] = 2
    # The best quarter at a rung goes on (Ray Tune's own default; was 3): on the time-to-best replay,
    # faster than 3 on 125 seeds and slower on 37 of 400 (docs/search.md).
    reduction_factor: Annotated[int, Field(ge=2)] = 4
    # Trials at once; None: as many as the cluster's resources allow (one GPU, or cpus_per_trial, each).
    max_concurrent_trials: Annotated[int, Field(ge=1)] | None = None
    cpus_per_trial: Annotated[int, Field(ge=1)] = 2
    # How long the driver waits for an autoscaler to add a node that can hold a trial when none can now
    # (sweeps/capacity.py); a cluster that cannot grow is refused at once. A new GPU node of cluster.yaml
    # takes about 10 minutes to boot and install: twice that before giving up.
    resource_wait_s: Annotated[int, Field(ge=0)] = 1200
    gpus_per_trial: Literal["auto", 0, 1] = "auto"  # auto: 1 if the cluster has GPUs, else CPU trials
    # Trials sharing one GPU, each its own process with 1/N of the card (Ray's fractional GPUs). auto: as
    # many as the largest configuration of the space fits, by its memory estimate (sweeps/resources.py).
    trials_per_gpu: Literal["auto"] | Annotated[int, Field(ge=1, le=64)] = "auto"
    # The GPU's memory; None: read from the driver's GPU, or from a GPU worker. Set on a CPU sweep, it
    # turns the memory check on as if the trials ran on such a GPU.
    gpu_memory_gib: Annotated[float, Field(gt=0)] | None = None
    price_per_gpu_hour: Annotated[float, Field(ge=0)] | None = None  # dollars; None: no dollar figures
    # Launch no new trial once the trials' GPU-hours (CPU sweeps: trial-hours) reach this; None: no cap.
    budget_gpu_hours: Annotated[float, Field(gt=0)] | None = None
    max_failures: Annotated[int, Field(ge=0)] = 2  # retries of a crashed trial, from its last checkpoint
    # Run the next trial in the worker process of one that ended (Tune's reuse_actors), where that is safe:
    # a new process costs its start and imports each time (docs/cost.md#trial-start).
    reuse_workers: bool = True
    # Optuna's study storage (an RDB URL); default: a SQLite file in the experiment folder.
    study_storage: str | None = None
    loggers: list[Literal["tensorboard", "mlflow", "wandb"]] = field(default_factory=list)


@dataclass(frozen=True, config=STRICT)
class SweepConfig:
    name: str
    # A local folder (relative to the current directory) or a URI pyarrow understands (s3://, gs://).
    storage_path: str = "experiments"
    experiment: str | None = None  # the experiment's folder name; default: <name>-<UTC timestamp>
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    lora: Hyperparameters = field(default_factory=Hyperparameters)  # values of those not searched
    search: SearchSettings = field(default_factory=SearchSettings)
    report: ReportSettings = field(default_factory=ReportSettings)

    @property
    def baseline_names(self) -> list[BaselineName]:
        """search.baselines, with "auto" resolved for this sweep's size."""
        if self.search.baselines != "auto":
            return list(self.search.baselines)
        return list(BASELINES) if self.search.num_samples > 1 else ["calibrated"]

    def starting_points(self, calibrated_lr: float | None) -> list[StartingPoint]:
        """The trials the searcher runs before it samples: the baselines (each restricted to the searched
        keys; one that sets none of them is left out), then search.initial_points, each completed with the
        `lora` section's values. `calibrated_lr`: the model's calibrated learning rate (sweeps.baselines);
        None before the model is known (the calibrated baseline's learning rate is then NaN)."""
        points = []
        for name in self.baseline_names:
            values = QLORA_RECIPE if name == "qlora" else calibrated_point(calibrated_lr or math.nan)
            searched = {k: v for k, v in values.items() if k in self.search.space}
            if searched:
                points.append(StartingPoint("baseline", self.complete(searched), baseline=name))
        return points + [StartingPoint("initial", self.complete(p)) for p in self.search.initial_points]

    def complete(self, point: dict[str, Any]) -> dict[str, Any]:
        """A point with every searched key: those it leaves out take the `lora` section's value, the one a
        trial uses for a key nobody searches (Tune's searcher needs a value for each)."""
        left_out = [key for key in self.search.space if key not in point and key in HYPERPARAMETERS]
        return {**{key: getattr(self.lora, key) for key in left_out}, **point}

    def experiment_name(self, now: datetime.datetime | None = None) -> str:
        stamp = (now or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y%m%d-%H%M%S")
        return self.experiment or f"{self.name}-{stamp}"

    def storage_uri(self) -> str:
        """storage_path made absolute: Ray workers run in other directories."""
        if "://" in self.storage_path:
            return self.storage_path
        return str(Path(self.storage_path).expanduser().resolve())


def find_config(name_or_path: str) -> Path:
    """A config file by path, or by name in sweeps/configs/ ("local" -> sweeps/configs/local.yaml)."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"--config: no file {path}")
        return path.resolve()
    named = CONFIG_DIR / f"{name_or_path}.yaml"
    if not named.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"--config: no config named {name_or_path!r}; known: {known}, or give a YAML path")
    return named


def load_config(name_or_path: str = "local", overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    path = find_config(name_or_path)
    try:
        data = parse_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    search = data.setdefault("search", {})
    if isinstance(search, dict) and "space" not in search:
        # Spelled out so that an override of one parameter (search.space.r.choice=[8]) keeps the others.
        search["space"] = copy.deepcopy(DEFAULT_SPACE)
    for override in overrides:
        try:
            apply_override(data, override)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return validate_config(data, origin=str(path))


def validate_config(
    data: dict[str, Any], *, origin: str = "config", calibrated_lr: float | None = None
) -> SweepConfig:
    """The config in `data`, checked; ConfigError listing every problem. `calibrated_lr` (the model's, known
    once the driver has resolved the model: sweeps.plan) turns learning-rate bounds written relative to it
    into numbers and checks the calibrated baseline against the space; without it those are checked for
    their form only."""
    search_data = data.get("search")
    if isinstance(search_data, dict) and "start_with_qlora_recipe" in search_data:
        raise ConfigError(
            format_problems(
                origin,
                [
                    "search.start_with_qlora_recipe: replaced by search.baselines, the trials a sweep has to beat "
                    f"(default auto: [{', '.join(BASELINES)}]); write search.baselines=[qlora] for the QLoRA recipe alone, "
                    "search.baselines=[] for none"
                ],
            )
        )
    try:
        config = TypeAdapter(SweepConfig).validate_python(data)
    except ValidationError as err:
        raise ConfigError(format_problems(origin, validation_problems(err))) from None
    space, problems = resolve_space(config.search.space, calibrated_lr)
    if calibrated_lr is not None:
        config = dataclasses.replace(config, search=dataclasses.replace(config.search, space=space))
    relative = set(config.search.space) - set(space)  # bounds relative to a rate not known yet
    problems += check_space(space)
    bad = {p.split(":")[0].split(".")[2] for p in problems}
    # The well-formed ones, to check the starting points against.
    dimensions = {
        name: dimension
        for name, spec in space.items()
        if name not in bad and isinstance(dimension := parse_dimension(name, spec), Dimension)
    }
    train = config.train
    if train.eval_every > train.max_steps:
        problems.append(
            f"train.eval_every: {train.eval_every} is more than train.max_steps={train.max_steps}; "
            "a trial would report once, at the end, and the scheduler could not compare trials"
        )
    points = config.starting_points(calibrated_lr)
    # Each point is named as the user wrote it: a baseline by its name, the others by their own index.
    initial = iter(range(len(config.search.initial_points)))
    for point in points:
        if point.origin == "baseline":
            label = f"search.baselines: {point.baseline} ({DESCRIPTIONS[point.baseline]}'s {{}})"
            defined = QLORA_RECIPE if point.baseline == "qlora" else calibrated_point(math.nan)
            given = {name: value for name, value in point.values.items() if name in defined}
        else:
            index = next(initial)
            label = f"search.initial_points[{index}].{{}}"
            given = config.search.initial_points[index]
        for name, value in point.values.items():
            key = label.format(name)
            unknown = isinstance(value, float) and math.isnan(value)  # the calibrated rate, not known yet
            if name not in config.search.space:
                problems.append(f"{key}: not in search.space ({', '.join(config.search.space)})")
            elif unknown or name in relative or name not in dimensions:
                continue  # not known yet, relative to what is not known yet, or a problem said above
            elif not dimensions[name].contains(value):
                problems.append(
                    f"{key}: {value!r} lies outside search.space.{name}"
                    if name in given
                    else f"{key}: left out, so lora.{name} ({value!r}), which lies outside search.space.{name}; "
                    f"give {name} in the point or set lora.{name}"
                )
            else:
                problems += [f"{key}: {p}" for p in check_value(name, value)]
    if len(points) > config.search.num_samples:
        baselines = sum(p.origin == "baseline" for p in points)
        problems.append(
            f"search.initial_points: {baselines} baseline(s) and {len(config.search.initial_points)} point(s) "
            f"need search.num_samples >= {len(points)}, got {config.search.num_samples}; the last would never "
            "run. Raise search.num_samples or drop points" + (" (or baselines)" if baselines else "")
        )
    search = config.search
    if (search.recheck_top == 0) != (search.recheck_seeds == 0):
        problems.append(
            f"search.recheck_top={search.recheck_top}, search.recheck_seeds={search.recheck_seeds}: seed "
            "re-checks need both (configurations to re-check and new seeds for each), or both 0 for none"
        )
    if search.recheck_top > search.num_samples:
        problems.append(
            f"search.recheck_top: {search.recheck_top} is more than search.num_samples={search.num_samples}; "
            "the search has no more configurations to re-check"
        )
    if config.search.scheduler == "asha" and config.search.num_samples < 2:
        problems.append("search.scheduler: asha needs search.num_samples >= 2; use 'auto' or 'none'")
    if "://" in config.storage_path and "?" in config.storage_path:
        # Experiment and trial folders are joined onto storage_path, which a query string would end up in.
        problems.append(
            f"storage_path: {config.storage_path!r} has a query string; give the bucket and prefix only and "
            "set an S3-compatible store's endpoint with AWS_ENDPOINT_URL (docs/cluster.md)"
        )
    if problems:
        raise ConfigError(format_problems(origin, problems))
    return config
