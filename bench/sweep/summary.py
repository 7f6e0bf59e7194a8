"""One JSON line about a finished sweep: its wall time and, per trial, the GPU Tune gave it and its speed.

    python -m bench.sweep.summary EXPERIMENT_DIR --label two-at-a-time --wall-s 123.4 --out results/

Reads results.parquet (the driver's table) and each trial's result.json (Tune's reports, which carry
`cuda_visible_devices` and `visible_gpus`); the trials' time intervals give how many ran at once.
Appends to sweeps.jsonl under --out.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from trainable.outcome import START_PARTS, TrialReport


def trial_reports(experiment: Path) -> dict[str, list[dict[str, Any]]]:
    reports = {}
    for result in sorted(experiment.glob("*/result.json")):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if lines:
            reports[str(lines[-1].get("trial_id", result.parent.name))] = lines
    return reports


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = best = 0
    for _, change in events:
        running += change
        best = max(best, running)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiment")
    p.add_argument("--label", required=True)
    p.add_argument("--wall-s", type=float, required=True, help="the driver's wall time, measured outside")
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    args = p.parse_args()
    experiment = Path(args.experiment)
    table = pd.read_parquet(experiment / "results.parquet")
    reports = trial_reports(experiment)
    trials, intervals = [], []
    for row in table.to_dict("records"):
        lines = reports.get(str(row["trial_id"]), [])
        last = lines[-1] if lines else {}
        report = TrialReport.from_tune(last) if lines else None
        end = float(last.get("timestamp", 0))
        start = end - float(last.get("time_total_s", 0))
        intervals.append((start, end))
        trials.append(
            {
                "trial_id": row["trial_id"],
                "status": row["status"],
                "steps": int(row["step"]),
                "best_eval_loss": round(float(row["best_eval_loss"]), 4),
                "base_eval_loss": round(float(row["base_eval_loss"]), 4),
                "tokens_per_s": round(float(row["tokens_per_s"]), 1),
                "peak_memory_gib": round(float(row["peak_memory_gib"]), 2),
                "wall_time_s": round(float(row["wall_time_s"]), 1),
                # The trial's start (docs/cost.md#trial-start): its worker's n-th trial, process start to first step.
                "worker_trial": int(row["worker_trial"]),
                **{part: round(float(row[part]), 2) for part in ("startup_s", *START_PARTS)},
                "base_copied": bool(row.get("base_copied", False)),
                "cuda_visible_devices": report.cuda_visible_devices if report else None,
                "visible_gpus": report.visible_gpus if report else None,
                "ray_gpu_ids": report.gpu_ids if report else None,
                "hparams": {
                    k: row[k]
                    for k in ("r", "lora_alpha", "target_modules", "learning_rate", "lora_dropout")
                    if k in row
                },
                "error": row.get("error"),
            }
        )
    devices = [t["cuda_visible_devices"] for t in trials]
    record = {
        "label": args.label,
        "experiment": experiment.name,
        "sweep_wall_s": args.wall_s,
        "trials": len(trials),
        "most_trials_at_once": most_at_once(intervals) if all(e > 0 for _, e in intervals) else None,
        "distinct_devices": sorted({d for d in devices if d is not None}),
        "every_trial_saw_one_gpu": all(t["visible_gpus"] == 1 for t in trials),
        "per_trial": trials,
    }
    print(json.dumps(record, default=str), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sweeps.jsonl", "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


if __name__ == "__main__":
    main()
