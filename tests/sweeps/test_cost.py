"""What a sweep costs and what it refuses to start, through `python -m sweeps.run` on a tiny random Llama:
trials sharing one (fake) GPU, a configuration predicted not to fit skipped before it loads anything, and a
GPU-hour budget that stops launching trials."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

# LoRA on every linear layer at the largest r against r=4 on q and v: the two ends of the tiny model's
# memory estimates.
BIG = {"r": 1024, "target_modules": "all-linear"}
SMALL = {"r": 4, "target_modules": "qv"}


def write_config(tmp_path: Path, model: Path, **search: Any) -> Path:
    config = {
        "name": "cost",
        "storage_path": str(tmp_path / "experiments"),
        "experiment": "cost-test",
        "model": {"name_or_path": str(model), "gradient_checkpointing": False},
        "data": {"max_length": 128, "max_train_examples": 64, "max_eval_examples": 4},
        "train": {"max_steps": 6, "batch_size": 4, "eval_every": 2},
        "search": {
            "cpus_per_trial": 1,
            "scheduler": "none",
            "baselines": [],
            "space": {"r": {"choice": [4, 1024]}, "target_modules": {"choice": ["qv", "all-linear"]}},
            **search,
        },
        "report": {"enabled": False},
    }
    path = tmp_path / "cost.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_driver(
    config: Path, *, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "sweeps.run", "--config", str(config)],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture
def one_gpu_node():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1})
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


@pytest.mark.slow
def test_two_trials_share_one_gpu_when_trials_per_gpu_says_so(
    one_gpu_node, tmp_path: Path, tiny_llama: Path
) -> None:
    config = write_config(
        tmp_path,
        tiny_llama,
        num_samples=2,
        trials_per_gpu=2,
        price_per_gpu_hour=3.0,
        initial_points=[SMALL, {"r": 4, "target_modules": "all-linear"}],
    )
    done = run_driver(config, cwd=tmp_path, env={"RAY_ADDRESS": one_gpu_node.address})
    assert "2 trial(s) per GPU, 2 at once" in done.stdout
    table = pd.read_parquet(tmp_path / "experiments" / "cost-test" / "results.parquet")
    assert len(table) == 2 and set(table["status"]) == {"completed"}
    assert set(table["gpu_share"]) == {0.5}
    assert (table["gpu_seconds"] - 0.5 * table["wall_time_s"]).abs().max() < 1e-9
    assert (table["cost_usd"] - table["gpu_seconds"] / 3600 * 3.0).abs().max() < 1e-12
    progress = [pd.read_csv(Path(p) / "progress.csv").iloc[-1] for p in table["trial_path"]]
    assert progress[0]["node_id"] == progress[1]["node_id"]  # the cluster's only node ...
    assert all(str(p["gpu_ids"]) == "0" for p in progress)  # ... and its only GPU, for both
    (a_start, a_end), (b_start, b_end) = [
        (p["started_at"], p["started_at"] + p["time_total_s"]) for p in progress
    ]
    assert a_start < b_end and b_start < a_end  # at the same time
    assert "GPU-hours" in done.stdout


@pytest.mark.slow
def test_a_config_predicted_not_to_fit_is_skipped_and_the_budget_stops_the_sweep(
    tmp_path: Path, tiny_llama: Path
) -> None:
    import optuna

    from sweeps.config import load_config
    from sweeps.plan import plan_sweep
    from sweeps.resources import trial_memory
    from trainable.memory import estimate_trial_memory

    # A card between the two configurations' estimates, computed by the driver's own functions.
    probe = write_config(tmp_path, tiny_llama)
    memory = trial_memory(plan_sweep(load_config(str(probe))), card_gib=1.0)
    assert memory is not None
    lora = load_config(str(probe)).lora
    big, small = (
        estimate_trial_memory(memory, dataclasses.replace(lora, **p)).total_gib for p in (BIG, SMALL)
    )
    assert small < big
    card = (small + big) / 2
    num_samples = 20  # far more than the budget allows, however fast a trial is
    # 5 trial-seconds (a CPU sweep counts its trials' wall time): a few trials, far fewer than num_samples.
    config = write_config(
        tmp_path,
        tiny_llama,
        num_samples=num_samples,
        max_concurrent_trials=2,
        trials_per_gpu=1,
        gpu_memory_gib=card,
        budget_gpu_hours=5 / 3600,
        initial_points=[BIG, SMALL],
    )
    done = run_driver(config, cwd=tmp_path)
    experiment = tmp_path / "experiments" / "cost-test"
    table = pd.read_parquet(experiment / "results.parquet")

    # The budget: the sweep ended early, normally, with its finished trials.
    assert "budget:" in done.stdout and "no new trials" in done.stdout
    assert 2 <= len(table) < num_samples
    assert set(table["status"]) == {"skipped_oom", "completed"}
    skipped = table[table["status"] == "skipped_oom"]
    assert (skipped["estimated_memory_gib"] > card).all()
    # Skipped: the big configuration (the first initial point), over the card, nothing trained or loaded.
    row = table[table["origin"] == "initial"].set_index("r").loc[BIG["r"]]
    assert row["status"] == "skipped_oom" and row["target_modules"] == BIG["target_modules"]
    assert row["estimated_memory_gib"] == pytest.approx(big, abs=1e-6) and row["estimated_memory_gib"] > card
    assert row["step"] == 0 and pd.isna(row["adapter_path"]) and pd.isna(row["best_eval_loss"])
    assert not list(Path(row["trial_path"]).glob("checkpoint_*"))
    assert row["wall_time_s"] < 5  # no model load, no eval: loading and evaluating alone take longer
    assert row["rank"] > len(table) - len(skipped)  # never ranked above a trial that ran
    ran = table[table["status"] == "completed"]
    assert (ran["estimated_memory_gib"] <= card).all() and (
        ran["best_eval_loss"] < ran["base_eval_loss"]
    ).all()
    # The study marks it infeasible.
    study = optuna.load_study(study_name="cost-test", storage=f"sqlite:///{experiment / 'optuna.db'}")
    states = {(t.params["r"], t.params["target_modules"]): t.state for t in study.trials}
    assert states[(BIG["r"], BIG["target_modules"])] == optuna.trial.TrialState.FAIL
    assert states[(SMALL["r"], SMALL["target_modules"])] == optuna.trial.TrialState.COMPLETE
    # CPU trials hold no GPU: 0 GPU-seconds, said so in the summary.
    assert (table["gpu_seconds"] == 0).all() and "CPU trials: 0 GPU-hours" in done.stdout


def test_mps_counts_as_running_only_when_its_control_daemon_answers(tmp_path: Path) -> None:
    # nvidia-cuda-mps-control's front end exits 0 when its daemon answers `get_server_list`, non-zero when no
    # daemon runs; these stand-ins answer the same way (and one never answers).
    from sweeps.resources import mps_running

    def program(name: str, body: str) -> str:
        path = tmp_path / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
        return str(path)

    assert mps_running(program("daemon-up", 'read line; [ "$line" = get_server_list ] && echo 4242'))
    assert not mps_running(
        program("daemon-down", "echo 'Cannot find MPS control daemon process' >&2; exit 1")
    )
    assert not mps_running(program("stuck", "sleep 30"))
    assert not mps_running(str(tmp_path / "not-installed"))


def test_the_driver_says_when_trials_share_a_card_without_mps() -> None:
    from sweeps.console import describe_resources
    from sweeps.resources import TrialResources

    def line(per_gpu: int, mps: bool | None) -> str:
        return describe_resources(
            TrialResources(gpus=1, trials_per_gpu=per_gpu, concurrency=per_gpu, memory=None, mps=mps)
        )

    assert "take turns" in line(8, False) and "nvidia-cuda-mps-control -d" in line(8, False)
    assert "CUDA MPS on" in line(8, True) and "note:" not in line(8, True)
    assert "MPS" not in line(1, False)  # one trial per card: nothing to share
    assert "MPS" not in line(8, None)  # not asked (search.gpu_memory_gib set, or Ray's fake GPUs)
