"""Trial start with and without reused workers: the same sweep run with search.reuse_workers on and off,
alternately, several times; each trial's start from its worker process's start (a reused worker: from its
previous trial's end) to the end of its first optimizer step, in the parts the trial reports.

    python -m bench.start.trial_start --config bench/start/trial_start.yaml --repeats 3 --out results/ \\
        model.name_or_path=/path/to/tiny-llama

Runs `python -m sweeps.run` as a user would (the trials report their start in results.parquet: worker_pid,
worker_trial, startup_s and the start_* parts) and times each driver from outside. Appends one line per
trial and one per sweep to trial_start.jsonl under --out and prints medians with their ranges.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from trainable.outcome import START_PARTS

MODES = {"reuse": "true", "no-reuse": "false"}


def run_sweep(config: str, overrides: list[str], *, mode: str, repeat: int, storage: Path) -> dict[str, Any]:
    """One sweep in its own driver process; its table and its wall time."""
    experiment = f"trial-start-{mode}-{repeat}"
    command = [
        sys.executable,
        "-m",
        "sweeps.run",
        "--config",
        config,
        "--quiet",
        *overrides,
        f"storage_path={storage}",
        f"experiment={experiment}",
        f"search.reuse_workers={MODES[mode]}",
    ]
    load_before = os.getloadavg()[0]  # other work on the machine slows both modes; say how much there was
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{mode} #{repeat} failed:\n{done.stderr[-4000:]}")
    return {
        "table": pd.read_parquet(storage / experiment / "results.parquet"),
        "wall_s": wall,
        "load_1min": [load_before, os.getloadavg()[0]],
    }


def trial_rows(table: pd.DataFrame, *, mode: str, repeat: int) -> list[dict[str, Any]]:
    rows = []
    for row in table.to_dict("records"):
        # The trial's own time: from its start (as startup_s counts it) to its end.
        total = row["start_imports_s"] + row["start_worker_s"] + row["wall_time_s"]
        rows.append(
            {
                "kind": "trial",
                "mode": mode,
                "repeat": repeat,
                "trial_id": row["trial_id"],
                "worker_pid": int(row["worker_pid"]),
                "worker_trial": int(row["worker_trial"]),
                "startup_s": row["startup_s"],
                **{p: row[p] for p in START_PARTS},
                "wall_time_s": row["wall_time_s"],
                "trial_s": total,
                "startup_share": row["startup_s"] / total,
            }
        )
    return rows


def spread(values: list[float]) -> str:
    """Median [min-max]."""
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def summarize(rows: list[dict[str, Any]]) -> str:
    """A markdown table: per mode and kind of worker, the median [range] of every part of the start."""
    trials = pd.DataFrame([r for r in rows if r["kind"] == "trial"])
    sweeps = pd.DataFrame([r for r in rows if r["kind"] == "sweep"])
    columns = ["startup_s", *START_PARTS, "startup_share"]
    lines = ["| mode | trials | " + " | ".join(columns) + " |", "| --- " * (len(columns) + 2) + "|"]
    for mode in MODES:
        for label, pick in (
            ("new worker", trials["worker_trial"] == 1),
            ("reused worker", trials["worker_trial"] > 1),
        ):
            group = trials[(trials["mode"] == mode) & pick]
            if group.empty:
                continue
            cells = [spread(list(group[c])) for c in columns]
            lines.append(f"| {mode} | {label}, n={len(group)} | " + " | ".join(cells) + " |")
    lines.append("")
    for mode in MODES:
        walls = list(sweeps[sweeps["mode"] == mode]["wall_s"])
        if walls:
            lines.append(f"{mode}: driver wall time {spread(walls)} s over {len(walls)} sweeps")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a config name or YAML path, as for sweeps.run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    p.add_argument("overrides", nargs="*", help="dotted overrides for every sweep")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for repeat in range(1, args.repeats + 1):
        for mode in MODES:  # alternated, so that a drift in the machine's load touches both alike
            sweep = run_sweep(
                args.config, args.overrides, mode=mode, repeat=repeat, storage=out / "experiments"
            )
            new = trial_rows(sweep["table"], mode=mode, repeat=repeat)
            new.append(
                {
                    "kind": "sweep",
                    "mode": mode,
                    "repeat": repeat,
                    "wall_s": sweep["wall_s"],
                    "load_1min": sweep["load_1min"],
                    "trials": len(sweep["table"]),
                    "workers": sweep["table"]["worker_pid"].nunique(),
                }
            )
            with open(out / "trial_start.jsonl", "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in new)
            rows += new
            load = "/".join(f"{x:.1f}" for x in sweep["load_1min"])
            print(
                f"{mode} #{repeat}: {sweep['wall_s']:.1f} s, {new[-1]['workers']} worker(s), load {load}",
                flush=True,
            )
    print(summarize(rows))


if __name__ == "__main__":
    main()
