"""Whether the cluster can ever hold a trial, checked right after ray.init, before anything waits on it.

    check_capacity(config, ray.cluster_resources())    # returns, raises ConfigError, or waits for a node

A trial, the base model's eval and the report each ask Ray for `search.cpus_per_trial` CPUs and the trial's
GPUs on one node. Ray keeps a request that no node can satisfy pending for ever, and the console shows only
the autoscaler's line about it. So a request no node has room for is refused at once, naming the key and
what each node has, unless an autoscaler may still add such a node: then the driver asks it for one (as a
pending trial would), says what is pending every minute, and gives up after `search.resource_wait_s`.

Whether nodes can be added is read from what the cluster's autoscaler reports to Ray's GCS, not from
whether an autoscaler runs: every Ray head runs one, a local `ray.init()` included (judge_capacity decides
from the report, and is a pure function):
- autoscaler v2 (what cluster.yaml's head runs under `ray up`; KubeRay's too): its state, with the requests
  none of its node types can satisfy. A request it calls infeasible is refused without waiting out
  `search.resource_wait_s`; its first report comes within seconds of the request.
- autoscaler v1: its status report (what `ray status` prints). A Ray started by `ray.init()` or by
  `ray start` without an autoscaling config runs it over a read-only view of the nodes it has (one node type
  per node, named after the node): such a cluster cannot grow. A v1 autoscaler with node types of its own
  says nothing of infeasible requests: the driver waits for it up to the limit.
- neither, or a v2 cluster whose autoscaler has not reported yet: nothing can add a node, or (the latter)
  the driver waits, within the limit, as it does when the report cannot be read at all.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from sweeps.config import ConfigError, SweepConfig
from sweeps.resources import trial_gpus

# How often the driver polls the cluster while it waits for a node, and how often it says so.
POLL_S = 5.0
SAY_EVERY_S = 60.0

Growth = Literal["fixed", "autoscaler", "unknown"]


@dataclass(frozen=True)
class TrialRequest:
    """What one trial asks Ray for, on one node, and the config values it comes from."""

    cpus: int
    gpus: int
    gpus_setting: int | str  # search.gpus_per_trial as configured ("auto" resolves to gpus)

    @property
    def bundle(self) -> dict[str, float]:
        return {"CPU": float(self.cpus), **({"GPU": float(self.gpus)} if self.gpus else {})}


@dataclass(frozen=True)
class Node:
    cpus: float
    gpus: float

    def holds(self, request: TrialRequest) -> bool:
        return self.cpus >= request.cpus and self.gpus >= request.gpus


@dataclass(frozen=True)
class ClusterView:
    """What the driver sees of the cluster at one moment."""

    nodes: tuple[Node, ...]  # the live nodes
    growth: Growth  # fixed: nothing adds nodes; unknown: the autoscaler's state could not be read
    infeasible: bool = False  # the autoscaler reports the trial's request as one none of its node types fits
    activity: str = ""  # what the autoscaler is doing, in words ("launching 1 gpu_spot")


@dataclass(frozen=True)
class Verdict:
    action: Literal["go", "wait", "refuse"]
    message: str = ""


def trial_request(config: SweepConfig, resources: dict[str, float]) -> TrialRequest:
    gpus = config.search.gpus_per_trial
    return TrialRequest(
        cpus=config.search.cpus_per_trial, gpus=trial_gpus(config, resources), gpus_setting=gpus
    )


def judge_capacity(request: TrialRequest, view: ClusterView, *, waited_s: float, limit_s: float) -> Verdict:
    """Go when a live node holds the request; else refuse (naming the keys, what each node has and why no node
    will come), or wait while an autoscaler may still add one and `limit_s` has not passed."""
    if any(node.holds(request) for node in view.nodes):
        return Verdict("go")
    keys, problem, fix = describe_shortfall(request, view.nodes)
    wanted = count(request.cpus, "CPU") + (f" and {count(request.gpus, 'GPU')}" if request.gpus else "")
    nodes = describe_nodes(view.nodes)
    facts = f"{keys}: a trial asks for {wanted} on one node, and {problem}; this cluster has {nodes}"
    if view.growth == "fixed":
        return Verdict("refuse", f"{facts}, and no autoscaler that could add a node. {sentence(fix)}.")
    if view.infeasible:
        return Verdict("refuse", f"{facts}, and its autoscaler has no node type with that. {sentence(fix)}.")
    doing = f" ({view.activity})" if view.activity else ""
    if waited_s >= limit_s:
        return Verdict(
            "refuse",
            f"{facts}; the autoscaler added none in {limit_s:.0f} s (search.resource_wait_s){doing}. "
            "Check the autoscaler (`ray status`, its log on the head node) or raise search.resource_wait_s; "
            f"or: {fix}.",
        )
    return Verdict(
        "wait",
        f"resources: waiting for a node with {wanted} for the trials: {problem} (this cluster has "
        f"{nodes}); the autoscaler may add one{doing}; {waited_s:.0f} s of {limit_s:.0f} s "
        "(search.resource_wait_s)",
    )


def describe_shortfall(request: TrialRequest, nodes: tuple[Node, ...]) -> tuple[str, str, str]:
    """The keys to blame, what no node has, and the fix, for a request no node holds."""
    cpus_key = f"search.cpus_per_trial={request.cpus}"
    gpus_key = f"search.gpus_per_trial={request.gpus_setting}"
    most_cpus = max((node.cpus for node in nodes), default=0)
    gpu_fix = (
        "set search.gpus_per_trial=0 (or auto) for CPU trials, or use a cluster with GPU nodes (RAY_ADDRESS)"
    )
    with_gpus = [node for node in nodes if node.gpus >= request.gpus]  # all of them for a CPU trial
    if not with_gpus and most_cpus < request.cpus:
        return (
            f"{cpus_key}, {gpus_key}",
            f"no node has a GPU, nor more than {count(most_cpus, 'CPU')}",
            f"{gpu_fix}; lower search.cpus_per_trial to {most_cpus:g} or less",
        )
    if not with_gpus:
        return gpus_key, "no node has a GPU", gpu_fix
    room = max(node.cpus for node in with_gpus)  # a trial's CPUs must be on a node with its GPU
    if most_cpus < request.cpus:
        problem = f"the largest node has {count(most_cpus, 'CPU')}"
        if room < most_cpus:
            problem += f", those with a GPU {count(room, 'CPU')}"
    else:
        problem = f"the nodes with a GPU have {count(room, 'CPU')} at most"
    return cpus_key, problem, f"lower search.cpus_per_trial to {room:g} or less"


def sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def describe_nodes(nodes: tuple[Node, ...]) -> str:
    """'1 node: 2 CPUs, 0 GPUs' or '3 nodes: 4 CPUs, 0 GPUs; 2 x 1 CPU, 1 GPU' (identical nodes counted)."""
    if not nodes:
        return "no live node"
    shapes = Counter((node.cpus, node.gpus) for node in nodes)
    parts = [
        (f"{n} x " if n > 1 else "") + f"{count(cpus, 'CPU')}, {count(gpus, 'GPU')}"
        for (cpus, gpus), n in sorted(shapes.items(), reverse=True)
    ]
    return f"{count(len(nodes), 'node')}: {'; '.join(parts)}"


def count(n: float, noun: str) -> str:
    return f"{n:g} {noun}{'' if n == 1 else 's'}"


def wait_for_capacity(
    request: TrialRequest,
    *,
    limit_s: float,
    look: Callable[[], ClusterView],
    say: Callable[[str], None],
    poll_s: float = POLL_S,
    say_every_s: float = SAY_EVERY_S,
) -> float:
    """Poll `look` until judge_capacity says go (returns the seconds waited) or refuse (raises ConfigError),
    saying why it waits when it starts and every `say_every_s`."""
    start = time.monotonic()
    said_at: float | None = None
    while True:
        waited = time.monotonic() - start
        verdict = judge_capacity(request, look(), waited_s=waited, limit_s=limit_s)
        if verdict.action == "go":
            if said_at is not None:
                say(f"resources: a node for the trials is there after {waited:.0f} s")
            return waited
        if verdict.action == "refuse":
            raise ConfigError(verdict.message)
        if said_at is None or time.monotonic() - said_at >= say_every_s:
            say(verdict.message)
            said_at = time.monotonic()
        time.sleep(poll_s)


def check_capacity(config: SweepConfig, resources: dict[str, float]) -> None:
    """After ray.init: return when a node of the cluster can hold a trial; raise ConfigError when none can
    and none will come; in between, ask the autoscaler for one and wait (wait_for_capacity)."""
    request = trial_request(config, resources)
    verdict = judge_capacity(
        request, view_cluster(request), waited_s=0, limit_s=config.search.resource_wait_s
    )
    if verdict.action == "go":
        return
    if verdict.action == "refuse":
        raise ConfigError(verdict.message)
    with asking_autoscaler_for(request):
        wait_for_capacity(
            request,
            limit_s=config.search.resource_wait_s,
            look=lambda: view_cluster(request),
            say=lambda line: print(line, flush=True),
        )


@contextlib.contextmanager
def asking_autoscaler_for(request: TrialRequest) -> Iterator[None]:
    """Ask the autoscaler for a node that holds `request` while the driver waits, as a pending trial would
    (nothing is pending yet); withdrawn afterwards, else the autoscaler would keep such a node up for ever.
    (The request is the cluster's one standing request: it replaces any other driver's.)"""
    from ray.autoscaler.sdk import request_resources

    with contextlib.suppress(Exception):  # best effort: a pending trial asks the same once Tune runs
        request_resources(bundles=[request.bundle])
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            request_resources(bundles=[])


def view_cluster(request: TrialRequest) -> ClusterView:
    """The live nodes' CPUs and GPUs, and what the autoscaler reports (see the module's docstring)."""
    import ray

    nodes = tuple(
        Node(cpus=node["Resources"].get("CPU", 0.0), gpus=node["Resources"].get("GPU", 0.0))
        for node in ray.nodes()
        if node["Alive"]
    )
    try:
        return ClusterView(nodes, *read_autoscaler(request))
    except Exception as err:  # a private interface of Ray's: if it changes, wait (bounded) rather than refuse
        return ClusterView(nodes, "unknown", activity=f"its state could not be read: {err}")


def read_autoscaler(request: TrialRequest) -> tuple[Growth, bool, str]:
    """(growth, infeasible, activity) from the autoscaler's reports to the GCS."""
    from ray._private import ray_constants
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply  # type: ignore[attr-defined]
    from ray.experimental.internal_kv import _internal_kv_get, internal_kv_get_gcs_client

    gcs = internal_kv_get_gcs_client()
    reply = GetClusterStatusReply.FromString(gcs.get_cluster_status(timeout_s=10))
    state = reply.autoscaling_state
    if state.autoscaler_state_version > 0:  # an autoscaler v2 reports here
        wanted = request.bundle
        infeasible = any(
            dict(r.resources_bundle) == wanted for r in state.infeasible_resource_requests
        ) or any(
            dict(c.request.resources_bundle) == wanted
            for constraint in state.infeasible_cluster_resource_constraints
            for c in constraint.resource_requests
        )
        launching = Counter[str]()
        for pending in state.pending_instance_requests:
            launching[pending.ray_node_type_name] += pending.count
        for instance in state.pending_instances:
            launching[instance.ray_node_type_name] += 1
        failed = [f"{f.ray_node_type_name}: {f.reason}" for f in state.failed_instance_requests]
        return "autoscaler", infeasible, describe_activity(launching, failed)
    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    if raw:  # an autoscaler v1
        report = json.loads(raw).get("autoscaler_report") or {}
        types = report.get("node_type_mapping") or {}
        if all(node_type == f"node_{node}" for node, node_type in types.items()):
            return "fixed", False, ""  # the read-only view: one node type per node, named after it
        launching = Counter({str(k): int(v) for k, v in (report.get("pending_launches") or {}).items()})
        launching.update(str(node[1]) for node in report.get("pending_nodes") or [])
        failed = [str(node[1]) for node in report.get("failed_nodes") or []]
        return "autoscaler", False, describe_activity(launching, failed)
    if is_autoscaler_v2(fetch_from_server=True, gcs_client=gcs):
        return "unknown", False, "the autoscaler has not reported yet"
    return "fixed", False, ""


def describe_activity(launching: Counter[str], failed: list[str]) -> str:
    parts = [f"launching {n} {node_type}" for node_type, n in sorted(launching.items())]
    if failed:
        parts.append(f"failed: {'; '.join(failed[-3:])}")
    return ", ".join(parts) or "nothing launching yet"
