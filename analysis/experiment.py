"""The experiment folder: its file names, how they are written (atomically, locally or to a storage URI)
and how they are read back. The driver writes through this module; the analysis reads through it.

    experiments/<name>/
        sweep.json          the config and what the driver resolved from it (written before the trials)
        optuna.db           the Optuna study
        results.parquet     one row per trial (written when the sweep ends)
        <trial folders>     Tune's: progress.csv, result.json, checkpoints with the adapters
        rechecks/           the seed re-checks' Tune experiment (search.recheck_top), trial folders alike
        leaderboard.parquet, leaderboard.csv, generations.parquet, judgments.parquet, report.html
                            the report's outputs

The folder may have been copied from another machine (or down from cloud storage): every path recorded in
it is checked, and one that does not exist is looked up again inside the folder. An experiment in remote
storage (s3://, gs://, ... as pyarrow names them) is read through a copy in the local cache (fetch_experiment)
and what is written about it is put back next to it (publish_folder).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from trainable.outcome import METRIC, TRAIN_LOSS, TrialReport
from trainable.schema import ADAPTER_PATH, BASE_EVAL_LOSS, TRIAL_ID, TRIAL_PATH, SweepSummary, check_results
from trainable.search_space import Dimension, parse_space
from trainable.settings import DataSettings, ModelSettings

SUMMARY = "sweep.json"
RESULTS = "results.parquet"
STUDY = "optuna.db"
LEADERBOARD = "leaderboard.parquet"
LEADERBOARD_CSV = "leaderboard.csv"
GENERATIONS = "generations.parquet"
PAIRED_TESTS = "paired_tests.parquet"
JUDGMENTS = "judgments.parquet"
REPORT_PAGE = "report.html"
REPORT_OUTPUTS = (LEADERBOARD, LEADERBOARD_CSV, GENERATIONS, PAIRED_TESTS, JUDGMENTS, REPORT_PAGE)
RECHECKS = "rechecks"  # the seed re-checks' Tune experiment, a subfolder (sweeps/recheck.py)


class ExperimentError(ValueError):
    """An experiment folder that cannot be read, or report settings that cannot be used."""


@dataclass(frozen=True)
class Experiment:
    """A sweep's results, with every recorded path made to point inside `path`."""

    path: Path
    summary: SweepSummary  # sweep.json: the config and what the driver resolved from it
    results: (
        pd.DataFrame
    )  # results.parquet (checked: trainable.schema), adapter_path and trial_path relocated
    uri: str | None = None  # where the experiment is stored when `path` is a local copy of remote storage

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def model_settings(self) -> ModelSettings:
        return ModelSettings(**self.summary.section("model"))

    @property
    def data_settings(self) -> DataSettings:
        return DataSettings(**self.summary.section("data"))

    @property
    def space(self) -> dict[str, Dimension]:
        """The sweep's search space, parsed (empty when the recorded config has none)."""
        return parse_space(self.summary.section("search").get("space") or {})

    @property
    def base_eval_loss(self) -> float:
        """The base model's eval loss: measured once by the driver (sweep.json); for sweeps from before
        that, the median of what the trials measured."""
        if self.summary.base_eval_loss is not None:
            return float(self.summary.base_eval_loss)
        losses = self.results[BASE_EVAL_LOSS].dropna()
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
    """Read an experiment folder (or its results.parquet), or a remote one through its cached copy."""
    if is_remote(path):
        uri = str(path).rstrip("/").removesuffix(f"/{RESULTS}")
        return dataclasses.replace(load_experiment(fetch_experiment(uri)), uri=uri)
    folder = experiment_folder(path)
    results_path = folder / RESULTS
    if not results_path.is_file():
        raise ExperimentError(
            f"{folder}: no {RESULTS}; give the experiment folder that `python -m sweeps.run` wrote "
            "(it holds sweep.json and results.parquet once the sweep has finished)"
        )
    try:
        summary = read_summary(folder)
        results = check_results(pd.read_parquet(results_path), source=str(results_path))
    except FileNotFoundError as err:
        raise ExperimentError(
            f"{folder}: no {SUMMARY}; the sweep's driver writes it before any trial"
        ) from err
    except (ValueError, OSError) as err:  # a column missing, a key missing, a file that is not Parquet
        raise ExperimentError(str(err)) from err
    for column in (ADAPTER_PATH, TRIAL_PATH):
        results[column] = [relocate(p, folder) for p in results[column]]
    return Experiment(path=folder, summary=summary, results=results)


