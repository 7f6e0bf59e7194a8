"""A trial that no node can hold is refused right after Ray starts, naming the key and what each node has;
where an autoscaler may add such a node the driver waits, says so, and gives up after
search.resource_wait_s."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest

from sweeps.capacity import ClusterView, Node, TrialRequest, describe_nodes, judge_capacity, wait_for_capacity
from sweeps.config import ConfigError
from sweeps.run import main
from tests.conftest import tiny_sweep

GPU_TRIAL = TrialRequest(cpus=4, gpus=1, gpus_setting=1)
HEAD = Node(cpus=4, gpus=0)  # a CPU head, as cluster.yaml's


def test_a_node_that_holds_the_trial_lets_the_sweep_go() -> None:
    view = ClusterView((HEAD, Node(cpus=8, gpus=1)), "fixed")
    assert judge_capacity(GPU_TRIAL, view, waited_s=0, limit_s=600).action == "go"


def test_a_cluster_that_cannot_grow_is_refused_at_once_naming_the_key_and_the_nodes() -> None:
    verdict = judge_capacity(GPU_TRIAL, ClusterView((HEAD,), "fixed"), waited_s=0, limit_s=600)
    assert verdict.action == "refuse"
    assert verdict.message == (
        "search.gpus_per_trial=1: a trial asks for 4 CPUs and 1 GPU on one node, and no node has a GPU; this "
        "cluster has 1 node: 4 CPUs, 0 GPUs, and no autoscaler that could add a node. Set "
        "search.gpus_per_trial=0 (or auto) for CPU trials, or use a cluster with GPU nodes (RAY_ADDRESS)."
    )
    # CPUs and GPUs on different nodes: the CPU count is the key to change.
    split = ClusterView((Node(cpus=8, gpus=0), Node(cpus=2, gpus=1), Node(cpus=2, gpus=1)), "fixed")
    assert judge_capacity(GPU_TRIAL, split, waited_s=0, limit_s=600).message == (
        "search.cpus_per_trial=4: a trial asks for 4 CPUs and 1 GPU on one node, and the nodes with a GPU have "
        "2 CPUs at most; this cluster has 3 nodes: 8 CPUs, 0 GPUs; 2 x 2 CPUs, 1 GPU, and no autoscaler that "
        "could add a node. Lower search.cpus_per_trial to 2 or less."
    )


def test_an_autoscaler_is_waited_for_until_the_limit_unless_it_has_no_such_node_type() -> None:
    view = ClusterView((HEAD,), "autoscaler", activity="launching 1 gpu_spot")
    waiting = judge_capacity(GPU_TRIAL, view, waited_s=60, limit_s=600)
    assert waiting.action == "wait"
    assert waiting.message == (
        "resources: waiting for a node with 4 CPUs and 1 GPU for the trials: no node has a GPU (this cluster "
        "has 1 node: 4 CPUs, 0 GPUs); the autoscaler may add one (launching 1 gpu_spot); 60 s of 600 s "
        "(search.resource_wait_s)"
    )
    late = judge_capacity(GPU_TRIAL, view, waited_s=600, limit_s=600)
    assert late.action == "refuse"
    assert late.message.endswith(
        "the autoscaler added none in 600 s (search.resource_wait_s) (launching 1 gpu_spot). Check the "
        "autoscaler (`ray status`, its log on the head node) or raise search.resource_wait_s; or: set "
        "search.gpus_per_trial=0 (or auto) for CPU trials, or use a cluster with GPU nodes (RAY_ADDRESS)."
    )
    infeasible = ClusterView((HEAD,), "autoscaler", infeasible=True)
    assert judge_capacity(GPU_TRIAL, infeasible, waited_s=0, limit_s=600).message.endswith(
        "and its autoscaler has no node type with that. Set search.gpus_per_trial=0 (or auto) for CPU trials, "
        "or use a cluster with GPU nodes (RAY_ADDRESS)."
    )
    # An autoscaler whose state cannot be read is waited for too, within the limit.
    assert (
        judge_capacity(GPU_TRIAL, ClusterView((HEAD,), "unknown"), waited_s=0, limit_s=600).action == "wait"
    )


def test_nodes_are_described_by_their_cpus_and_gpus_alike_ones_counted() -> None:
    nodes = (Node(cpus=1, gpus=1), HEAD, Node(cpus=1, gpus=1), Node(cpus=0.5, gpus=0))
    assert describe_nodes(nodes) == "4 nodes: 4 CPUs, 0 GPUs; 2 x 1 CPU, 1 GPU; 0.5 CPUs, 0 GPUs"
    assert describe_nodes(()) == "no live node"


class FakeClock:
    """time.monotonic and time.sleep for sweeps.capacity: sleeping moves the clock on, nothing waits."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr("sweeps.capacity.time.monotonic", fake.monotonic)
    monkeypatch.setattr("sweeps.capacity.time.sleep", fake.sleep)
    return fake


