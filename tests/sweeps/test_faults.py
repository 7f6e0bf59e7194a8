"""Faults injected for real (a killed trial process, CUDA OOM, NaN loss, a killed driver) into sweeps of a
tiny random Llama run through `python -m sweeps.run`."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from analysis.experiment import load_experiment, load_histories
from tests.conftest import assert_resumed_from_checkpoints

MAX_STEPS = 8

POINTS = [
    {"r": 8, "lora_alpha": 16},  # healthy
    {"r": 4, "lora_alpha": 16},  # runs out of memory at step 2
    {"r": 8, "lora_alpha": 8},  # loss turns NaN after step 3
    {"r": 16, "lora_alpha": 16},  # its process is killed at step 5, once
]
FAULTS = "oom@2:r=4; nan@3:lora_alpha=8; kill@5:r=16"


def write_config(
    tmp_path: Path, model: Path, *, experiment: str, num_samples: int, points: list[dict]
) -> Path:
    config = {
        "name": "faults",
        "storage_path": str(tmp_path / "experiments"),
        "experiment": experiment,
        "model": {"name_or_path": str(model), "gradient_checkpointing": False},
        "data": {"max_length": 128, "max_train_examples": 64, "max_eval_examples": 4},
        "train": {"max_steps": MAX_STEPS, "batch_size": 4, "eval_every": 2, "warmup_ratio": 0.0},
        "lora": {"target_modules": "qv", "learning_rate": 5.0e-3},
        "search": {
            "num_samples": num_samples,
            "cpus_per_trial": 1,
            "scheduler": "none",
            "baselines": [],
            "initial_points": points,
            "space": {"r": {"choice": [4, 8, 16]}, "lora_alpha": {"choice": [8, 16]}},
        },
        "report": {"enabled": False},
    }
    path = tmp_path / f"{experiment}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def driver(config: Path, *extra: str, env: dict[str, str] | None = None, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sweeps.run", "--config", str(config), *extra],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: killing it takes Ray's processes along
    )


@pytest.fixture(scope="module")
def faulty_sweep(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> pd.DataFrame:
    tmp = tmp_path_factory.mktemp("faults")
    config = write_config(tmp, tiny_llama, experiment="faulty", num_samples=4, points=POINTS)
    process = driver(config, env={"QLORA_SWEEPS_FAULTS": FAULTS}, cwd=tmp)
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output[-4000:]
    table = pd.read_parquet(tmp / "experiments" / "faulty" / "results.parquet")
    table = table.set_index(table["r"].astype(str) + "/" + table["lora_alpha"].astype(int).astype(str))
    table.attrs["experiment"] = tmp / "experiments" / "faulty"  # where its study is
    return table


def test_killed_trial_resumes_from_its_checkpoint(faulty_sweep: pd.DataFrame) -> None:
    killed = faulty_sweep.loc["16/16"]
    assert killed["status"] == "completed" and killed["step"] == 8
    assert killed["retries"] == 1
    assert killed["restored_from_step"] == 4  # the last checkpoint before the kill at step 5, not step 0
    assert len(killed["eval_history"]) == 4  # evaluations at steps 2, 4 (first run), 6, 8 (after the retry)


def test_oom_trial_is_recorded_without_retries(faulty_sweep: pd.DataFrame) -> None:
    oom = faulty_sweep.loc["4/16"]
    assert oom["status"] == "oom" and oom["retries"] == 0 and oom["error"] is None


def test_nan_trial_fails_and_is_never_best(faulty_sweep: pd.DataFrame) -> None:
    nan = faulty_sweep.loc["8/8"]
    assert nan["status"] == "failed"
    ranked = faulty_sweep.sort_values("rank")["status"].tolist()
    assert ranked[:2] == ["completed", "completed"] and set(ranked[2:]) == {"oom", "failed"}


def test_every_trial_of_the_users_points_is_marked_so(faulty_sweep: pd.DataFrame) -> None:
    assert set(faulty_sweep["origin"]) == {"initial"}  # 4 points, 4 trials, the recipe off


def study_values(experiment: Path) -> dict[str, float | None]:
    """The recorded Optuna study's value of each trial, by Tune's trial id."""
    import optuna

    from sweeps.study import TRIAL_KEY

    study = optuna.load_study(study_name=experiment.name, storage=f"sqlite:///{experiment / 'optuna.db'}")
    return {t.user_attrs[TRIAL_KEY]: t.value for t in study.trials}


def test_study_holds_the_best_eval_loss_results_rank_by(faulty_sweep: pd.DataFrame) -> None:
    values = study_values(faulty_sweep.attrs["experiment"])
    completed = faulty_sweep["status"] == "completed"
    assert completed.sum() == 2 and set(values) == set(faulty_sweep["trial_id"])
    for trial in faulty_sweep.itertuples():  # a failed trial has no value
        assert values[trial.trial_id] == (trial.best_eval_loss if trial.status == "completed" else None)


def test_driver_killed_repeatedly_then_resumed(tmp_path: Path, tiny_llama: Path) -> None:
    points = [{"r": 4, "lora_alpha": 8}, {"r": 8, "lora_alpha": 16}]
    config = write_config(tmp_path, tiny_llama, experiment="killed", num_samples=4, points=points)
    rng = random.Random(0)
    experiment = tmp_path / "experiments" / "killed"
    first = True
    for attempt in range(8):
        process = driver(config, *([] if first else ["--resume"]), cwd=tmp_path)
        first = False
        if attempt < 3:
            # Kill it at a random point once trials are running (checkpoints appear after a few seconds).
            deadline = time.time() + rng.uniform(20, 45)
            while time.time() < deadline and process.poll() is None:
                time.sleep(0.5)
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                continue
        process.communicate(timeout=900)
        if process.returncode == 0 and (experiment / "results.parquet").exists():
            break
    else:
        pytest.fail("the sweep never finished")
    table = pd.read_parquet(experiment / "results.parquet")
    assert len(table) == 4 and table["trial_id"].is_unique
    assert set(table["status"]) == {"completed"}
    # Resumed three times, the table still knows which trials were the user's points.
    initial = table[table["origin"] == "initial"]
    assert sorted(zip(initial["r"], initial["lora_alpha"], strict=True)) == [(4, 8), (8, 16)]
    assert (table["origin"] == "search").sum() == 2
    histories = load_histories(load_experiment(experiment))
    assert all(len(losses) == MAX_STEPS // 2 for losses in table["eval_history"])  # each evaluation once
    for trial_id, trial_path in zip(table["trial_id"], table["trial_path"], strict=True):
        progress = pd.read_csv(Path(trial_path) / "progress.csv")
        history = histories[histories["trial_id"] == trial_id]
        assert_resumed_from_checkpoints(progress, history, max_steps=MAX_STEPS)

    import optuna

    study = optuna.load_study(study_name="killed", storage=f"sqlite:///{experiment / 'optuna.db'}")
    assert len(study.trials) == 4
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert study_values(experiment) == dict(zip(table["trial_id"], table["best_eval_loss"], strict=True))
