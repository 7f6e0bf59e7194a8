"""The experiment's two records that cross from the driver to the report, as types: a row of results.parquet
(`TrialResult`, one per trial) and sweep.json (`SweepSummary`). The driver fills them (sweeps.results,
sweeps.plan), analysis.experiment writes and reads them back, checking what it reads, and the report and the
notebooks use the column names defined here, not strings of their own.

A results row is the trial's last report (trainable.outcome.TrialReport, every field a column of the same
name) and its hyperparameters (trainable.settings.Hyperparameters, likewise), plus what the driver adds: the
status, where the configuration came from, the best and final eval loss, the cost, the adapter. So a new
figure a trial reports is a TrialReport field and reaches results.parquet, the report and the notebooks
with no other edit; a new hyperparameter likewise from Hyperparameters.

    rows = [TrialResult(...), ...]; table = results_table(rows)      # the driver
    table = check_results(pd.read_parquet(path), source=path)        # analysis.experiment, on load
    table[usable(table)].sort_values(BEST_EVAL_LOSS)                  # the report
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

from trainable.outcome import BASELINE, RANKABLE_STATUSES, Origin, Status, TrialReport
from trainable.settings import Hyperparameters


@dataclasses.dataclass(frozen=True)
class TrialResult:
    """One row of results.parquet: one trial of the search or of the seed re-checks."""

    trial_id: str
    status: Status  # trainable.outcome.trial_status
    origin: Origin  # where the configuration came from: baseline, initial, search, recheck
    config_id: (
        str  # the trial whose configuration this row trains: itself, or for a re-check the one re-checked
    )
    seed: int  # LoRA init, data order and dropout masks
    hparams: Hyperparameters  # a column each, named as the fields
    best_eval_loss: float  # the lowest finite eval loss it reported (NaN: none)
    final_eval_loss: float  # the last finite one
    eval_history: list[float]  # every finite eval loss, in order
    wall_time_s: float  # Tune's time for the trial (a restarted trial: all its runs)
    gpu_seconds: float  # wall_time_s x the GPUs it held (sweeps.budget)
    cost_usd: float  # at search.price_per_gpu_hour; NaN without a price
    adapter_path: str | None  # the best checkpoint's folder (storage URI on remote storage); None: none kept
    trial_path: str  # the trial's folder: progress.csv, result.json, checkpoints
    error: str | None  # what a crashed trial raised, its first 2000 characters
    last: TrialReport  # the trial's last report, a column per field (`step`: optimizer steps trained)
    rank: int = 0  # 1 for the best: usable trials first, by best eval loss (the report ranks again)
    baseline: str = ""  # which baseline a baseline trial is (sweeps.baselines: qlora, calibrated)

    def to_row(self) -> dict[str, Any]:
        """The row as results.parquet holds it: the rank first, the nested records flattened in place."""
        row: dict[str, Any] = {RANK: self.rank}
        for field in dataclasses.fields(self):
            if field.name == "hparams":
                row.update(dataclasses.asdict(self.hparams))
            elif field.name == "last":
                row.update(dataclasses.asdict(self.last), **{STARTUP_S: self.last.startup_s})
            elif field.name != RANK:
                row[field.name] = getattr(self, field.name)
        return row


# Column names, for code that reads the table (spelled here once).
RANK = "rank"
TRIAL_ID = "trial_id"
STATUS = "status"
ORIGIN = "origin"
BASELINE_NAME = "baseline"
CONFIG_ID = "config_id"
SEED = "seed"
BEST_EVAL_LOSS = "best_eval_loss"
FINAL_EVAL_LOSS = "final_eval_loss"
EVAL_HISTORY = "eval_history"
WALL_TIME_S = "wall_time_s"
GPU_SECONDS = "gpu_seconds"
COST_USD = "cost_usd"
ADAPTER_PATH = "adapter_path"
TRIAL_PATH = "trial_path"
ERROR = "error"
STARTUP_S = "startup_s"  # TrialReport.startup_s: the trial's start, from its worker's start to its first step
# TrialReport's fields that the analysis reads by name.
STEP = "step"
BASE_EVAL_LOSS = "base_eval_loss"
GPU_SHARE = "gpu_share"

# Those without a default must be there when a table is read back; the others are filled in (a table
# written before they existed).
REQUIRED_COLUMNS: tuple[str, ...] = tuple(
    f.name
    for f in dataclasses.fields(TrialResult)
    if f.default is dataclasses.MISSING and f.name not in ("hparams", "last")
)
DEFAULTS: dict[str, Any] = {
    RANK: 0,
    BASELINE_NAME: "",
    **dataclasses.asdict(Hyperparameters()),
    **dataclasses.asdict(TrialReport()),
    STARTUP_S: math.nan,
}
# Renamed since earlier versions wrote them: old name -> name.
_RENAMED = {"steps": STEP}


def results_table(rows: list[TrialResult]) -> pd.DataFrame:
    """results.parquet's table of `rows`, ranked: usable trials first (a failed, crashed or out-of-memory
    trial never ranks above one that finished, whatever eval loss it reported before failing), then by
    best eval loss (NaN last); equal keys keep the rows' order."""

    def key(row: TrialResult) -> tuple[bool, bool, float]:
        unranked = not is_usable(row.status, row.best_eval_loss)
        return unranked, math.isnan(row.best_eval_loss), row.best_eval_loss

    ranked = sorted(rows, key=key)
    return pd.DataFrame([dataclasses.replace(row, rank=i).to_row() for i, row in enumerate(ranked, start=1)])


