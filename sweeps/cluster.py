"""The Ray cluster as the driver uses it: which cluster to connect to, and the two one-off tasks it runs on a
trial's resources besides the trials themselves: the base model's eval loss before the search, the report
after it.

    ray.init(address=ray_address())
    loss = measure_base_eval_loss(plan, resources)
    start_report(plan)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from sweeps.plan import SweepPlan
from sweeps.resources import TrialResources, trial_gpus
from trainable.evaluate import evaluate_base
from trainable.model import quiet_libraries
from trainable.prepare import TrialSettings


def ray_address() -> str | None:
    """The address for ray.init: None (Ray's own choice: RAY_ADDRESS, else the cluster `ray start` last
    recorded on this machine, else a new local Ray) unless that recorded cluster no longer answers; then
    "local", with a note. Ray would wait about five minutes on a recorded cluster that is gone, then fail."""
    from ray._private.services import find_bootstrap_address

    recorded = None if os.environ.get("RAY_ADDRESS") else find_bootstrap_address(None)
    if recorded is None:
        return None
    host, _, port = recorded.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError:
        print(
            f"note: the Ray cluster last started on this machine ({recorded}) does not answer; starting a "
            "local Ray instead. Set RAY_ADDRESS to use a cluster.",
            flush=True,
        )
        return "local"
    return None


def measure_base_eval_loss(plan: SweepPlan, resources: TrialResources) -> float:
    """The base model's eval loss (trainable.evaluate.evaluate_base), once per sweep, as a Ray task with a
    trial's resources: on a cluster it runs on a worker with a GPU, not on the head node."""
    import ray

    # max_calls=1: the worker process exits afterwards, returning the model's memory (and the GPU's).
    task = ray.remote(max_calls=1)(evaluate_base_quietly).options(
        num_cpus=plan.config.search.cpus_per_trial, num_gpus=resources.gpu_share
    )
    start = time.perf_counter()
    loss = float(ray.get(task.remote(plan.trial)))
    print(
        f"base model: eval loss {loss:.4f} (measured once for the sweep, {time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    return loss


def evaluate_base_quietly(settings: TrialSettings) -> float:
    """evaluate_base with a trial's console manners (no loading bars or library warnings)."""
    quiet_libraries()
    return evaluate_base(settings)


def start_report(plan: SweepPlan) -> None:
    """The report, as a separate process that reads only the experiment's files (as it does on a laptop).

    Where the trials had GPUs and the driver has none (a cluster's head node), it runs on a GPU worker
    instead, as one Ray task holding one GPU: generating with every candidate on the head node's CPUs
    would take hours for a 7B model. A failed report leaves the sweep's results as they are.
    """
    import ray
    import torch

    if trial_gpus(plan.config, ray.cluster_resources()) and not torch.cuda.is_available():
        task = ray.remote(report_on_this_worker).options(
            num_gpus=1, num_cpus=plan.config.search.cpus_per_trial
        )
        where = ray.get(task.remote(plan.experiment_uri))
        print(f"report: ran on a GPU worker ({where})", flush=True)
    else:
        report_on_this_worker(plan.experiment_uri)


def report_on_this_worker(experiment_uri: str) -> str:
    """Run `python -m analysis.report` here; says where that was."""
    import ray

    done = subprocess.run([sys.executable, "-m", "analysis.report", experiment_uri], check=False)
    if done.returncode:
        print(f"report: failed (exit {done.returncode}); rerun: python -m analysis.report {experiment_uri}")
    context = ray.get_runtime_context()
    return f"node {context.get_node_id()[:12]}, GPU ids {ray.get_gpu_ids()}, exit {done.returncode}"
