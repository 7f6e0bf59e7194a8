"""The sweep's results table: one row per trial, written as results.parquet into the experiment folder."""

from __future__ import annotations

import math
import uuid
from typing import Any

import pandas as pd

from sweeps.config import SweepConfig
from trainable.settings import HYPERPARAMETERS, METRIC

RANKED = ("completed", "stopped")  # statuses that may be ranked; oom, failed and error trials come last


def trial_status(metrics: dict[str, Any], error: Any, max_steps: int, best_loss: float) -> str:
    if error is not None:
        return "error"  # crashed, and out of retries
    if metrics.get("oom"):
        return "oom"
    if metrics.get("diverged") or not math.isfinite(best_loss):
        return "failed"  # NaN/inf loss, or never a finite eval loss
    return "completed" if int(metrics.get("step", 0) or 0) >= max_steps else "stopped"  # early, by ASHA


def storage_location(path: str, storage_uri: str) -> str:
    """A path Tune gives (inside the storage's filesystem, without its scheme) as the storage names it:
    `s3://bucket/...` for remote storage, so that any machine with access to the storage finds it."""
    if "://" not in storage_uri or "://" in path:
        return path
    return f"{storage_uri.split('://', 1)[0]}://{path.lstrip('/')}"


def collect_results(grid: Any, config: SweepConfig) -> pd.DataFrame:
    """One row per trial of a Tune ResultGrid: hyperparameters, metrics, adapter path, status."""
    storage = config.storage_uri()
    rows = []
    for result in grid:
        history = result.metrics_dataframe
        metrics = result.metrics or {}
        losses = (
            history[METRIC].dropna()
            if history is not None and METRIC in history
            else pd.Series([], dtype=float)
        )
        best_loss = float(losses.min()) if len(losses) else math.nan
        best = result.get_best_checkpoint(METRIC, "min") if len(losses) else None
        last_step = int(metrics.get("step", 0) or 0)
        lora = {name: result.config.get(name, getattr(config.lora, name)) for name in HYPERPARAMETERS}
        rows.append(
            {
                "trial_id": metrics.get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1],
                "status": trial_status(metrics, result.error, config.train.max_steps, best_loss),
                **lora,
                "best_eval_loss": best_loss,
                "final_eval_loss": float(losses.iloc[-1]) if len(losses) else math.nan,
                "base_eval_loss": float(metrics.get("base_eval_loss", math.nan)),
                "train_loss": float(metrics.get("train_loss", math.nan)),
                "steps": last_step,
                "tokens": int(metrics.get("tokens", 0) or 0),
                "tokens_per_s": float(metrics.get("tokens_per_s", math.nan)),
                "peak_memory_gib": float(metrics.get("peak_memory_gib", math.nan)),
                "wall_time_s": float(metrics.get("time_total_s", math.nan)),
                "retries": int(metrics.get("retries", 0) or 0),
                "restored_from_step": int(metrics.get("restored_from_step", 0) or 0),
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
        table["_unranked"] = ~table["status"].isin(RANKED)
        table = table.sort_values(["_unranked", "best_eval_loss"], na_position="last", kind="stable")
        table = table.drop(columns="_unranked").reset_index(drop=True)
        table.insert(0, "rank", range(1, len(table) + 1))
    return table


def write_bytes(experiment_uri: str, name: str, data: bytes) -> str:
    """Write a file into the experiment folder (local or a pyarrow filesystem URI), under a temporary
    name first so that no reader ever sees half a file."""
    from pyarrow import fs

    filesystem, root = fs.FileSystem.from_uri(experiment_uri)
    filesystem.create_dir(root, recursive=True)
    final = f"{root.rstrip('/')}/{name}"
    staging = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
    with filesystem.open_output_stream(staging) as out:
        out.write(data)
    filesystem.move(staging, final)
    return final if "://" not in experiment_uri else f"{experiment_uri.rstrip('/')}/{name}"


def read_bytes(experiment_uri: str, name: str) -> bytes:
    """A file of the experiment folder (local or a URI); FileNotFoundError when it is not there."""
    from pyarrow import fs

    filesystem, root = fs.FileSystem.from_uri(experiment_uri)
    path = f"{root.rstrip('/')}/{name}"
    if filesystem.get_file_info(path).type != fs.FileType.File:
        raise FileNotFoundError(f"{experiment_uri.rstrip('/')}/{name}")
    with filesystem.open_input_stream(path) as f:
        return bytes(f.read())


def write_table(table: pd.DataFrame, experiment_uri: str, name: str) -> str:
    import io

    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    return write_bytes(experiment_uri, name, buffer.getvalue())


def format_summary(table: pd.DataFrame, path: str, *, top: int = 10) -> str:
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
    ]
    shown = table[columns].head(top).to_string(index=False, float_format=lambda x: f"{x:.4g}")
    best = table.iloc[0]
    return (
        f"\n{len(table)} trial(s); best eval_loss {best['best_eval_loss']:.4f} "
        f"(base model {best['base_eval_loss']:.4f})\n{shown}\n\n"
        f"results: {path}\nbest adapter: {best['adapter_path']}\n"
    )
