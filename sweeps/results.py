"""The sweep's results table: one row per trial, written as results.parquet into the experiment folder
(through analysis.experiment)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from sweeps.budget import SECONDS_PER_HOUR, dollars, gpu_seconds
from sweeps.config import SweepConfig
from sweeps.recheck import RECHECK_OF
from trainable.outcome import (
    METRIC,
    MODE,
    RANKABLE_STATUSES,
    RECHECK,
    SEED_KEY,
    START_PARTS,
    TRAIN_LOSS,
    Origin,
    TrialReport,
    trial_status,
)
from trainable.settings import HYPERPARAMETERS


def trial_origins(
    configs: Sequence[Mapping[str, Any]], points: Sequence[tuple[Origin, Mapping[str, Any]]]
) -> list[Origin]:
    """Where each trial's hyperparameters came from, for trials in the order Tune created them.

    The searcher suggests the starting points first, in order (OptunaSearch enqueues them in its study),
    so each point belongs to the first trial not yet claimed whose config holds it exactly; a later trial
    that the searcher happened to give the same values stays "search".
    """
    origins: list[Origin] = ["search"] * len(configs)
    for origin, point in points:
        for i, config in enumerate(configs):
            if origins[i] == "search" and all(k in config and config[k] == v for k, v in point.items()):
                origins[i] = origin
                break
    return origins


def storage_location(path: str, storage_uri: str) -> str:
    """A path Tune gives (inside the storage's filesystem, without its scheme) as the storage names it:
    `s3://bucket/...` for remote storage, so that any machine with access to the storage finds it."""
    if "://" not in storage_uri or "://" in path:
        return path
    return f"{storage_uri.split('://', 1)[0]}://{path.lstrip('/')}"


def collect_results(grid: Any, config: SweepConfig, *, rechecks: Any = None) -> pd.DataFrame:
    """One row per trial of a Tune ResultGrid, and of the seed re-checks' grid when given (sweeps.recheck):
    hyperparameters, seed, metrics, adapter path, status, origin, config_id (the trial whose configuration
    the row trains: itself, or for a re-check the trial it re-checks)."""
    from ray.tune.result import TIME_TOTAL_S, TRIAL_ID

    storage = config.storage_uri()
    results = list(grid)  # in the order Tune created the trials, also after a resume
    origins = trial_origins([r.config for r in results], config.labeled_points_to_evaluate)
    if rechecks is not None:
        results += list(rechecks)
        origins += [RECHECK] * (len(results) - len(origins))
    rows = []
    for result, origin in zip(results, origins, strict=True):
        history = result.metrics_dataframe
        metrics = result.metrics or {}
        last = TrialReport.from_tune(metrics)
        losses = (
            history[METRIC].dropna()
            if history is not None and METRIC in history
            else pd.Series([], dtype=float)
        )
        losses = losses[losses.map(math.isfinite)]  # a skipped_oom trial's infinite loss is for TPE only
        best_loss = float(losses.min()) if len(losses) else math.nan
        best = result.get_best_checkpoint(METRIC, MODE) if len(losses) else None
        lora = {name: result.config.get(name, getattr(config.lora, name)) for name in HYPERPARAMETERS}
        wall_time = float(metrics.get(TIME_TOTAL_S, math.nan))
        status = trial_status(
            last, errored=result.error is not None, best_eval_loss=best_loss, max_steps=config.train.max_steps
        )
        trial_id = metrics.get(TRIAL_ID) or result.path.rstrip("/").rsplit("/", 1)[-1]
        rows.append(
            {
                "trial_id": trial_id,
                "status": status,
                "origin": origin,
                "config_id": str(result.config.get(RECHECK_OF, trial_id)),
                "seed": int(result.config.get(SEED_KEY, config.train.seed)),
                **lora,
                "best_eval_loss": best_loss,
                "final_eval_loss": float(losses.iloc[-1]) if len(losses) else math.nan,
                "base_eval_loss": last.base_eval_loss,
                TRAIN_LOSS: last.train_loss,
                "steps": last.step,
                "tokens": last.tokens,
                "tokens_per_s": last.tokens_per_s,
                "peak_memory_gib": last.peak_memory_gib,
                "wall_time_s": wall_time,
                "estimated_memory_gib": last.estimated_memory_gib,
                "gpu_share": last.gpu_share,
                "gpu_seconds": gpu_seconds(wall_time, last.gpu_share),
                "cost_usd": dollars(gpu_seconds(wall_time, last.gpu_share), config.search.price_per_gpu_hour),
                "worker_pid": last.worker_pid,
                "worker_trial": last.worker_trial,
                "startup_s": last.startup_s,
                **{name: getattr(last, name) for name in START_PARTS},
                "base_copied": last.base_copied,
                "retries": last.retries,
                "restored_from_step": last.restored_from_step,
                "eval_history": [float(x) for x in losses],
                "adapter_path": storage_location(best.path, storage) if best is not None else None,
                "trial_path": storage_location(result.path, storage),
                "error": None
                if result.error is None
                else f"{type(result.error).__name__}: {result.error}"[:2000],
            }
        )
    table = pd.DataFrame(rows)
    if len(table):
        # Trials that failed, ran out of memory or crashed never rank above one that finished, whatever
        # eval loss they reported before failing.
        table["_unranked"] = ~table["status"].isin(RANKABLE_STATUSES)
        table = table.sort_values(["_unranked", "best_eval_loss"], na_position="last", kind="stable")
        table = table.drop(columns="_unranked").reset_index(drop=True)
        table.insert(0, "rank", range(1, len(table) + 1))
    return table


def format_results(table: pd.DataFrame, path: str, *, top: int = 10) -> str:  # 10 rows fit one screen
    """The results table as the driver prints it at the end: the best `top` trials and where they are."""
    if table.empty:
        return f"no trials ran; {path}"
    columns = [
        "rank",
        "status",
        *HYPERPARAMETERS[:5],
        "best_eval_loss",
        "base_eval_loss",
        "steps",
        "tokens_per_s",
        "estimated_memory_gib",
        "gpu_seconds",
    ]
    shown = table[columns].head(top).to_string(index=False, float_format=lambda x: f"{x:.4g}")
    best = table.iloc[0]
    return (
        f"\n{len(table)} trial(s); best eval_loss {best['best_eval_loss']:.4f} "
        f"(base model {best['base_eval_loss']:.4f}); {format_cost(table)}\n{shown}\n\n"
        f"results: {path}\nbest adapter: {best['adapter_path']}\n"
    )


def format_cost(table: pd.DataFrame) -> str:
    """The sweep's cost: GPU-hours (wall time x GPU share, summed over trials), dollars where priced."""
    hours = table["gpu_seconds"].sum() / SECONDS_PER_HOUR
    if not (table["gpu_share"] > 0).any():
        return f"CPU trials: 0 GPU-hours, {table['wall_time_s'].sum() / SECONDS_PER_HOUR:.3g} trial-hours"
    priced = table["cost_usd"].notna().any()
    return f"cost {hours:.4g} GPU-hours" + (f", ${table['cost_usd'].sum():.2f}" if priced else "")