def check_results(table: pd.DataFrame, *, source: str) -> pd.DataFrame:
    """A results table read back from `source`, checked against TrialResult: a required column missing is a
    ValueError naming the file and the columns; a column that came later than the table is filled with its
    default (NaN, 0, False), so that experiments written by earlier versions still read."""
    table = table.rename(columns={old: new for old, new in _RENAMED.items() if new not in table})
    if BASELINE_NAME not in table:  # earlier versions had one baseline, QLoRA's recipe, as origin "recipe"
        table[BASELINE_NAME] = table[ORIGIN].map({"recipe": "qlora"}).fillna("")
        table[ORIGIN] = table[ORIGIN].replace({"recipe": BASELINE})
    missing = [name for name in REQUIRED_COLUMNS if name not in table]
    if missing:
        raise ValueError(
            f"{source}: no column {', '.join(missing)}; results.parquet must hold one row per trial as "
            "`python -m sweeps.run` writes it (trainable.schema.TrialResult)"
        )
    for name, default in DEFAULTS.items():
        if name not in table:
            table[name] = default
    return table


def is_usable(status: str, best_eval_loss: float) -> bool:
    """The one rule for which trials have an adapter worth ranking: a rankable status (completed, or stopped
    early by the scheduler) and a finite best eval loss."""
    return status in RANKABLE_STATUSES and math.isfinite(best_eval_loss)


def usable(table: pd.DataFrame) -> pd.Series:
    """is_usable for each row of a results table (or of one derived from it, such as the leaderboard)."""
    loss = pd.to_numeric(table[BEST_EVAL_LOSS], errors="coerce")
    return table[STATUS].isin(RANKABLE_STATUSES) & loss.map(math.isfinite)


@dataclasses.dataclass(frozen=True)
class SweepSummary:
    """sweep.json: the sweep's config and what the driver resolved from it before the first trial."""

    config: dict[str, Any]  # the SweepConfig, as plain data
    fingerprint: dict[str, str]  # hashes of what a resumed sweep must share with the first (sweeps.plan)
    model_path: str  # the base model's folder or hub id
    chat_template: str  # the template the data was rendered with
    linear_modules: list[str]  # the model's linear layers that LoRA may target
    data: dict[str, Any]  # counts: examples, tokens, truncated and dropped examples (trainable.prepare)
    environment: dict[str, Any]  # library versions, device, compute dtype, commit (trainable.hardware)
    base_eval_loss: float | None = None  # the base model's eval loss, measured once per sweep; None: not yet
    # The model's calibrated LoRA learning rate (sweeps.baselines); None in sweeps of earlier versions.
    calibrated_learning_rate: float | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, source: str) -> SweepSummary:
        """From sweep.json's contents; a missing key is a ValueError naming `source` (an optional one, absent
        in sweeps of earlier versions, takes its default)."""
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in data]
        if missing:
            raise ValueError(
                f"{source}: no {', '.join(missing)}; sweep.json is written by `python -m sweeps.run`"
            )
        return cls(**{f.name: data[f.name] for f in fields if f.name in data})

    def section(self, name: str) -> dict[str, Any]:
        """A section of the config as recorded, e.g. section("train")["eval_every"]; empty if absent."""
        return dict(self.config.get(name) or {})


def describe_cost(table: pd.DataFrame) -> str:
    """A results table's cost in words, as the driver prints it and the report shows it: GPU-hours (each
    trial's wall time x the GPUs it held, summed) beside trial-hours, and dollars where priced."""
    hours = table[GPU_SECONDS].sum() / 3600
    trial_hours = table[WALL_TIME_S].sum() / 3600
    if not (table[GPU_SHARE] > 0).any():
        return f"CPU trials: 0 GPU-hours, {trial_hours:.3g} trial-hours"
    text = f"{hours:.4g} GPU-hours over {trial_hours:.3g} trial-hours"
    return text + (f", ${table[COST_USD].sum():.2f}" if table[COST_USD].notna().any() else "")
