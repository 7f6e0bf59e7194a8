"""What this machine computes well: the compute dtype that `model.compute_dtype: auto` becomes.

A CPU without native bf16 instructions (AVX2 only: most cloud VMs and laptops) emulates a bf16 matmul
about 40x slower than a float32 one, and bitsandbytes' 4-bit backward runs in the compute dtype, so the
choice decides whether a CPU trial takes minutes or hours. The check reads the CPU's feature flags.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Literal

import torch

ComputeDtype = Literal["bfloat16", "float16", "float32"]

# x86: AVX512-BF16 (Cooper Lake, Zen 4 and later) or AMX-BF16 (Sapphire Rapids) give bf16 dot products;
# Arm: the BF16 extension (Graviton 3, Neoverse V1 and later) shows as "bf16" in /proc/cpuinfo.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo ("flags" on x86, "Features" on Arm); empty elsewhere."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(errors="replace") if path.exists() else ""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    return bool((cpu_flags() if flags is None else flags) & NATIVE_BF16_FLAGS)


def resolve_compute_dtype(
    requested: Literal["auto"] | ComputeDtype, device: str, *, flags: frozenset[str] | None = None
) -> ComputeDtype:
    """`requested` unless it is "auto": then bf16 on GPUs that support it (fp16 on older ones, e.g. a T4),
    bf16 on CPUs with native bf16 instructions, float32 on the others. `flags` stands in for this CPU's."""
    if requested != "auto":
        return requested
    if device == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_native_bf16(flags) else "float32"


def describe_cpu() -> dict[str, object]:
    """The CPU's model name and the flags that decide its speed here."""
    name = platform.processor() or platform.machine()
    path = Path("/proc/cpuinfo")
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "model name":
                name = value.strip()
                break
    flags = cpu_flags()
    shown = sorted(flags & (NATIVE_BF16_FLAGS | {"avx2", "avx512f", "amx_tile", "fma", "asimd", "sve"}))
    return {
        "model": name,
        "cores": os.cpu_count(),
        "flags": shown,
        "native_bf16": cpu_has_native_bf16(),
    }


# The libraries whose versions decide a sweep's numbers (kernels, defaults, schedulers, samplers).
RECORDED_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "trl",
    "ray",
    "optuna",
    "qlora-sweeps",
)


def describe_environment(compute_dtype: Literal["auto"] | ComputeDtype) -> dict[str, object]:
    """What a sweep ran on, for sweep.json: package versions, the accelerator (CUDA and the GPU model) or the
    CPU with its capabilities, the compute dtype `compute_dtype` resolves to here, and the project's commit
    when it runs from a git checkout."""
    import importlib.metadata

    versions: dict[str, str | None] = {}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    environment: dict[str, object] = {
        "packages": versions,
        "python": platform.python_version(),
        "device": device,
        "compute_dtype": resolve_compute_dtype(compute_dtype, device),
        "cpu": describe_cpu(),
        "commit": project_commit(),
    }
    if device == "cuda":
        environment["cuda"] = torch.version.cuda
        environment["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return environment


def project_commit() -> str | None:
    """The checkout's commit (with "+dirty" when files differ from it); None outside a git checkout."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment_changes(saved: dict[str, object], now: dict[str, object]) -> list[str]:
    """What differs between two environments, one "what: before -> now" line each (the CPU's core count
    aside, which follows the process' thread setting)."""
    changes = []
    for key in ("python", "device", "compute_dtype", "cuda", "gpus", "commit"):
        if saved.get(key) != now.get(key):
            changes.append(f"{key}: {saved.get(key)} -> {now.get(key)}")
    saved_packages = saved.get("packages") or {}
    now_packages = now.get("packages") or {}
    assert isinstance(saved_packages, dict) and isinstance(now_packages, dict)
    for name in sorted(set(saved_packages) | set(now_packages)):
        if saved_packages.get(name) != now_packages.get(name):
            changes.append(f"{name}: {saved_packages.get(name)} -> {now_packages.get(name)}")
    saved_cpu, now_cpu = saved.get("cpu") or {}, now.get("cpu") or {}
    assert isinstance(saved_cpu, dict) and isinstance(now_cpu, dict)
    if saved_cpu.get("model") != now_cpu.get("model"):
        changes.append(f"cpu: {saved_cpu.get('model')} -> {now_cpu.get('model')}")
    return changes