def resolve_base_model(experiment: Experiment) -> str:
    """The base model to load: the recorded path where it exists, else the configured name resolved again
    on this machine (the embedded default is converted into this machine's cache)."""
    from trainable.model import resolve_model

    recorded = experiment.summary.model_path
    if recorded and (Path(recorded).exists() or not Path(recorded).is_absolute()):
        return str(recorded)  # a local folder, or a hub id
    return resolve_model(experiment.model_settings.name_or_path)


# load_histories' columns: the trial, then TrialReport fields.
HISTORY_COLUMNS = (TRIAL_ID, "step", METRIC, TRAIN_LOSS)


def load_histories(experiment: Experiment) -> pd.DataFrame:
    """Every report of every trial, one row each: HISTORY_COLUMNS (trial_id, step, eval_loss, train_loss).

    Read from the trial folders' progress.csv; a trial whose folder is gone falls back on the eval_history
    list in results.parquet (steps then counted in train.eval_every units). A restarted trial (a crash, a
    killed driver) sends again the reports of checkpoints that Tune's saved state missed, which the killed
    driver may have written already (and trials of older versions trained again from an older checkpoint
    and reported those steps anew): each step's last report is the one kept.
    """
    eval_every = int(experiment.summary.section("train").get("eval_every", 1))
    frames = []
    for row in experiment.results.itertuples():
        progress = Path(row.trial_path) / "progress.csv" if isinstance(row.trial_path, str) else None
        if progress is not None and progress.is_file() and progress.stat().st_size:
            table = pd.read_csv(progress)
            if METRIC in table:
                reports = [TrialReport.from_tune(r) for r in table.to_dict("records")]
                fields = HISTORY_COLUMNS[1:]
                frame = pd.DataFrame({name: [getattr(r, name) for r in reports] for name in fields})
                frame = frame.drop_duplicates("step", keep="last").sort_values("step", kind="stable")
                frames.append(frame.assign(trial_id=row.trial_id))
                continue
        history = list(row.eval_history) if row.eval_history is not None else []
        steps = [eval_every * (i + 1) for i in range(len(history))]
        frames.append(
            pd.DataFrame({"step": steps, METRIC: history, TRAIN_LOSS: math.nan, TRIAL_ID: row.trial_id})
        )
    if not frames:
        return pd.DataFrame(columns=list(HISTORY_COLUMNS))
    return pd.concat(frames, ignore_index=True)[list(HISTORY_COLUMNS)]


def load_generations(experiment: Experiment) -> pd.DataFrame:
    """generations.parquet: one row per prompt x candidate, with answers, scores and generation settings."""
    path = experiment.path / GENERATIONS
    if not path.is_file():
        raise ExperimentError(
            f"{experiment.path}: no {GENERATIONS}; run python -m analysis.report {experiment.path}"
        )
    return pd.read_parquet(path)


def is_remote(location: str | Path) -> bool:
    """A storage URI (s3://, gs://, ...) rather than a local path."""
    return "://" in str(location)


def join(folder: str | Path, name: str) -> str:
    """`name` inside `folder`, a local path or a storage URI."""
    return f"{str(folder).rstrip('/')}/{name}"


def write_file(folder: str | Path, name: str, data: bytes) -> str:
    """Write `name` (it may hold subfolders) into `folder`, a local path or a URI pyarrow understands,
    under a hidden temporary name first and then renamed: no reader ever sees half a file. Returns where."""
    if not is_remote(folder):
        target = Path(folder) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        staging.write_bytes(data)
        os.replace(staging, target)
        return str(target)
    from pyarrow import fs

    filesystem, final = fs.FileSystem.from_uri(join(folder, name))
    parent, _, base = final.rpartition("/")
    filesystem.create_dir(parent, recursive=True)
    remote_staging = f"{parent}/.{base}.tmp-{uuid.uuid4().hex[:8]}"
    with filesystem.open_output_stream(remote_staging) as out:
        out.write(data)
    filesystem.move(remote_staging, final)
    return join(folder, name)


def read_file(folder: str | Path, name: str) -> bytes:
    """The bytes of `name` in `folder` (local or a storage URI); FileNotFoundError when it is not there."""
    if not is_remote(folder):
        return (Path(folder) / name).read_bytes()
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(join(folder, name))
    try:
        with filesystem.open_input_stream(path) as f:
            return bytes(f.read())
    except OSError as err:  # pyarrow raises OSError (or its FileNotFoundError subclass) for a missing file
        raise FileNotFoundError(join(folder, name)) from err


def write_summary(folder: str | Path, summary: SweepSummary) -> str:
    """sweep.json: the config and what the driver resolved from it."""
    return write_file(folder, SUMMARY, json.dumps(summary.to_json(), indent=2, default=str).encode())


