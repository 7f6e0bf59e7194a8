"""Time to best: how much GPU time each search method needs to hold a good adapter, replayed on a table.

    python -m bench.search.replay points --trials 32 --seed 0   # the configurations bench/search/table.yaml records
    python -m sweeps.run --config bench/search/table.yaml   # record them on a GPU host (every trial to the end)
    python -m bench.search.replay table experiments/table-<stamp> \
        --out bench/search/results/table-smollm2-<date>.jsonl
    python -m bench.search.replay table experiments/table-<stamp> experiments/table-smollm2-b-<stamp> \
        --out ...   # 64 rows
    python -m bench.search.replay replay bench/search/results/table-smollm2-<date>.jsonl --seeds 20 \
        --first-seed 3000 --out bench/search/results/replay-smollm2-<date>-tuned.jsonl --plot docs/time-to-best.png
    python -m bench.search.replay replay bench/search/results/table-smollm2-<date>.jsonl \
        --methods tpe+asha random --search startup_trials=8 reduction_factor=3 --out ...   # a variant of the defaults
    python -m bench.search.replay replay ... --seeds 300 --engine direct   # the same curves without Tune, ~0.1 s each

The tabular-benchmark method of HPO research (HPOBench, NAS-Bench): train a fixed set of configurations
once, with the eval loss at every evaluation and its GPU time, then run each search method many times
against that table with a Tune trainable that looks the results up instead of training. A replay costs
seconds of CPU, so every method gets many seeds under the same trial budget; tune defaults on some seeds
and report on others (--first-seed).

The methods search the table's own space (the sweep's default), and each suggested point is mapped to the
nearest recorded configuration: numbers by their position in their range (log scale for loguniform, the
index for a numeric choice), other choices by equal or not. We keep the real space rather than a
categorical over the table's rows because the benchmark is about TPE's behaviour on the space a user
sweeps (its priors, ranges and startup trials); a categorical over 32 unordered rows would be a different
problem in which TPE cannot use the structure it exists to learn. The price: a point maps to the row
whose configuration is closest, so the table's resolution bounds what any method can find, and all
methods share that bound. It also bounds what TPE can learn, which random search does not try to: its
proposals next to the best so far fall on the rows already run (with Optuna's prior weight of 1, about
60% of its trials on the 32-row table; 21% on the 64-row table with the default's 20, random search 25%),
and a row run again reports the same losses, so it tells TPE nothing new (docs/speed.md).

A method's cost is the sum of the recorded GPU-seconds of the evaluations its trials actually ran: a
trial that ASHA stopped after its second evaluation costs its first two. Trials run one at a time
(max_concurrent_trials=1), so the order of events, ASHA's decisions and the cumulative GPU time are the
same on every replay of a seed; in a real sweep several trials run at once, but on a fixed number of GPUs
the GPU time the search spends is the same sum.

The searchers and the scheduler come from the driver's own builders (sweeps.search.build_searcher,
build_scheduler), so a change to the defaults changes the replay of "tpe+asha". `--engine direct` drives
those same objects by hand, as Tune calls them with one trial at a time, and gives Tune's curves exactly
(tested); it is how variants are compared over hundreds of seeds on a laptop.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from trainable.outcome import METRIC, MODE
from trainable.search_space import parse_space

Method = Literal["tpe+asha", "tpe", "random", "random+asha"]
METHODS: tuple[Method, ...] = get_args(Method)
DEFAULT_METHOD: Method = "tpe+asha"  # the project's default: the driver's searcher and scheduler
BAND = 0.02  # "within 2% of the best eval loss in the table"


@dataclasses.dataclass(frozen=True)
class TableRow:
    """One recorded configuration: its hyperparameters, the eval loss at each evaluation and the GPU-seconds
    each evaluation's share of the trial took (the first includes the trial's start)."""

    hyperparameters: dict[str, Any]
    eval_loss: list[float]
    eval_seconds: list[float]

    def to_json(self) -> dict[str, Any]:
        return {"kind": "row", **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TableRow:
        return cls(
            hyperparameters=dict(data["hyperparameters"]),
            eval_loss=[float(x) for x in data["eval_loss"]],
            eval_seconds=[float(x) for x in data["eval_seconds"]],
        )


@dataclasses.dataclass(frozen=True)
class Table:
    """The recorded table: the space it was sampled from, where it came from, and its rows."""

    space: dict[str, dict[str, list[Any]]]
    rows: list[TableRow]
    source: str = ""  # the experiment it was made from
    model: str = ""
    # The model's calibrated learning rate (sweeps.baselines), for the calibrated baseline the default sweep
    # runs first; None in tables recorded before it existed (then computed from the model's config).
    calibrated_learning_rate: float | None = None

    @property
    def reports(self) -> int:
        return len(self.rows[0].eval_loss)

    @property
    def best_loss(self) -> float:
        return min(min(row.eval_loss) for row in self.rows)


def write_table(table: Table, path: str | Path) -> None:
    header = {
        "kind": "table",
        "space": table.space,
        "source": table.source,
        "model": table.model,
        "calibrated_learning_rate": table.calibrated_learning_rate,
    }
    lines = [json.dumps(header), *(json.dumps(row.to_json()) for row in table.rows)]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def load_table(path: str | Path) -> Table:
    """A table written by `write_table`; every row must have the same number of evaluations."""
    lines = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines or lines[0].get("kind") != "table":
        raise ValueError(f"{path}: line 1 must be the table's header ({{'kind': 'table', 'space': ...}})")
    rows = [TableRow.from_json(line) for line in lines[1:]]
    if not rows:
        raise ValueError(f"{path}: no rows")
    for number, row in enumerate(rows, start=2):
        if len(row.eval_loss) != len(rows[0].eval_loss) or len(row.eval_seconds) != len(row.eval_loss):
            raise ValueError(
                f"{path}:{number}: {len(row.eval_loss)} losses and {len(row.eval_seconds)} times; every row "
                f"needs {len(rows[0].eval_loss)} of each (one per evaluation)"
            )
    return Table(
        space=lines[0]["space"],
        rows=rows,
        source=lines[0]["source"],
        model=lines[0]["model"],
        calibrated_learning_rate=lines[0].get("calibrated_learning_rate"),
    )


def table_from_experiment(path: str | Path) -> Table:
    """The table from a recording sweep's folder: its completed trials (a trial that ran out of memory or
    crashed has no curve to replay; the command prints how many were left out)."""
    from analysis.experiment import load_experiment

    experiment = load_experiment(path)
    space = experiment.summary.section("search")["space"]
    results = experiment.results
    done = results[results["status"] == "completed"]
    rows = []
    for _, trial in done.iterrows():
        history = [float(x) for x in trial["eval_history"]]
        # GPU-seconds of the trial, spread evenly over its evaluations: the table has no finer timing. A table
        # recorded on CPUs (no GPU-seconds) takes each trial's wall time, its cost on the same machine.
        seconds = float(trial["gpu_seconds"]) or float(trial["wall_time_s"])
        rows.append(
            TableRow(
                hyperparameters={name: _plain(trial[name]) for name in space},
                eval_loss=history,
                eval_seconds=[seconds / len(history)] * len(history),
            )
        )
    if len(done) < len(results):
        print(f"left out {len(results) - len(done)} trial(s) that did not complete", file=sys.stderr)
    return Table(
        space=space,
        rows=rows,
        source=str(path),
        model=experiment.model_settings.name_or_path,
        calibrated_learning_rate=experiment.summary.calibrated_learning_rate,
    )


def merge_tables(tables: Sequence[Table]) -> Table:
    """One table from several recordings of the same space and evaluations (a table made denser later)."""
    first = tables[0]
    for other in tables[1:]:
        if other.space != first.space:
            raise ValueError(
                f"{other.source}: its space differs from {first.source}'s; a table has one space"
            )
        if other.reports != first.reports:
            raise ValueError(
                f"{other.source}: {other.reports} evaluations a trial, {first.source}: {first.reports}; "
                "a table's rows all have the same number"
            )
    return dataclasses.replace(
        first,
        rows=[row for table in tables for row in table.rows],
        source=" + ".join(t.source for t in tables),
    )


def _plain(value: Any) -> Any:
    """A numpy scalar from a parquet row as the Python value the space spells."""
    return value.item() if hasattr(value, "item") else value


def sample_points(space: Mapping[str, Mapping[str, list[Any]]], n: int, *, seed: int) -> list[dict[str, Any]]:
    """`n` configurations spread over `space` by a Latin hypercube (each parameter's range cut into `n`
    strata, one point in each), seeded; learning rates rounded to 3 significant digits for the YAML."""
    from scipy.stats import qmc

    names = list(space)
    unit = qmc.LatinHypercube(d=len(names), seed=seed).random(n)
    points = []
    for u in unit:
        point: dict[str, Any] = {}
        for name, x in zip(names, u, strict=True):
            kind, values = next(iter(space[name].items()))
            if kind == "choice":
                point[name] = values[min(int(x * len(values)), len(values) - 1)]
            elif kind == "randint":
                point[name] = int(
                    values[0] + min(int(x * (values[1] - values[0])), values[1] - values[0] - 1)
                )
            else:
                low, high = values
                value = (
                    math.exp(math.log(low) + x * math.log(high / low))
                    if kind == "loguniform"
                    else low + x * (high - low)
                )
                point[name] = min(max(float(f"{value:.3g}"), low), high)
        points.append(point)
    return points


def normalize(space: Mapping[str, Mapping[str, list[Any]]], point: Mapping[str, Any]) -> dict[str, Any]:
    """Each parameter of `point` in [0, 1] by its place in its range; non-numeric choices stay as they are."""
    out: dict[str, Any] = {}
    for name, spec in space.items():
        kind, values = next(iter(spec.items()))
        value = point[name]
        if kind == "choice":
            numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
            out[name] = (
                values.index(value) / max(len(values) - 1, 1) if numeric and value in values else value
            )
        elif kind == "loguniform":
            out[name] = math.log(value / values[0]) / math.log(values[1] / values[0])
        else:
            out[name] = (value - values[0]) / (values[1] - values[0])
    return out


def nearest_row(table: Table, point: Mapping[str, Any]) -> int:
    """The index of the recorded configuration closest to `point` (the first of equals)."""
    target = normalize(table.space, point)

    def distance(row: TableRow) -> float:
        here = normalize(table.space, row.hyperparameters)
        total = 0.0
        for name, value in target.items():
            if isinstance(value, float | int) and isinstance(here[name], float | int):
                total += (value - here[name]) ** 2
            else:
                total += 0.0 if value == here[name] else 1.0
        return total

    return min(range(len(table.rows)), key=lambda i: distance(table.rows[i]))


def replay_trial(config: dict[str, Any], *, table: Table) -> None:
    """A Tune trainable that trains nothing: it reports the nearest recorded row's eval loss at each
    evaluation, with that evaluation's recorded GPU-seconds, until the scheduler stops it."""
    from ray import tune

    row = nearest_row(table, config)
    for loss, seconds in zip(table.rows[row].eval_loss, table.rows[row].eval_seconds, strict=True):
        tune.report({METRIC: loss, "row": row, "gpu_seconds": seconds})


