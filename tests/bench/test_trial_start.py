"""The trial-start benchmark: its config loads, and its summary reports medians and ranges per kind of
worker."""

from __future__ import annotations

from pathlib import Path

from bench.start.trial_start import summarize
from sweeps.config import load_config
from trainable.outcome import START_PARTS

REPO = Path(__file__).resolve().parents[2]


def test_config_loads_with_four_fixed_trials() -> None:
    config = load_config(str(REPO / "bench/start/trial_start.yaml"))
    points = [p.values for p in config.starting_points(None)]
    assert config.search.num_samples == len(points) == 4
    # Optuna's warm start takes only points that name every searched hyperparameter.
    assert all(set(point) == set(config.search.space) for point in points)
    assert config.search.scheduler == "none" and config.search.cpus_per_trial == 1


def test_summary_splits_new_and_reused_workers() -> None:
    def trial(mode: str, worker_trial: int, startup: float) -> dict[str, object]:
        parts = dict.fromkeys(START_PARTS, startup / len(START_PARTS))
        return {
            "kind": "trial",
            "mode": mode,
            "worker_trial": worker_trial,
            "startup_s": startup,
            **parts,
            "startup_share": 0.5,
        }

    rows = [
        trial("reuse", 1, 10.0),
        trial("reuse", 2, 2.0),
        trial("reuse", 2, 4.0),
        trial("no-reuse", 1, 9.0),
        {"kind": "sweep", "mode": "reuse", "wall_s": 30.0},
        {"kind": "sweep", "mode": "no-reuse", "wall_s": 40.0},
    ]
    text = summarize(rows)
    assert "| reuse | reused worker, n=2 | 3.00 [2.00-4.00] |" in text
    assert "| reuse | new worker, n=1 | 10.00 [10.00-10.00] |" in text
    assert "no-reuse | reused" not in text
    assert "no-reuse: driver wall time 40.00 [40.00-40.00] s over 1 sweeps" in text