def read_summary(folder: str | Path) -> SweepSummary:
    """sweep.json as written by write_summary; FileNotFoundError when the folder has none, ValueError when
    it lacks a key."""
    return SweepSummary.from_json(json.loads(read_file(folder, SUMMARY)), source=join(folder, SUMMARY))


def experiment_names(storage: str | Path, *, prefix: str) -> list[str]:
    """The experiment folders under `storage` (local or a storage URI) whose names start with `prefix`,
    sorted (names end in a UTC timestamp, so the newest is last)."""
    from pyarrow import fs

    return sorted(
        i.base_name
        for i in folder_entries(storage)
        if i.type == fs.FileType.Directory and i.base_name.startswith(prefix)
    )


def holds_run_state(folder: str | Path) -> bool:
    """Whether a Tune experiment folder (local or a storage URI) holds the run state Tune resumes from
    (experiment_state-*.json). Tune writes tuner.pkl as soon as a Tuner is made, which is all that
    Tuner.can_restore looks for, and the run state only once the run is under way: a driver killed in
    between leaves a folder that Tuner.restore cannot resume, and nothing in it worth keeping."""
    return any(
        i.base_name.startswith("experiment_state-") and i.base_name.endswith(".json")
        for i in folder_entries(folder)
    )


def folder_entries(folder: str | Path) -> list[Any]:  # list[pyarrow.fs.FileInfo]
    """What `folder` (a local path or a storage URI) holds, not recursively; empty if it does not exist."""
    from pyarrow import fs

    location = str(folder) if is_remote(folder) else str(Path(folder).resolve())
    filesystem, root = fs.FileSystem.from_uri(location)
    return list(filesystem.get_file_info(fs.FileSelector(root, allow_not_found=True)))


def write_table(table: pd.DataFrame, folder: str | Path, name: str) -> str:
    """A table as Parquet (or CSV, by the name's suffix), written atomically into `folder`."""
    if name.endswith(".csv"):
        return write_file(folder, name, table.to_csv(index=False).encode())
    import io

    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    return write_file(folder, name, buffer.getvalue())


# What the analysis reads of a remote experiment: its tables, each trial's progress and the adapters of the
# checkpoints; not the optimizer states and tokenizer copies that make up most of a checkpoint.
FETCHED_SUFFIXES = (".json", ".parquet", ".csv", ".db")
CHECKPOINT_FILES = ("adapter_config.json", "adapter_model.safetensors", "trial_state.json")


def fetch_experiment(uri: str) -> Path:
    """Copy what the analysis reads of the experiment at `uri` into the local cache; returns the copy's
    folder. Files already there with the same size are not fetched again."""
    from pyarrow import fs

    from trainable.model import cache_dir

    filesystem, root = fs.FileSystem.from_uri(uri)
    root = root.rstrip("/")
    digest = hashlib.sha256(uri.encode()).hexdigest()[:8]  # one experiment name in two storages
    local = cache_dir() / "experiments" / f"{Path(root).name}-{digest}" / Path(root).name
    infos = filesystem.get_file_info(fs.FileSelector(root, recursive=True, allow_not_found=True))
    if not any(i.path == f"{root}/{RESULTS}" for i in infos):
        raise ExperimentError(
            f"{uri}: no {RESULTS}; give the experiment's URI as `python -m sweeps.run` printed it "
            "(it holds sweep.json and results.parquet once the sweep has finished)"
        )
    for info in infos:
        relative = info.path[len(root) :].lstrip("/")
        parts = relative.split("/")
        in_checkpoint = any(p.startswith("checkpoint_") for p in parts[:-1])
        wanted = parts[-1] in CHECKPOINT_FILES if in_checkpoint else parts[-1].endswith(FETCHED_SUFFIXES)
        if info.type != fs.FileType.File or not wanted or parts[-1].startswith("."):
            continue
        target = local / relative
        if target.is_file() and target.stat().st_size == info.size:
            continue
        with filesystem.open_input_stream(info.path) as source:
            write_file(local, relative, source.read())
    return local


def publish_folder(local: Path, uri: str, *, names: Sequence[str] | None = None) -> str:
    """Put the files of `local` (only `names`, when given) into the folder at `uri`, each written
    atomically (write_file); returns `uri`."""
    files = [local / n for n in names] if names is not None else sorted(local.rglob("*"))
    for path in files:
        if path.is_file():
            write_file(uri, path.relative_to(local).as_posix(), path.read_bytes())
    return uri
