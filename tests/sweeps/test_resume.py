"""A killed driver's trial, resumed with `python -m sweeps.run --resume`, trains on as if it had never
stopped: from the newest checkpoint it had saved (also one that Tune's saved state did not know yet),
without writing into that checkpoint's folder, and step for step the losses of an uninterrupted run."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml

from analysis.experiment import load_experiment, load_histories
from tests.conftest import assert_resumed_from_checkpoints

MAX_STEPS = 8
EVAL_EVERY = 2
POINT = {"r": 8, "lora_alpha": 16}
# The driver and Ray are killed at step 7, after the trial's third checkpoint (step 6). Tune writes its
# experiment state when a trial has checkpointed num_to_keep (2) times since the last write, and, with
# TUNE_GLOBAL_CHECKPOINT_S below, at no other time during the run: the state knows step 4, not step 6.
HALT_AT = 7
NEWEST_AT_HALT = 6
# 16 examples of batch 4: 4 steps an epoch, so the resume at step 6 lands mid-epoch (the trainer skips the
# epoch's first 2 batches), and the run crosses epochs at steps 4 and 8.
TRAIN_EXAMPLES = 16
# The resumed losses equal the uninterrupted ones bit for bit on CPU (the same kernels, threads and data
# order); the tolerance leaves room for a float32 sum added up in another order (~1e-7 relative per
# addition), while a resumed trial that trains differently drifts by over 1e-5 within two steps (an
# adapter upcast from bf16 to float32 on loading: 5e-5 at step 8).
RELATIVE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class ResumedSweep:
    experiment: Path
    output: str  # the resumed driver's
    before: dict[str, dict[str, str]]  # the trial's checkpoint folders when the driver died: file -> sha256
    uninterrupted: list[dict]  # the same trial's reports, trained by hand without a stop


def write_config(tmp_path: Path, model: Path) -> Path:
    config = {
        "name": "resume",
        "storage_path": str(tmp_path / "experiments"),
        "experiment": "halted",
        "model": {"name_or_path": str(model), "gradient_checkpointing": False},
        "data": {"max_length": 128, "max_train_examples": TRAIN_EXAMPLES, "max_eval_examples": 4},
        "train": {"max_steps": MAX_STEPS, "batch_size": 4, "eval_every": EVAL_EVERY, "warmup_ratio": 0.0},
        "lora": {"target_modules": "qv", "learning_rate": 5.0e-3},  # lora_dropout 0.05: dropout draws RNG
        "search": {
            "num_samples": 1,
            "cpus_per_trial": 1,
            "scheduler": "none",
            "baselines": [],
            "initial_points": [POINT],
            "space": {"r": {"choice": [4, 8]}, "lora_alpha": {"choice": [8, 16]}},
        },
        "report": {"enabled": False},
    }
    path = tmp_path / "halted.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def checkpoint_files(trial: Path) -> dict[str, dict[str, str]]:
    return {
        folder.name: {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}
        for folder in sorted(trial.glob("checkpoint_*"))
    }


def trial_folder(experiment: Path) -> Path:
    (trial,) = [p for p in experiment.iterdir() if p.is_dir() and p.name.startswith("train_trial")]
    return trial


def uninterrupted_reports(config: Path, output_dir: Path) -> list[dict]:
    """The trial as the sweep runs it (the driver's settings for it), trained by hand in this process."""
    from sweeps.config import load_config
    from sweeps.plan import plan_sweep
    from trainable.train import train_by_hand

    plan = plan_sweep(load_config(str(config), []))
    # As the sweep gives a CPU trial its settings (sweeps.run.trial_trainable); the base model's loss is
    # only reported, not trained on.
    settings = dataclasses.replace(plan.trial, reused_worker=True, base_eval_loss=0.0)
    return train_by_hand(POINT, settings, output_dir=output_dir)


@pytest.fixture(scope="module")
def resumed_sweep(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> ResumedSweep:
    tmp = tmp_path_factory.mktemp("resume")
    config = write_config(tmp, tiny_llama)
    command = [sys.executable, "-m", "sweeps.run", "--config", str(config)]
    halted = subprocess.run(
        command,
        cwd=tmp,
        env={**os.environ, "QLORA_SWEEPS_FAULTS": f"halt@{HALT_AT}", "TUNE_GLOBAL_CHECKPOINT_S": "3600"},
        capture_output=True,
        text=True,
        timeout=600,
        start_new_session=True,  # the group the halt kills: this driver and the Ray it starts
    )
    assert halted.returncode == -signal.SIGKILL, (halted.stdout + halted.stderr)[-4000:]
    experiment = tmp / "experiments" / "halted"
    before = checkpoint_files(trial_folder(experiment))
    resumed = subprocess.run([*command, "--resume"], cwd=tmp, capture_output=True, text=True, timeout=600)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-4000:]
    return ResumedSweep(experiment, output, before, uninterrupted_reports(config, tmp / "by-hand"))


def test_resumed_trial_trains_the_steps_of_an_uninterrupted_one(resumed_sweep: ResumedSweep) -> None:
    table = pd.read_parquet(resumed_sweep.experiment / "results.parquet")
    (trial,) = table.itertuples()
    assert trial.status == "completed" and trial.retries == 1
    history = load_histories(load_experiment(resumed_sweep.experiment))
    uninterrupted = pd.DataFrame(resumed_sweep.uninterrupted)
    assert list(history["step"]) == list(uninterrupted["step"]) == [2, 4, 6, 8]
    for column in ("eval_loss", "train_loss"):
        resumed, expected = list(history[column]), list(uninterrupted[column])
        assert resumed == pytest.approx(expected, rel=RELATIVE_TOLERANCE, abs=0), column


def test_resumed_trial_continues_from_the_newest_checkpoint_it_saved(resumed_sweep: ResumedSweep) -> None:
    # Tune's saved state knew the step-4 checkpoint; the trial had saved step 6 before the driver died.
    assert f"from its step-{NEWEST_AT_HALT} checkpoint" in resumed_sweep.output, resumed_sweep.output[-4000:]
    table = pd.read_parquet(resumed_sweep.experiment / "results.parquet")
    assert table.loc[0, "restored_from_step"] == NEWEST_AT_HALT
    trial = trial_folder(resumed_sweep.experiment)
    progress = pd.read_csv(trial / "progress.csv")
    history = load_histories(load_experiment(resumed_sweep.experiment))
    assert_resumed_from_checkpoints(progress, history, max_steps=MAX_STEPS)
    # Step 6 trained once: its report, sent again as it was, then step 8 after the restart.
    assert list(progress["step"]) == [2, 4, 6, 8] and list(progress["retries"]) == [0, 0, 0, 1]


def test_newest_checkpoint_folder_is_not_written_again(resumed_sweep: ResumedSweep) -> None:
    import json

    newest = max(resumed_sweep.before)
    state = json.loads((trial_folder(resumed_sweep.experiment) / newest / "trainer_state.json").read_text())
    assert state["global_step"] == NEWEST_AT_HALT
    after = checkpoint_files(trial_folder(resumed_sweep.experiment))
    assert after[newest] == resumed_sweep.before[newest]
    assert all(name > newest for name in set(after) - set(resumed_sweep.before)), sorted(after)


def test_study_holds_the_best_eval_loss_of_each_trial(resumed_sweep: ResumedSweep) -> None:
    import optuna

    from sweeps.study import TRIAL_KEY

    table = pd.read_parquet(resumed_sweep.experiment / "results.parquet")
    storage = f"sqlite:///{resumed_sweep.experiment / 'optuna.db'}"
    study = optuna.load_study(study_name="halted", storage=storage)
    assert {t.user_attrs[TRIAL_KEY]: t.value for t in study.trials} == dict(
        zip(table["trial_id"], table["best_eval_loss"], strict=True)
    )
