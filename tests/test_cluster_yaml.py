"""cluster.yaml: accepted by Ray's own launcher checks, locked down, and in step with the project's pins."""

from __future__ import annotations

import copy
import ipaddress
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.version import Version
from ray.autoscaler._private.util import prepare_config, validate_config

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO_ROOT / "cluster.yaml"
# Token auth exists since 2.52.0 (Ray's answer to unauthenticated job submission, CVE-2023-48022, which has no
# fixed version); 2.54.0 fixes CVE-2026-27482 (unauthenticated DELETE endpoints on the dashboard).
RAY_SECURITY_FLOOR = Version("2.54.0")
# Instance types with exactly one NVIDIA GPU, and its memory in GB; 4-bit Llama-2-7B QLoRA needs about 24.
SINGLE_GPU_MEMORY_GB = {
    "g5.xlarge": 24,
    "g5.2xlarge": 24,
    "g5.4xlarge": 24,
    "g5.8xlarge": 24,
    "g5.16xlarge": 24,
    "g6.xlarge": 24,
    "g6.2xlarge": 24,
    "g6e.xlarge": 48,
    "g6e.2xlarge": 48,
}
MIN_GPU_MEMORY_GB = 24
ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*")
CIDR = re.compile(r"[0-9A-Fa-f:.]+/\d{1,3}")


@pytest.fixture
def raw_config() -> dict[str, Any]:
    """cluster.yaml as written."""
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture
def launched_config(raw_config: dict[str, Any]) -> dict[str, Any]:
    """cluster.yaml as `ray up` sees it: merged with Ray's defaults, setup commands merged per node kind."""
    return prepare_config(copy.deepcopy(raw_config))


def worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: node_type
        for name, node_type in config["available_node_types"].items()
        if name != config["head_node_type"]
    }


def ray_start_invocations(commands: list[str]) -> list[tuple[dict[str, str], list[str]]]:
    """Every `ray start` in `commands`, as (its inline VAR=value assignments, the arguments after `start`)."""
    invocations = []
    for command in commands:
        for segment in re.split(r"&&|\|\||;", command):
            words = shlex.split(segment)
            env = {}
            while words and ENV_ASSIGNMENT.fullmatch(words[0]):
                key, _, value = words.pop(0).partition("=")
                env[key] = value
            if words[:2] == ["ray", "start"]:
                invocations.append((env, words[2:]))
    return invocations


def flag_value(args: list[str], flag: str) -> str | None:
    for index, arg in enumerate(args):
        if arg == flag:
            return args[index + 1]
        if arg.startswith(flag + "="):
            return arg.partition("=")[2]
    return None