def test_the_wait_ends_when_a_node_joins_and_says_why_it_waited(clock: FakeClock) -> None:
    views = iter([ClusterView((HEAD,), "autoscaler", activity="launching 1 gpu_spot")] * 3)
    joined = ClusterView((HEAD, Node(cpus=8, gpus=1)), "autoscaler")
    said: list[str] = []
    waited = wait_for_capacity(
        GPU_TRIAL, limit_s=30, look=lambda: next(views, joined), say=said.append, poll_s=10, say_every_s=60
    )
    assert waited == 30  # three looks without the node, a poll after each, then the node
    assert said == [
        "resources: waiting for a node with 4 CPUs and 1 GPU for the trials: no node has a GPU (this cluster "
        "has 1 node: 4 CPUs, 0 GPUs); the autoscaler may add one (launching 1 gpu_spot); 0 s of 30 s "
        "(search.resource_wait_s)",
        "resources: a node for the trials is there after 30 s",
    ]  # when it began waiting (not at every look), and when the node came


def test_the_wait_gives_up_after_the_limit_saying_so_at_every_interval(clock: FakeClock) -> None:
    view = ClusterView((HEAD,), "autoscaler", activity="launching 1 gpu_spot")
    said: list[str] = []
    looks = iter([view] * 100)  # a wait that never gives up ends here, on StopIteration
    with pytest.raises(ConfigError, match=r"the autoscaler added none in 100 s \(search.resource_wait_s\)"):
        wait_for_capacity(
            GPU_TRIAL, limit_s=100, look=lambda: next(looks), say=said.append, poll_s=5, say_every_s=30
        )
    assert clock.now == 100  # the look at 100 s refuses, none later
    assert [line.split("; ")[-1] for line in said] == [
        f"{t} s of 100 s (search.resource_wait_s)" for t in (0, 30, 60, 90)
    ]


@pytest.fixture(scope="module")
def cpu_only_ray():
    """A local Ray of 2 CPUs and no GPU (whatever this machine has), which main() connects to."""
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False)
    yield
    ray.shutdown()


CPU_ONLY_CASES = {
    "a GPU": (
        ["search.gpus_per_trial=1"],
        "search.gpus_per_trial=1: a trial asks for 2 CPUs and 1 GPU on one node, and no node has a GPU; this "
        "cluster has 1 node: 2 CPUs, 0 GPUs, and no autoscaler that could add a node. Set "
        "search.gpus_per_trial=0 (or auto) for CPU trials, or use a cluster with GPU nodes (RAY_ADDRESS).",
    ),
    "64 CPUs": (
        ["search.cpus_per_trial=64"],
        "search.cpus_per_trial=64: a trial asks for 64 CPUs on one node, and the largest node has 2 CPUs; this "
        "cluster has 1 node: 2 CPUs, 0 GPUs, and no autoscaler that could add a node. Lower "
        "search.cpus_per_trial to 2 or less.",
    ),
    "both": (
        ["search.cpus_per_trial=64", "search.gpus_per_trial=1"],
        "search.cpus_per_trial=64, search.gpus_per_trial=1: a trial asks for 64 CPUs and 1 GPU on one node, "
        "and no node has a GPU, nor more than 2 CPUs; this cluster has 1 node: 2 CPUs, 0 GPUs, and no "
        "autoscaler that could add a node. Set search.gpus_per_trial=0 (or auto) for CPU trials, or use a "
        "cluster with GPU nodes (RAY_ADDRESS); lower search.cpus_per_trial to 2 or less.",
    ),
}


@pytest.mark.parametrize("case", list(CPU_ONLY_CASES))
def test_a_trial_a_cpu_only_cluster_cannot_hold_is_refused_without_waiting(
    case: str, cpu_only_ray: None, tmp_path: Path, tiny_llama: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides, message = CPU_ONLY_CASES[case]
    start = time.monotonic()
    assert main(["--config", str(tiny_sweep(tmp_path, tiny_llama, "tiny")), *overrides]) == 2
    seconds = time.monotonic() - start
    out, err = capsys.readouterr()
    assert err.strip().splitlines()[-1] == f"error: {message}"
    # Before: the card's query (120 s) and the base model's eval, never scheduled, then Ray's autoscaler
    # line every ~35 s for ever. Now: the plan (the data tokenized) and the check, nothing waited on.
    assert seconds < 60, seconds
    assert "base model:" not in out and "resources:" not in out
    (experiment,) = (tmp_path / "experiments").iterdir()
    assert (experiment / "sweep.json").exists() and not (experiment / "results.parquet").exists()


def test_a_refused_sweep_resumes_once_the_key_is_fixed(
    cpu_only_ray: None, tmp_path: Path, tiny_llama: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(tiny_sweep(tmp_path, tiny_llama, "tiny"))
    assert main(["--config", config, "search.gpus_per_trial=1"]) == 2
    assert "error: search.gpus_per_trial=1:" in capsys.readouterr().err
    (experiment,) = (tmp_path / "experiments").iterdir()
    assert json.loads((experiment / "sweep.json").read_text()).get("base_eval_loss") is None
    # --resume finds the refused experiment (it is the same sweep: the keys that say where trials run are not
    # part of it) and runs it from the start: Tune had saved nothing.
    assert main(["--config", config, "--resume", "--quiet", "search.gpus_per_trial=0"]) == 0
    assert [p.name for p in (tmp_path / "experiments").iterdir()] == [experiment.name]
    table = pd.read_parquet(experiment / "results.parquet")
    assert list(table["status"]) == ["completed"] and list(table["step"]) == [2]
    assert json.loads((experiment / "sweep.json").read_text())["base_eval_loss"] > 0