@dataclasses.dataclass(frozen=True)
class Curve:
    """One replay: every evaluation that ran, in order, with the cumulative GPU-seconds after it."""

    method: Method
    seed: int
    rows: list[int]  # the table row of each trial, in the order the trials ran
    evaluations: list[int]  # how many evaluations each trial ran before it ended or was stopped
    losses: list[float]  # the eval loss each evaluation reported
    gpu_seconds: list[float]  # cumulative, after each evaluation
    best_loss: list[float]  # best eval loss so far, after each evaluation

    def time_to(self, threshold: float) -> float:
        """GPU-seconds until the best-so-far loss is at most `threshold`; inf if it never is."""
        return next(
            (s for s, b in zip(self.gpu_seconds, self.best_loss, strict=True) if b <= threshold), math.inf
        )


Engine = Literal["tune", "direct"]
ENGINES: tuple[Engine, ...] = get_args(Engine)


def search_objects(
    table: Table, *, method: Method, seed: int, trials: int, settings: Mapping[str, Any] | None = None
) -> tuple[Any, Any]:
    """The searcher and scheduler (or None) a method runs with, built as the driver builds them;
    `settings` overrides fields of the driver's SearchSettings (startup_trials, grace_period, ...)."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    # The driver imports the real trainable (and torch) at module level; only this driver-side function
    # needs it, so the lookup trainable's workers stay torch-free.
    from sweeps.config import SearchSettings, SweepConfig
    from sweeps.search import build_scheduler, build_searcher

    # The driver's defaults (grace period, reduction factor, the baselines first) for every method.
    search = SearchSettings(
        num_samples=trials,
        space=table.space,
        seed=seed,
        scheduler="asha" if method.endswith("+asha") else "none",
        **(settings or {}),
    )
    baselines: list[dict[str, Any]] = []
    if method.startswith("tpe"):
        # The default sweep's first points (its baselines, each where it lies in the space), then TPE.
        config = SweepConfig(name="replay", search=search)
        points = [
            p for p in config.starting_points(table_learning_rate(table)) if _in_space(p.values, table.space)
        ]
        baselines = [p.values for p in points if p.origin == "baseline"]
        searcher = build_searcher(search, [p.values for p in points])
    else:
        searcher = OptunaSearch(sampler=optuna.samplers.RandomSampler(seed=seed))
    return searcher, build_scheduler(search, reports=table.reports, baselines=baselines)


def table_learning_rate(table: Table) -> float:
    """The table's model's calibrated learning rate: recorded in the table, else from the model's config."""
    if table.calibrated_learning_rate is not None:
        return table.calibrated_learning_rate
    from sweeps.baselines import model_learning_rate
    from trainable.model import resolve_model
    from trainable.settings import ModelSettings

    return model_learning_rate(resolve_model(table.model), ModelSettings(name_or_path=table.model))


