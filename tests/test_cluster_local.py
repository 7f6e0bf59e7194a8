"""The cluster path of docs/cluster.md on one machine: cluster.local.yaml (Ray's fake_multinode provider) agrees
with cluster.yaml, and a sweep submitted with the docs' own command autoscales fake GPU workers and runs there.

What `ray up` does for the head, done here by hand, because the fake provider has neither SSH nor Docker: write
the bootstrap config to the head's home and run cluster.yaml's head start command (less its `ray stop`, which
would stop every Ray on this machine). Everything binds to 127.0.0.1; nothing leaves the machine.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from ray.autoscaler._private.commands import _bootstrap_config
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID, FAKE_HEAD_NODE_TYPE
from ray.autoscaler._private.util import prepare_config

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO_ROOT / "cluster.yaml"
LOCAL_YAML = REPO_ROOT / "cluster.local.yaml"
DOCS = REPO_ROOT / "docs" / "cluster.md"
# What may differ: where nodes come from. Everything a node runs or receives must be the same.
NODE_KEYS = {"provider", "available_node_types", "head_node_type"}
# Ray's AWS defaults, which cluster.local.yaml must spell out because an external provider gets none.
AWS_DEFAULT_KEYS = {
    "head_setup_commands",
    "worker_setup_commands",
    "cluster_synced_files",
    "file_mounts_sync_continuously",
    "upscaling_speed",
    "docker",
}
# The head's ports in cluster.yaml's start command, and the dashboard's default that docs/cluster.md uses.
HEAD_PORTS = (6379, 8076, 8265)
DASHBOARD = "http://127.0.0.1:8265"
# The sweep the docs submit, with what only AWS has replaced: the 7B config and the S3 bucket.
DOCS_SWEEP_ARGS = "--config llama2-7b storage_path=s3://$BUCKET/sweeps"


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def test_local_cluster_differs_only_in_its_nodes() -> None:
    aws, local = load(CLUSTER_YAML), load(LOCAL_YAML)
    assert local["provider"]["module"].endswith("fake_multi_node.node_provider.FakeMultiNodeProvider")
    for key in (aws.keys() | local.keys()) - NODE_KEYS - AWS_DEFAULT_KEYS:
        assert aws.get(key) == local.get(key), f"{key} differs between cluster.yaml and cluster.local.yaml"

    # As `ray up` sees them (Ray's defaults merged, setup commands per node kind): what the head and the
    # workers run, what they receive and how Ray starts on them is the same.
    aws_launched, local_launched = prepare_config(copy.deepcopy(aws)), prepare_config(copy.deepcopy(local))
    # auth: AWS's SSH user; the fake nodes are reached without SSH.
    assert aws_launched.keys() == local_launched.keys()
    shared = aws_launched.keys() - NODE_KEYS - {"auth"}
    for key in (
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "initialization_commands",
        "file_mounts",
        "rsync_exclude",
        "rsync_filter",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    ):
        assert key in shared, key
    for key in shared:
        assert aws_launched[key] == local_launched[key], f"{key} differs once Ray's defaults are merged"

    # The same node kinds: a head without GPUs, and GPU workers preferred in the same order.
    nodes = local["available_node_types"]
    assert local["head_node_type"] == FAKE_HEAD_NODE_TYPE
    assert nodes[FAKE_HEAD_NODE_TYPE]["resources"].get("GPU", 0) == 0
    workers = {name: node for name, node in nodes.items() if name != FAKE_HEAD_NODE_TYPE}
    assert set(workers) == set(aws["available_node_types"]) - {aws["head_node_type"]}
    for name, node in workers.items():
        assert node["resources"]["GPU"] == aws["available_node_types"][name]["resources"]["GPU"], name
        assert node.get("priority", 0) == aws["available_node_types"][name].get("priority", 0), name


def docs_submit_script() -> str:
    """docs/cluster.md's "Run a sweep" commands from `export RAY_ADDRESS` on: the environment and the submit."""
    section = DOCS.read_text().split("## Run a sweep", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = block.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("export RAY_ADDRESS="))
    script = "\n".join(lines[start:])
    assert "ray job submit" in script and script.count(DOCS_SWEEP_ARGS) == 1, script
    return script


