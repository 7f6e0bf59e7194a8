"""Two nodes with one (fake) GPU each: the driver runs one trial per node at the same time, then the report
on a GPU worker (the driver's process has no GPU, as on a cluster's head node). A trial that no node of such a
cluster can hold is refused at once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import tiny_sweep


@pytest.fixture
def two_node_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1})
    cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def test_trials_run_one_per_node_and_gpu_at_the_same_time_and_the_report_on_a_gpu(
    two_node_cluster, tmp_path: Path, tiny_llama: Path
) -> None:
    storage = tmp_path / "shared-storage"
    config = {
        "name": "cluster",
        "storage_path": str(storage),
        "experiment": "two-nodes",
        "model": {"name_or_path": str(tiny_llama), "gradient_checkpointing": False},
        "data": {"max_length": 128, "max_train_examples": 64, "max_eval_examples": 4},
        "train": {"max_steps": 6, "batch_size": 4, "eval_every": 2},
        "lora": {"target_modules": "qv"},
        "search": {
            "num_samples": 2,
            "cpus_per_trial": 1,
            "gpus_per_trial": 1,
            "scheduler": "none",
            "baselines": [],
            "space": {"r": {"choice": [4, 8]}},
        },
        "report": {"top_k": 1, "eval_prompts": 2, "prompts": ["Hi"], "generation": {"max_new_tokens": 4}},
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_ADDRESS": two_node_cluster.address}
    done = subprocess.run(
        [sys.executable, "-m", "sweeps.run", "--config", str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    table = pd.read_parquet(storage / "two-nodes" / "results.parquet")
    assert len(table) == 2 and set(table["status"]) == {"completed"}
    progress = [pd.read_csv(Path(p) / "progress.csv").iloc[-1] for p in table["trial_path"]]
    assert progress[0]["node_id"] != progress[1]["node_id"]  # one trial per node
    assert all(str(p["gpu_ids"]) == "0" for p in progress)  # exactly one GPU each (each node's only one)
    (a_start, a_end), (b_start, b_end) = [
        (p["started_at"], p["started_at"] + p["time_total_s"]) for p in progress
    ]
    assert a_start < b_end and b_start < a_end  # they overlapped in time
    assert all(Path(p).is_relative_to(storage) for p in table["adapter_path"])
    # The report: a Ray task holding one GPU, then its outputs beside the results.
    where = next(line for line in done.stdout.splitlines() if line.startswith("report: ran on a GPU worker"))
    assert "GPU ids [0]" in where and "exit 0" in where, where
    assert (storage / "two-nodes" / "report.html").exists()
    leaderboard = pd.read_parquet(storage / "two-nodes" / "leaderboard.parquet")
    # both trials, the base model and the trivial most-common-answer baseline
    assert {"base", "most-common"} <= set(leaderboard["candidate"].map(str)) and len(leaderboard) == 4


@pytest.fixture
def gpu_worker_cluster():
    """A CPU head of 2 CPUs and one worker of 1 CPU and 1 (fake) GPU: CPUs and GPUs on different nodes."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_a_trial_no_node_of_a_gpu_cluster_holds_is_refused_without_waiting(
    gpu_worker_cluster,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    tiny_llama: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sweeps.run import main

    monkeypatch.setenv("RAY_ADDRESS", gpu_worker_cluster.address)
    path = tiny_sweep(tmp_path, tiny_llama, "cluster")
    nodes = "this cluster has 2 nodes: 2 CPUs, 0 GPUs; 1 CPU, 1 GPU, and no autoscaler that could add a node"
    cases = {
        # Each node has 2 CPUs or a GPU, none both.
        ("search.gpus_per_trial=1", "search.cpus_per_trial=2"): (
            "search.cpus_per_trial=2: a trial asks for 2 CPUs and 1 GPU on one node, and the nodes with a GPU "
            f"have 1 CPU at most; {nodes}. Lower search.cpus_per_trial to 1 or less."
        ),
        # More CPUs than any node has; gpus_per_trial auto asks for a GPU on a cluster with GPUs.
        ("search.cpus_per_trial=4",): (
            "search.cpus_per_trial=4: a trial asks for 4 CPUs and 1 GPU on one node, and the largest node has "
            f"2 CPUs, those with a GPU 1 CPU; {nodes}. Lower search.cpus_per_trial to 1 or less."
        ),
    }
    for overrides, message in cases.items():
        start = time.monotonic()
        assert main(["--config", str(path), *overrides]) == 2
        assert time.monotonic() - start < 60  # no card query (120 s), no base eval that never runs
        out, err = capsys.readouterr()
        assert err.strip().splitlines()[-1] == f"error: {message}", err
        assert "memory estimate" not in out and "base model:" not in out