def _in_space(point: Mapping[str, Any], space: Mapping[str, Any]) -> bool:
    dimensions = parse_space(space)
    return all(dimensions[name].contains(value) for name, value in point.items() if name in dimensions)


def replay(
    table: Table,
    *,
    method: Method,
    seed: int,
    trials: int,
    settings: Mapping[str, Any] | None = None,
    engine: Engine = "tune",
) -> Curve:
    """Run one search method against the table, as the driver would build it: through Tune, or with
    engine="direct" the same searcher and scheduler driven by hand (`replay_direct`)."""
    if engine == "direct":
        return replay_direct(table, method=method, seed=seed, trials=trials, settings=settings)
    from ray import tune

    from sweeps.space import to_tune_space

    searcher, scheduler = search_objects(table, method=method, seed=seed, trials=trials, settings=settings)
    with tempfile.TemporaryDirectory(prefix="replay-") as storage:
        grid = tune.Tuner(
            tune.with_parameters(replay_trial, table=table),
            param_space=to_tune_space(table.space),
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode=MODE,
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=trials,
                max_concurrent_trials=1,
                reuse_actors=True,  # a lookup has no state to leak between trials; a new process costs ~1 s
            ),
            run_config=tune.RunConfig(name=f"{method}-{seed}", storage_path=storage, verbose=0),
        ).fit()
        # In the order Tune created the trials, which ran one at a time.
        histories = [grid[i].metrics_dataframe for i in range(len(grid))]
        errors = [grid[i].error for i in range(len(grid))]
    ran: list[tuple[int, list[float], list[float]]] = []
    for number, history in enumerate(histories):
        if history is None or not len(history):
            raise RuntimeError(f"{method} seed {seed}: trial {number} reported nothing ({errors[number]})")
        ran.append((int(history["row"].iloc[0]), list(history[METRIC]), list(history["gpu_seconds"])))
    return _curve(method, seed, ran)


