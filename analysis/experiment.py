"""An experiment folder as the analysis reads it: sweep.json, results.parquet, the trial folders, optuna.db.

The folder may have been copied from another machine (or down from cloud storage): every path recorded in
it is checked, and one that does not exist is looked up again inside the folder.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from pydantic import TypeAdapter, ValidationError

from trainable.outcome import METRIC, TrialReport
from trainable.settings import DataSettings, ModelSettings, ReportSettings

RESULTS = "results.parquet"
SUMMARY = "sweep.json"


class ExperimentError(ValueError):
    """An experiment folder that cannot be read, or report settings that cannot be used."""


@dataclass(frozen=True)
class Experiment:
    """A sweep's results, with every recorded path made to point inside `path`."""

    path: Path
    summary: dict[str, Any]  # sweep.json: the config and what the driver resolved from it
    results: pd.DataFrame  # results.parquet, adapter_path and trial_path relocated

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.summary.get("config", {}))

    @property
    def model_settings(self) -> ModelSettings:
        return ModelSettings(**self.config.get("model", {}))

    @property
    def data_settings(self) -> DataSettings:
        return DataSettings(**self.config.get("data", {}))

    @property
    def chat_template(self) -> str | None:
        return self.summary.get("chat_template")

    @property
    def base_eval_loss(self) -> float:
        """The base model's eval loss (every trial measures the same one; the median guards against a stray)."""
        losses = self.results.get("base_eval_loss", pd.Series([], dtype=float)).dropna()
        return float(losses.median()) if len(losses) else math.nan


def experiment_folder(path: str | Path) -> Path:
    """The experiment folder for a folder or its results.parquet."""
    path = Path(path).expanduser().resolve()
    return path.parent if path.name == RESULTS else path


def relocate(recorded: str | None, folder: Path) -> str | None:
    """`recorded` if it exists; else the same path re-rooted in `folder`, matched by its longest tail that
    exists there (the trial folder and checkpoint names survive a copy, the prefix does not)."""
    if recorded is None or (isinstance(recorded, float) and math.isnan(recorded)) or recorded == "":
        return None
    if Path(recorded).exists():
        return str(recorded)
    parts = Path(recorded).parts
    for start in range(1, len(parts)):
        candidate = folder.joinpath(*parts[start:])
        if candidate.exists():
            return str(candidate)
    return None


def load_experiment(path: str | Path) -> Experiment:
    """Read an experiment folder (or its results.parquet)."""
    folder = experiment_folder(path)
    results_path = folder / RESULTS
    if not results_path.is_file():
        raise ExperimentError(
            f"{folder}: no {RESULTS}; give the experiment folder that `python -m sweeps.run` wrote "
            "(it holds sweep.json and results.parquet once the sweep has finished)"
        )
    summary_path = folder / SUMMARY
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    results = pd.read_parquet(results_path)
    for column in ("adapter_path", "trial_path"):
        if column in results:
            results[column] = [relocate(p, folder) for p in results[column]]
    return Experiment(path=folder, summary=summary, results=results)


def resolve_base_model(experiment: Experiment) -> str:
    """The base model to load: the recorded path where it exists, else the configured name resolved again
    on this machine (the embedded default is converted into this machine's cache)."""
    from trainable.model import resolve_model

    recorded = experiment.summary.get("model_path")
    if recorded and (Path(recorded).exists() or not Path(recorded).is_absolute()):
        return str(recorded)  # a local folder, or a hub id
    return resolve_model(experiment.model_settings.name_or_path)


def load_histories(experiment: Experiment) -> pd.DataFrame:
    """Every report of every trial, one row each: trial_id, step, eval_loss, train_loss.

    Read from the trial folders' progress.csv; a trial whose folder is gone falls back on the eval_history
    list in results.parquet (steps then counted in train.eval_every units).
    """
    eval_every = int(experiment.config.get("train", {}).get("eval_every", 1))
    frames = []
    for row in experiment.results.itertuples():
        progress = Path(row.trial_path) / "progress.csv" if isinstance(row.trial_path, str) else None
        if progress is not None and progress.is_file() and progress.stat().st_size:
            table = pd.read_csv(progress)
            if METRIC in table:
                reports = [TrialReport.from_tune(r) for r in table.to_dict("records")]
                frame = pd.DataFrame(
                    {
                        "step": [r.step for r in reports],
                        "eval_loss": [r.eval_loss for r in reports],
                        "train_loss": [r.train_loss for r in reports],
                    }
                )
                frames.append(frame.assign(trial_id=row.trial_id))
                continue
        history = list(row.eval_history) if row.eval_history is not None else []
        steps = [eval_every * (i + 1) for i in range(len(history))]
        frames.append(
            pd.DataFrame(
                {"step": steps, "eval_loss": history, "train_loss": math.nan, "trial_id": row.trial_id}
            )
        )
    if not frames:
        return pd.DataFrame(columns=["trial_id", "step", "eval_loss", "train_loss"])
    return pd.concat(frames, ignore_index=True)[["trial_id", "step", "eval_loss", "train_loss"]]


def load_report_settings(experiment: Experiment, overrides: Sequence[str] = ()) -> ReportSettings:
    """The sweep's `report` section with dotted overrides (`top_k=3`, `generation.max_new_tokens=32`; a
    leading `report.` is allowed). Every problem is named by its key, all at once."""
    data = json.loads(json.dumps(experiment.config.get("report", {})))  # a deep copy
    problems = []
    for override in overrides:
        key, sep, raw = override.partition("=")
        parts = key.strip().removeprefix("report.").split(".")
        if not sep or not parts[0]:
            problems.append(f"override {override!r}: expected key=value, e.g. generation.max_new_tokens=32")
            continue
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"override {override!r}: report.{part} is a value, not a section")
                break
        else:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    if not problems:
        try:
            return TypeAdapter(ReportSettings).validate_python(data)
        except ValidationError as err:
            for e in err.errors():
                got = "" if e["type"] == "missing" else f" (got {e['input']!r})"
                problems.append(f"report.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}{got}")
    raise ExperimentError("report settings: " + "; ".join(problems))


def load_generations(experiment: Experiment) -> pd.DataFrame:
    """generations.parquet: one row per prompt x candidate, with answers, scores and generation settings."""
    path = experiment.path / "generations.parquet"
    if not path.is_file():
        raise ExperimentError(
            f"{experiment.path}: no generations.parquet; run python -m analysis.report {experiment.path}"
        )
    return pd.read_parquet(path)


def write_atomic(path: Path, data: bytes) -> Path:
    """Write under a temporary name in the same folder, then rename: a reader never sees half a file."""
    staging = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.write_bytes(data)
    os.replace(staging, path)
    return path


def write_table(table: pd.DataFrame, path: Path) -> Path:
    """A table as Parquet (or CSV, by the suffix), written atomically."""
    if path.suffix == ".csv":
        return write_atomic(path, table.to_csv(index=False).encode())
    import io

    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    return write_atomic(path, buffer.getvalue())
