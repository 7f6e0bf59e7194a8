"""A real sweep of the tiny random Llama through the driver, made once for all analysis tests.

Three trials of four steps, evaluated every two, the first the calibrated-default baseline, with the report
on: the driver runs `python -m analysis.report` at the end, as it does for a user.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
TRIALS = 3
EVAL_PROMPTS = 5
USER_PROMPTS = ["Write me a poem about Singapore", "Name a colour."]


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    """The experiment folder of a finished 3-trial sweep whose report the driver has written."""
    root = tmp_path_factory.mktemp("sweep")
    config = {
        "name": "tiny",
        "storage_path": str(root / "experiments"),
        "experiment": "tiny",
        "model": {"name_or_path": str(tiny_llama), "gradient_checkpointing": False},
        "data": {"max_length": 128, "max_eval_examples": 8},
        "train": {"max_steps": 4, "batch_size": 4, "eval_every": 2},
        "search": {"num_samples": TRIALS, "cpus_per_trial": 1, "baselines": ["calibrated"]},
        "report": {
            "enabled": True,
            "top_k": 2,
            "eval_prompts": EVAL_PROMPTS,
            "prompts": USER_PROMPTS,
            "generation": {"max_new_tokens": 6},
        },
    }
    path = root / "tiny.yaml"
    path.write_text("# python -m sweeps.run --config tiny.yaml\n" + yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "sweeps.run", "--config", str(path)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    experiment = root / "experiments" / "tiny"
    log = root / "sweep.log"
    log.write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    assert done.returncode == 0, f"the sweep failed; its output: {log}\n{done.stderr[-3000:]}"
    assert (experiment / "results.parquet").is_file(), f"no results.parquet; the sweep's output: {log}"
    assert (experiment / "report.html").is_file(), f"the driver did not run the report; its output: {log}"
    return experiment