def replay_direct(
    table: Table, *, method: Method, seed: int, trials: int, settings: Mapping[str, Any] | None = None
) -> Curve:
    """The replay without Tune: the same searcher and scheduler objects, called as Tune calls them when
    one trial runs at a time (suggest; the scheduler's decision and the searcher's record after each
    result; both told when the trial ends, with its last result). No Ray worker, no trial folder, so a
    replay takes about 0.1 s instead of several; tests/bench/test_replay.py checks it gives Tune's
    curves exactly. For tuning the defaults over hundreds of seeds."""
    from ray.tune.schedulers import TrialScheduler

    from sweeps.space import to_tune_space

    searcher, scheduler = search_objects(table, method=method, seed=seed, trials=trials, settings=settings)
    searcher.set_search_properties(METRIC, MODE, to_tune_space(table.space))
    if scheduler is not None:
        scheduler.set_search_properties(METRIC, MODE)
    ran: list[tuple[int, list[float], list[float]]] = []
    for number in range(trials):
        trial_id = f"{number:05d}"
        config = searcher.suggest(trial_id)
        trial = _LookupTrial(trial_id, config)
        if scheduler is not None:
            scheduler.on_trial_add(None, trial)
        row = nearest_row(table, config)
        losses: list[float] = []
        result: dict[str, Any] = {}
        for loss in table.rows[row].eval_loss:
            losses.append(loss)
            result = {METRIC: loss, "training_iteration": len(losses), "row": row}
            decision = (
                scheduler.on_trial_result(None, trial, result) if scheduler else TrialScheduler.CONTINUE
            )
            searcher.on_trial_result(trial.trial_id, result)
            if decision == TrialScheduler.STOP:
                break
        if scheduler is not None:
            scheduler.on_trial_complete(None, trial, result)
        searcher.on_trial_complete(trial.trial_id, result=result)
        ran.append((row, losses, table.rows[row].eval_seconds[: len(losses)]))
    return _curve(method, seed, ran)


