"""What a trial tells the driver, and what the driver and the report make of it.

The trial reports a `TrialReport` to Tune (`tune.report(report.to_tune())`); the driver reads Tune's
results back with `TrialReport.from_tune`, decides each trial's status with `trial_status`, and the
report ranks the trials whose status is in `RANKABLE_STATUSES`. Every key of the reports is a field
name here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal, get_args

# The one metric that the sweep optimizes, the analysis ranks by and Tune's scheduler reads: the name of
# TrialReport.eval_loss in Tune's results.
METRIC = "eval_loss"
MODE: Literal["min"] = "min"
TRAIN_LOSS = "train_loss"  # the name of TrialReport.train_loss, the other loss a trial's history shows
DIRECTION: Literal["minimize"] = "minimize"  # MODE in Optuna's words

Status = Literal["completed", "stopped", "oom", "skipped_oom", "failed", "error"]
STATUSES: tuple[Status, ...] = get_args(Status)
# A trial that ran to the end or was stopped early by the scheduler has a usable adapter and may be
# ranked; oom, skipped_oom (predicted not to fit its GPU share, never started), failed and error trials
# come last, whatever eval loss they reported before failing.
RANKABLE_STATUSES: tuple[Status, ...] = ("completed", "stopped")

# The parts of a trial's start, in order (TrialReport's start_* fields).
START_PARTS = ("start_imports_s", "start_worker_s", "start_model_s", "start_trainer_s", "start_step_s")

# Where a trial's hyperparameters came from: a baseline (search.baselines, run first: QLoRA's recipe, the
# calibrated default), one of the user's search.initial_points, the searcher, or a seed re-check of one of
# the best configurations after the search (search.recheck_top, search.recheck_seeds).
Origin = Literal["baseline", "initial", "search", "recheck"]
BASELINE: Origin = "baseline"
# The baselines a sweep may run (sweeps/baselines.py defines them), as the report names them.
BaselineName = Literal["qlora", "calibrated"]
DESCRIPTIONS: dict[str, str] = {"qlora": "the QLoRA recipe", "calibrated": "the calibrated default"}
RECHECK: Origin = "recheck"
# A trial config's key for the trial's seed (LoRA init, data order, dropout); absent: train.seed. Seed
# re-checks set it (sweeps/recheck.py); it is not a hyperparameter.
SEED_KEY = "seed"


@dataclasses.dataclass(frozen=True)
class TrialReport:
    """One report of a trial to Tune: after each evaluation, and once more when the trial fails.

    The defaults are what a report that does not know a value says (an out-of-memory trial knows little).
    """

    # The first four fields are the columns Tune's progress table shows (it takes a result's first four).
    eval_loss: float = math.nan  # METRIC: loss on the eval split at `step`
    train_loss: float = math.nan  # mean training loss over the steps since the previous report
    step: int = 0  # optimizer steps done
    tokens_per_s: float = math.nan  # training throughput of this process (resumed: since the resume)
    tokens: int = 0  # input tokens seen since the start (a resumed trial included)
    grad_norm: float = math.nan  # at the last logged step
    peak_memory_gib: float = math.nan  # GPU memory allocated at most in the trial (CPU: the peak RSS)
    # The GPU Tune gave this trial (Ray sets CUDA_VISIBLE_DEVICES to it) and how many the trial sees.
    cuda_visible_devices: str = ""
    visible_gpus: int = 0
    # The plain base model's loss on the same eval data, measured once per sweep: the bar to clear.
    base_eval_loss: float = math.nan
    retries: int = 0  # how often this trial was restarted from a checkpoint
    restored_from_step: int = 0  # the step of the checkpoint the last restart began at
    evaluations: int = 0  # eval passes this trial process has run (one per report; none of the base)
    oom: bool = False  # CUDA ran out of memory: final, the same config would run out again
    diverged: bool = False  # a NaN or infinite loss was seen: final
    # Where the trial ran, to check Tune's placement: the Ray node and the GPUs it was given.
    node_id: str = ""
    gpu_ids: str = ""
    started_at: float = math.nan  # UNIX time this process started the trial
    # The process that ran the trial: with search.reuse_workers, Tune runs trial after trial in one process.
    worker_pid: int = 0
    worker_trial: int = 0  # 1: the trial started its worker process; 2, 3, ...: it reused a running one
    # The trial's start (docs/cost.md#trial-start), from its worker process's start to the end of its first
    # optimizer step, in consecutive parts. A reused worker has no process start: its imports take 0 and
    # its worker part runs from the end of the process's previous trial.
    start_imports_s: float = math.nan  # to the trial's code imported (Python, Ray's worker, torch, ...)
    start_worker_s: float = math.nan  # to the trial's function (Tune's set-up, the trial's settings fetched)
    start_model_s: float = math.nan  # to the base model loaded (earlier trials' objects freed, tokenizer ...)
    start_trainer_s: float = math.nan  # to LoRA attached and trl's trainer built
    start_step_s: float = math.nan  # to the first optimizer step's end (the trainer's own set-up, the step)
    # The base model was a copy of the one the reused worker kept from its first trial, not loaded.
    base_copied: bool = False
    # Predicted peak GPU memory (trainable.memory, the whole process: MemoryEstimate.total_gib); NaN where
    # no estimate is made (CPU trials unless search.gpu_memory_gib is set).
    estimated_memory_gib: float = math.nan
    # The estimate exceeds the trial's share of the card: it was never started (no model loaded). It
    # reports an infinite eval loss so that the searcher's TPE ranks that region worst.
    skipped_oom: bool = False
    gpu_share: float = 0.0  # GPUs this trial held (1/trials_per_gpu; 0 for a CPU trial)

    @property
    def startup_s(self) -> float:
        """Seconds from the worker process's start (a reused worker: its previous trial's end) to the end of
        the trial's first optimizer step; NaN for a trial that took none."""
        return sum(getattr(self, name) for name in START_PARTS)

    def to_tune(self) -> dict[str, float | int | str]:
        """The report as Tune's metrics dict; flags as 0/1 so that progress.csv holds numbers."""
        return {
            name: int(value) if isinstance(value, bool) else value
            for name, value in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_tune(cls, result: Mapping[str, Any]) -> TrialReport:
        """A report from Tune's result dict (or a row of progress.csv). Tune's own keys are ignored; a key
        that is missing or empty (an older trial, a row from a CSV) takes the field's default."""
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            value = result.get(field.name)
            if value is None or (isinstance(value, float) and math.isnan(value) and field.type != "float"):
                continue
            kind = {"float": float, "int": int, "bool": bool, "str": str}[str(field.type)]
            values[field.name] = kind(value)
        return cls(**values)


def trial_status(last: TrialReport, *, errored: bool, best_eval_loss: float, max_steps: int) -> Status:
    """The one rule for a trial's status, from its last report, whether Tune gave up on it (it crashed
    and ran out of retries), the best eval loss it reported and the steps a full trial trains. A trial
    that never reported has the default report: no finite eval loss."""
    if errored:
        return "error"
    if last.skipped_oom:
        return "skipped_oom"
    if last.oom:
        return "oom"
    if last.diverged or not math.isfinite(best_eval_loss):
        return "failed"  # NaN/inf loss, or never a finite eval loss
    return "completed" if last.step >= max_steps else "stopped"  # stopped early, by the scheduler