def port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def processes_of(marker: str) -> list[int]:
    """Ids of the processes whose environment holds `marker` (this cluster's unique RAY_TMPDIR)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue  # gone, or not ours to read
        if marker.encode() in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


@pytest.fixture
def cluster_env(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """The environment of a one-machine cluster: its own home (auth token), Ray temp dir, Python and project."""
    if "cluster" not in (request.config.option.markexpr or ""):
        # About 5 minutes on 2 cores (bench/sweep/results/cluster-local-2026-11-30.md): over the suite's budget.
        pytest.skip("starts a Ray cluster and runs a sweep (~5 min): run with pytest -m cluster")
    if importlib.util.find_spec("aiohttp") is None:
        pytest.skip("needs Ray's dashboard and job API, ray[default]: pip install -e '.[cluster]'")
    for port in HEAD_PORTS:
        if port_in_use(port):
            pytest.skip(f"port {port} on 127.0.0.1 is taken (another Ray head?); the local cluster needs it")
    # Short: Ray's socket paths under it must stay within the 107-byte limit of a Unix socket's name.
    root = Path(tempfile.mkdtemp(prefix="rfc-", dir="/tmp"))
    (root / "home").mkdir()
    env = {
        **os.environ,
        "HOME": str(root / "home"),
        "RAY_TMPDIR": str(root),  # also keeps this cluster out of other Ray runs' /tmp/ray
        "RAY_FAKE_CLUSTER": "1",
        # Every node on 127.0.0.1 rather than this machine's network address.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # The installed project, as on nodes after `ray up` (file_mounts + `uv pip install -e`).
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO_ROOT),
        "HF_HUB_OFFLINE": "1",
        "HF_TOKEN": "hf_not_a_real_token",  # the docs pass it per job; offline, nobody reads it
        "RAY_USAGE_STATS_ENABLED": "0",
        # The autoscaler's loop every second instead of five: the test waits less for workers.
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
    }
    env.pop("RAY_ADDRESS", None)
    yield env
    for pid in processes_of(f"RAY_TMPDIR={root}"):
        os.kill(pid, signal.SIGKILL)
    subprocess.run(["rm", "-rf", str(root)], check=False)


def run(command: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.cluster
def test_docs_submit_runs_trials_on_autoscaled_fake_gpu_workers(
    cluster_env: dict[str, str], tiny_llama: Path
) -> None:
    env, home, transcript = cluster_env, Path(cluster_env["HOME"]), []
    began = time.monotonic()

    def step(name: str, done: subprocess.CompletedProcess[str]) -> str:
        transcript.append(
            f"--- {name} (rc {done.returncode}, {time.monotonic() - began:.0f} s)\n{done.stdout}"
        )
        assert done.returncode == 0, f"{name}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    # docs/cluster.md, one-time setup: the token every node and client shares.
    step("ray get-auth-token --generate", run("ray get-auth-token --generate > /dev/null", env, 60))

    # `ray up`, head: the bootstrap config as `ray up` prepares it, then cluster.yaml's head start command.
    bootstrap = _bootstrap_config(load(LOCAL_YAML), no_config_cache=True)
    (home / "ray_bootstrap_config.yaml").write_text(json.dumps(bootstrap))
    (stop, start) = bootstrap["head_start_ray_commands"]
    assert stop == "ray stop"  # stops every Ray on the machine: not here
    # As `ray up` runs it under autoscaler v2, plus what binds it to loopback and keeps it in the foreground.
    up = (
        f"export RAY_enable_autoscaler_v2=1 RAY_CLOUD_INSTANCE_ID={FAKE_HEAD_NODE_ID} "
        f"RAY_NODE_TYPE_NAME={FAKE_HEAD_NODE_TYPE}; {start} --node-ip-address=127.0.0.1 --block"
    )
    head_log = (home / "head.log").open("w")
    head = subprocess.Popen(
        ["bash", "-c", up],
        env=env,
        cwd=home,
        stdout=head_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while run(f"ray job list --address {DASHBOARD}", {**env, "RAY_AUTH_MODE": "token"}, 60).returncode:
            assert head.poll() is None, (home / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (home / "head.log").read_text()[-3000:]
            time.sleep(2)
        transcript.append(f"--- head up ({time.monotonic() - began:.0f} s)")

        # The sweep: a tiny Llama, two trials that each ask for one GPU; the head has none.
        storage = home / "storage"
        config = {
            "name": "cluster-local",
            "model": {"name_or_path": str(tiny_llama), "gradient_checkpointing": False},
            "data": {"max_length": 128, "max_train_examples": 64, "max_eval_examples": 4},
            "train": {"max_steps": 6, "batch_size": 4, "eval_every": 2},
            "lora": {"target_modules": "qv"},
            "search": {
                "num_samples": 2,
                "cpus_per_trial": 1,
                "gpus_per_trial": 1,
                "scheduler": "none",
                # The workers the autoscaler may start, as llama2-7b.yaml caps at cluster.yaml's 8.
                "max_concurrent_trials": 2,
                "baselines": [],
                "space": {"r": {"choice": [4, 8]}},
            },
            "report": {"top_k": 1, "eval_prompts": 2, "prompts": ["Hi"], "generation": {"max_new_tokens": 4}},
        }
        config_path = home / "tiny.yaml"
        config_path.write_text(yaml.safe_dump(config))
        submit = docs_submit_script().replace(
            DOCS_SWEEP_ARGS,
            f"--config {shlex.quote(str(config_path))} storage_path={shlex.quote(str(storage))}",
        )
        submitted = step("ray job submit (docs/cluster.md)", run(submit, env, 120))
        (job_id,) = set(re.findall(r"raysubmit_\w+", submitted))

        watch = f"export RAY_ADDRESS={DASHBOARD} RAY_AUTH_MODE=token; ray job logs -f {job_id}"
        logs = step("ray job logs -f", run(watch, env, 900))
        status = step("ray job status", run(watch.replace("logs -f", "status"), env, 60))
        assert f"Job '{job_id}' succeeded" in status, logs[-4000:]
        step("ray status", run("RAY_AUTH_MODE=token ray status --address 127.0.0.1:6379", env, 60))
    finally:
        # `ray down` terminates the instances: here the head's process group (head, its autoscaler and the
        # workers it started); the fixture then ends anything of this cluster's left, by id.
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
        head_log.close()
        transcript.append(f"--- down ({time.monotonic() - began:.0f} s)")
        # The record in docs/cluster.md and bench/sweep/results/ comes from here: pytest -m cluster -s.
        print("\n".join(transcript) + "\n--- head log\n" + (home / "head.log").read_text())

    # Results in storage, from trials that ran at the same time on their own fake GPU worker, none on the head.
    (experiment,) = [path for path in storage.iterdir() if path.is_dir()]
    table = pd.read_parquet(experiment / "results.parquet")
    assert len(table) == 2 and set(table["status"]) == {"completed"}, table
    progress = [pd.read_csv(Path(p) / "progress.csv").iloc[-1] for p in table["trial_path"]]
    nodes = {p["node_id"] for p in progress}
    assert len(nodes) == 2 and FAKE_HEAD_NODE_ID not in nodes, nodes
    # The fake provider numbers its workers fff...00001, fff...00002: these were started by the autoscaler.
    assert all(node[:-5] == FAKE_HEAD_NODE_ID[:-5] for node in nodes), nodes
    assert all(str(p["gpu_ids"]) == "0" for p in progress)
    (a_start, a_end), (b_start, b_end) = [
        (p["started_at"], p["started_at"] + p["time_total_s"]) for p in progress
    ]
    assert a_start < b_end and b_start < a_end  # both workers at once, not one trial after the other
    assert all(Path(p).is_relative_to(storage) for p in table["adapter_path"])
    assert "report: ran on a GPU worker" in logs and (experiment / "report.html").exists()
