"""The sweep's results table: one row per trial, written as results.parquet into the experiment folder
(through analysis.experiment)."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import pandas as pd

from sweeps.baselines import StartingPoint, claim_points
from sweeps.budget import dollars, gpu_seconds
from sweeps.config import SweepConfig
from sweeps.recheck import RECHECK_OF
from trainable.outcome import METRIC, MODE, RECHECK, SEED_KEY, Origin, TrialReport, trial_status
from trainable.schema import (
    ADAPTER_PATH,
    BASE_EVAL_LOSS,
    BEST_EVAL_LOSS,
    GPU_SECONDS,
    RANK,
    STATUS,
    STEP,
    TrialResult,
    describe_cost,
    results_table,
)
from trainable.settings import HYPERPARAMETERS

if TYPE_CHECKING:
    from ray.tune import ResultGrid


def storage_location(path: str, storage_uri: str) -> str:
    """A path Tune gives (inside the storage's filesystem, without its scheme) as the storage names it:
    `s3://bucket/...` for remote storage, so that any machine with access to the storage finds it."""
    if "://" not in storage_uri or "://" in path:
        return path
    return f"{storage_uri.split('://', 1)[0]}://{path.lstrip('/')}"


def collect_results(
    grid: ResultGrid, config: SweepConfig, points: list[StartingPoint], *, rechecks: ResultGrid | None = None
) -> pd.DataFrame:
    """One row per trial of a Tune ResultGrid, and of the seed re-checks' grid when given (sweeps.recheck):
    hyperparameters, seed, metrics, adapter path, status, origin (a baseline, one of the initial `points`,
    the searcher's, a re-check) and the baseline's name, config_id (the trial whose configuration the row
    trains: itself, or for a re-check the trial it re-checks)."""
    from ray.tune.result import TIME_TOTAL_S, TRIAL_ID

    storage = config.storage_uri()
    results = [grid[i] for i in range(len(grid))]  # in the order Tune created the trials, also after a resume
    claimed = claim_points([r.config or {} for r in results], [p.values for p in points])
    starts: list[StartingPoint | None] = [points[i] if i is not None else None for i in claimed]
    if rechecks is not None:
        results += [rechecks[i] for i in range(len(rechecks))]
    rows = []
    for index, result in enumerate(results):
        start = starts[index] if index < len(starts) else None
        origin: Origin = start.origin if start else "search" if index < len(starts) else RECHECK
        history = result.metrics_dataframe
        if history is not None and STEP in history:  # a report a restarted trial sent again: once
            history = history.drop_duplicates(STEP, keep="last")
        metrics, trial_config = result.metrics or {}, result.config or {}
        last = TrialReport.from_tune(metrics)
        losses = (
            history[METRIC].dropna()
            if history is not None and METRIC in history
            else pd.Series([], dtype=float)
        )
        losses = losses[losses.map(math.isfinite)]  # a skipped_oom trial's infinite loss is for TPE only
        best_loss = float(losses.min()) if len(losses) else math.nan
        best = result.get_best_checkpoint(METRIC, MODE) if len(losses) else None
        searched = {name: trial_config[name] for name in HYPERPARAMETERS if name in trial_config}
        wall_time = float(metrics.get(TIME_TOTAL_S, math.nan))
        trial_id = str(metrics.get(TRIAL_ID) or result.path.rstrip("/").rsplit("/", 1)[-1])
        spent = gpu_seconds(wall_time, last.gpu_share)
        rows.append(
            TrialResult(
                trial_id=trial_id,
                status=trial_status(
                    last,
                    errored=result.error is not None,
                    best_eval_loss=best_loss,
                    max_steps=config.train.max_steps,
                ),
                origin=origin,
                baseline=start.baseline if start else "",
                config_id=str(trial_config.get(RECHECK_OF, trial_id)),
                seed=int(trial_config.get(SEED_KEY, config.train.seed)),
                hparams=dataclasses.replace(config.lora, **searched),
                best_eval_loss=best_loss,
                final_eval_loss=float(losses.iloc[-1]) if len(losses) else math.nan,
                eval_history=[float(x) for x in losses],
                wall_time_s=wall_time,
                gpu_seconds=spent,
                cost_usd=dollars(spent, config.search.price_per_gpu_hour),
                adapter_path=storage_location(best.path, storage) if best is not None else None,
                trial_path=storage_location(result.path, storage),
                error=None
                if result.error is None
                else f"{type(result.error).__name__}: {result.error}"[:2000],
                last=last,
            )
        )
    return results_table(rows)


def format_results(table: pd.DataFrame, path: str, *, top: int = 10) -> str:  # 10 rows fit one screen
    """The results table as the driver prints it at the end: the best `top` trials and where they are."""
    if table.empty:
        return f"no trials ran; {path}"
    columns = [
        RANK,
        STATUS,
        *HYPERPARAMETERS[:5],
        BEST_EVAL_LOSS,
        BASE_EVAL_LOSS,
        STEP,
        "tokens_per_s",
        "estimated_memory_gib",
        GPU_SECONDS,
    ]
    shown = table[columns].head(top).to_string(index=False, float_format=lambda x: f"{x:.4g}")
    best = table.iloc[0]
    return (
        f"\n{len(table)} trial(s); best eval_loss {best[BEST_EVAL_LOSS]:.4f} "
        f"(base model {best[BASE_EVAL_LOSS]:.4f}); {describe_cost(table)}\n{shown}\n\n"
        f"results: {path}\nbest adapter: {best[ADAPTER_PATH]}\n"
    )