def all_strings(node: Any) -> Iterator[str]:
    """Every string in the parsed YAML, keys included (comments are not config, so they are not here)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from all_strings(key)
            yield from all_strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from all_strings(item)


def pinned_requirements(commands: list[str]) -> dict[str, Requirement]:
    """`name==version` arguments of the setup commands, by package name."""
    pins = {}
    for command in commands:
        for word in shlex.split(command):
            if "==" in word and not word.startswith("-"):
                requirement = Requirement(word)
                pins[requirement.name] = requirement
    return pins


def pinned_version(requirement: Requirement) -> Version:
    (specifier,) = requirement.specifier
    assert specifier.operator == "==", f"{requirement} must pin one version with =="
    return Version(specifier.version)


def project_requirements() -> dict[str, Requirement]:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    requirements = [Requirement(line) for line in pyproject["project"]["dependencies"]]
    return {requirement.name: requirement for requirement in requirements}


def test_ray_accepts_the_config(raw_config: dict[str, Any], launched_config: dict[str, Any]) -> None:
    validate_config(launched_config)

    # The same validation rejects a config with a key Ray does not know, so passing above means something.
    broken = copy.deepcopy(launched_config)
    broken["max_worker"] = 8
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(broken)


def test_dashboard_listens_on_loopback_only(launched_config: dict[str, Any]) -> None:
    head_starts = ray_start_invocations(launched_config["head_start_ray_commands"])
    assert [args for _, args in head_starts if "--head" in args], (
        "no `ray start --head` in head_start_ray_commands"
    )
    for _, args in head_starts:
        assert flag_value(args, "--dashboard-host") == "127.0.0.1", args

    worker_starts = ray_start_invocations(launched_config["worker_start_ray_commands"])
    for _, args in head_starts + worker_starts:
        assert "0.0.0.0" not in " ".join(args), args


def test_no_ingress_is_open_to_the_internet(raw_config: dict[str, Any]) -> None:
    for text in all_strings(raw_config):
        for candidate in CIDR.findall(text):
            try:
                network = ipaddress.ip_network(candidate, strict=False)
            except ValueError:
                continue  # looked like a CIDR, is not one
            assert network.prefixlen > 0, f"{candidate} opens to every address: {text!r}"

    # A node type without SecurityGroupIds gets Ray's auto-created group, which opens SSH to 0.0.0.0/0.
    for name, node_type in raw_config["available_node_types"].items():
        assert node_type["node_config"].get("SecurityGroupIds"), f"{name} names no security group"


def test_every_node_runs_the_same_image_in_the_same_group(raw_config: dict[str, Any]) -> None:
    node_configs = [node_type["node_config"] for node_type in raw_config["available_node_types"].values()]
    assert len({node_config["ImageId"] for node_config in node_configs}) == 1
    assert len({tuple(node_config["SecurityGroupIds"]) for node_config in node_configs}) == 1


def test_token_auth_on_every_ray_start(raw_config: dict[str, Any], launched_config: dict[str, Any]) -> None:
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = ray_start_invocations(launched_config[key])
        assert starts, f"no `ray start` in {key}"
        for env, args in starts:
            assert env.get("RAY_AUTH_MODE") == "token", f"{key}: ray start {' '.join(args)}"

    # Every shell on a node (ray exec, job drivers) is a client that must send the token too.
    assert any(
        "export RAY_AUTH_MODE=token" in command for command in launched_config["initialization_commands"]
    )
    # The token reaches every node from the launching user's home, never from a file in the repo.
    assert raw_config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_pinned_versions_match_the_project(raw_config: dict[str, Any]) -> None:
    pins = pinned_requirements(raw_config["setup_commands"])
    project = project_requirements()

    ray_pin = pinned_version(pins["ray"])
    assert ray_pin >= RAY_SECURITY_FLOOR
    assert ray_pin == Version(ray.__version__), "the cluster must run the Ray this project is tested with"
    assert ray_pin in project["ray"].specifier
    floor = next(spec for spec in project["ray"].specifier if spec.operator == ">=")
    assert ray_pin == Version(floor.version), f"cluster pins {ray_pin}, pyproject's floor is {floor}"
    # The dashboard and the autoscaler on the head come with ray[default].
    assert "default" in pins["ray"].extras

    assert pinned_version(pins["torch"]) in project["torch"].specifier


def test_each_worker_runs_one_trial_on_one_gpu(raw_config: dict[str, Any]) -> None:
    workers = worker_types(raw_config)
    assert len(workers) >= 2
    for name, node_type in workers.items():
        assert node_type["resources"].get("GPU") == 1, f"{name} must offer exactly one GPU"
        instance_type = node_type["node_config"]["InstanceType"]
        assert instance_type in SINGLE_GPU_MEMORY_GB, (
            f"{name}: {instance_type} is not a known single-GPU type"
        )
        assert SINGLE_GPU_MEMORY_GB[instance_type] >= MIN_GPU_MEMORY_GB

    head = raw_config["available_node_types"][raw_config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["node_config"]["InstanceType"] not in SINGLE_GPU_MEMORY_GB


def test_spot_is_preferred_and_on_demand_is_second(raw_config: dict[str, Any]) -> None:
    by_market = {"spot": [], "on-demand": []}
    for node_type in worker_types(raw_config).values():
        market = node_type["node_config"].get("InstanceMarketOptions", {}).get("MarketType", "on-demand")
        by_market[market].append(node_type)
    ((spot,), (on_demand,)) = by_market["spot"], by_market["on-demand"]

    assert spot.get("priority", 0) > on_demand.get("priority", 0)
    assert spot["node_config"]["InstanceType"] == on_demand["node_config"]["InstanceType"]
    # Spot alone cannot fill the cluster, so on-demand nodes are reachable; idle, the cluster is just the head.
    assert spot["max_workers"] < raw_config["max_workers"]
    assert on_demand["max_workers"] > 0
    assert spot["max_workers"] + on_demand["max_workers"] == raw_config["max_workers"]
    assert spot.get("min_workers", 0) == on_demand.get("min_workers", 0) == 0
    assert raw_config["idle_timeout_minutes"] > 0


def test_project_is_synced_and_installed_without_local_state(raw_config: dict[str, Any]) -> None:
    assert raw_config["file_mounts"]["~/qlora-sweeps"] == "."
    assert {".venv", "experiments", ".git"} <= set(raw_config["rsync_exclude"])
    assert any('-e "$HOME/qlora-sweeps[gpu]"' in command for command in raw_config["setup_commands"])


def test_no_secret_is_written_in_the_file() -> None:
    text = CLUSTER_YAML.read_text()
    for pattern in (
        r"hf_[A-Za-z0-9]{20,}",  # Hugging Face token
        r"AKIA[0-9A-Z]{16}",  # AWS access key id
        r"(?i)aws_secret_access_key",
        r"\b(HF_TOKEN|WANDB_API_KEY|AWS_SECRET_ACCESS_KEY)=",
    ):
        assert not re.search(pattern, text), pattern