@dataclasses.dataclass(frozen=True)
class _LookupTrial:
    """What Tune's searcher and scheduler read of a trial when driven by hand: its id and config."""

    trial_id: str
    config: dict[str, Any]


def _curve(method: Method, seed: int, ran: Sequence[tuple[int, Sequence[float], Sequence[float]]]) -> Curve:
    """The curve of trials run in order, each (its table row, the losses it reported, their GPU-seconds)."""
    rows, evaluations, losses, spent, best = [], [], [], [], []
    total, best_so_far = 0.0, math.inf
    for row, reported, seconds in ran:
        rows.append(row)
        evaluations.append(len(reported))
        for loss, cost in zip(reported, seconds, strict=True):
            total += float(cost)
            losses.append(float(loss))
            best_so_far = min(best_so_far, float(loss))
            spent.append(total)
            best.append(best_so_far)
    return Curve(method, seed, rows, evaluations, losses, spent, best)


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile by linear interpolation between order statistics (numpy's default), where a value
    next to an infinite one is infinite rather than NaN: a seed that never reached the band is slower
    than every seed that did."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low, high = ordered[math.floor(position)], ordered[math.ceil(position)]
    if math.isinf(high):
        return high
    return low + (position - math.floor(position)) * (high - low)


def summarize(curves: Sequence[Curve], *, best_loss: float, band: float = BAND) -> list[dict[str, Any]]:
    """Per method: GPU time to the band, within `band` of the best (median, quartiles and range over seeds;
    null where a seed never got there, which counts as infinitely long), and the default's median over
    random's."""
    threshold = best_loss * (1 + band)
    summary: list[dict[str, Any]] = []
    medians: dict[str, float] = {}
    for method in dict.fromkeys(c.method for c in curves):
        times = [c.time_to(threshold) for c in curves if c.method == method]
        medians[method] = statistics.median(times)
        finite = [t for t in times if math.isfinite(t)]
        summary.append(
            {
                "kind": "summary",
                "method": method,
                "seeds": len(times),
                "reached": len(finite),
                "threshold": threshold,
                "median_gpu_s": _finite(medians[method]),
                "q1_gpu_s": _finite(quantile(times, 0.25)),
                "q3_gpu_s": _finite(quantile(times, 0.75)),
                "min_gpu_s": min(finite) if finite else None,
                "max_gpu_s": _finite(max(times)),
            }
        )
    if DEFAULT_METHOD in medians and "random" in medians:
        ratio = medians[DEFAULT_METHOD] / medians["random"] if medians["random"] > 0 else math.nan
        low, high = ratio_interval(
            [c.time_to(threshold) for c in curves if c.method == DEFAULT_METHOD],
            [c.time_to(threshold) for c in curves if c.method == "random"],
        )
        summary.append(
            {
                "kind": "ratio",
                "of": DEFAULT_METHOD,
                "over": "random",
                "median_ratio": _finite(ratio),
                "interval_95": [_finite(low), _finite(high)],
            }
        )
    return summary


def ratio_interval(
    times: Sequence[float], baseline: Sequence[float], *, resamples: int = 2000
) -> tuple[float, float]:
    """A 95% bootstrap interval of median(times) / median(baseline): the seeds of each method resampled
    with replacement (seeded, so a replay file always gets the same interval). 2000 resamples: twice the
    1000 Efron and Tibshirani (1993) ask of a percentile interval. A resample in which neither median
    reaches the band has no ratio and is left out."""
    import numpy as np

    rng = np.random.default_rng(0)
    ours, theirs = np.array(times), np.array(baseline)
    ratios = []
    for _ in range(resamples):
        a = float(np.median(rng.choice(ours, len(ours))))
        b = float(np.median(rng.choice(theirs, len(theirs))))
        if not (math.isinf(a) and math.isinf(b)) and b > 0:
            ratios.append(a / b)
    if not ratios:
        return math.nan, math.nan
    return quantile(ratios, 0.025), quantile(ratios, 0.975)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def plot_curves(
    curves: Sequence[Curve], *, best_loss: float, path: str | Path, title: str, band: float = BAND
) -> None:
    """Best-so-far eval loss against GPU-hours: per method the median over seeds and the band between the
    quartiles (with many seeds, the min-max band shows only the luckiest and unluckiest seed). Zoomed on
    the approach to the band: up to 1.5x the best loss (the first trials' losses would flatten it) and 1.5x
    the latest third quartile of the methods' times to the band (after it, the curves are flat)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    threshold = best_loss * (1 + band)
    methods = dict.fromkeys(c.method for c in curves)
    late = [quantile([c.time_to(threshold) for c in curves if c.method == m], 0.75) for m in methods]
    end = max(c.gpu_seconds[-1] for c in curves)
    end = min(end, 1.5 * max((t for t in late if math.isfinite(t)), default=end))
    grid = np.linspace(0, end, 400)
    figure, axes = plt.subplots(figsize=(7, 4.2))
    for method in methods:
        ours = [c for c in curves if c.method == method]
        # A step function: the best loss held after the last evaluation at or before each point of the grid.
        values = np.array(
            [
                [
                    c.best_loss[i - 1]
                    if (i := int(np.searchsorted(c.gpu_seconds, x, side="right")))
                    else np.nan
                    for x in grid
                ]
                for c in ours
            ]
        )
        hours = grid / 3600
        with warnings.catch_warnings():  # before a seed's first evaluation its curve is NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            low, middle, high = np.nanpercentile(values, [25, 50, 75], axis=0)
        (line,) = axes.plot(hours, middle, label=f"{method} (median, quartiles of {len(ours)} seeds)")
        axes.fill_between(hours, low, high, color=line.get_color(), alpha=0.15)
    axes.axhline(threshold, color="gray", linestyle="--", linewidth=1, label=f"best in table + {band:.0%}")
    axes.set_ylim(best_loss * (1 - band), best_loss * 1.5)
    axes.set_xlabel("GPU-hours")
    axes.set_ylabel("best eval loss so far")
    axes.set_title(title)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# Search settings the replay sets itself: the trial budget, the table's space, the seed, the scheduler by method.
REPLAY_SETS = ("num_samples", "space", "seed", "scheduler")


def parse_settings(pairs: Sequence[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs (values in YAML: 4, true, null) as overrides of the driver's SearchSettings."""
    from sweeps.config import SearchSettings

    fields = {f.name for f in dataclasses.fields(SearchSettings)} - set(REPLAY_SETS)
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--search {pair}: give KEY=VALUE with KEY one of {', '.join(sorted(fields))}")
        settings[key] = yaml.safe_load(value)
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.search.replay", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    points = commands.add_parser("points", help="print the configurations to record, as YAML initial_points")
    points.add_argument("--trials", type=int, default=32)
    points.add_argument("--seed", type=int, default=0)
    points.add_argument(
        "--calibrated-lr",
        type=float,
        default=1.32e-3,
        help="the model's calibrated learning rate, which the default space's learning-rate range is centred "
        "on (default: SmolLM2-135M's, 1.32e-3; 2e-4 gives the earlier default range, 2e-5 to 2e-3)",
    )
    record = commands.add_parser("table", help="turn recording sweeps' results.parquet into the table")
    record.add_argument(
        "experiments",
        nargs="+",
        help="recording sweeps' experiment folders or tables made earlier, rows in order",
    )
    record.add_argument("--out", required=True, help="the table file to write (.jsonl)")
    run = commands.add_parser("replay", help="replay the search methods against a table")
    run.add_argument("table", help="a table written by `python -m bench.search.replay table`")
    run.add_argument("--out", required=True, help="the JSONL file to write: curves, summaries, the ratio")
    run.add_argument("--plot", help="a PNG of best-so-far eval loss against GPU-hours")
    run.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    run.add_argument("--seeds", type=int, default=5, help="N seeds for every method, from --first-seed on")
    run.add_argument("--first-seed", type=int, default=0, help="the first seed (seeds not used to tune on)")
    run.add_argument("--trials", type=int, help="trials per replay (default: as many as the table has rows)")
    run.add_argument(
        "--search",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="replay a variant of the driver's defaults: search settings such as startup_trials=4 grace_period=1",
    )
    run.add_argument(
        "--band",
        type=float,
        default=BAND,
        help=f"the band: within this fraction of the best (default {BAND})",
    )
    run.add_argument(
        "--engine",
        choices=ENGINES,
        default="tune",
        help="tune: each replay a Tune run; direct: the same searcher and scheduler without Tune (same curves, "
        "about 50x faster)",
    )
    run.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args(argv)

    if args.command == "points":
        from sweeps.space import DEFAULT_SPACE, resolve_space

        space, _ = resolve_space(DEFAULT_SPACE, args.calibrated_lr)
        chosen = sample_points(space, args.trials, seed=args.seed)
        print(yaml.safe_dump({"initial_points": chosen}, default_flow_style=None, sort_keys=False), end="")
        return 0
    if args.command == "table":
        table = merge_tables(
            [
                load_table(path) if path.endswith(".jsonl") else table_from_experiment(path)
                for path in args.experiments
            ]
        )
        write_table(table, args.out)
        print(f"{len(table.rows)} rows, best eval loss {table.best_loss:.4f}: {args.out}")
        return 0

    import optuna
    import ray

    from sweeps.config import SearchSettings, SweepConfig

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per replay's new study
    settings = parse_settings(args.search)
    table = load_table(args.table)
    trials = args.trials or len(table.rows)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    search = SearchSettings(num_samples=trials, space=table.space, **settings)  # checks the values first
    if args.engine == "tune":
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, ignore_reinit_error=True)
    curves = [
        replay(table, method=method, seed=seed, trials=trials, settings=settings, engine=args.engine)
        for method in args.methods
        for seed in seeds
    ]
    summary = summarize(curves, best_loss=table.best_loss, band=args.band)
    header = {
        "kind": "replay",
        "table": args.table,
        "trials": trials,
        "seeds": [seeds.start, seeds.stop - 1],
        "best_loss": table.best_loss,
        "band": args.band,
        "engine": args.engine,
        # What "tpe+asha" ran with: the driver's defaults unless --search changed them.
        "search": {
            **settings,
            "startup_trials": search.startup_trials,
            "grace_period": search.grace_period,
            "reduction_factor": search.reduction_factor,
            "baselines": SweepConfig(name="replay", search=search).baseline_names,
        },
    }
    lines = [header, *({"kind": "curve", **dataclasses.asdict(c)} for c in curves), *summary]
    Path(args.out).write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    if args.plot:
        title = f"{Path(args.table).stem}: {trials} trials per replay"
        plot_curves(curves, best_loss=table.best_loss, path=args.plot, title=title, band=args.band)
    for line in summary:
        print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
