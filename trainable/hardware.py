"""What this machine computes well: the compute dtype that `model.compute_dtype: auto` becomes.

A CPU without native bf16 instructions (AVX2 only: most cloud VMs and laptops) emulates a bf16 matmul
about 40x slower than a float32 one, and bitsandbytes' 4-bit backward runs in the compute dtype, so the
choice decides whether a CPU trial takes minutes or hours. The check reads the CPU's feature flags.
"""

from __future__ import annotations

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
        "cores": torch.get_num_threads(),
        "flags": shown,
        "native_bf16": cpu_has_native_bf16(),
    }
