"""model.compute_dtype: auto picks float32 on CPUs without native bf16, where bf16 is emulated ~40x slower."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sweeps.config import load_config
from trainable.hardware import cpu_flags, cpu_has_native_bf16, describe_environment, resolve_compute_dtype
from trainable.model import load_base_model
from trainable.settings import ModelSettings

EPYC_AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx fma avx2 bmi2\n"
XEON_BF16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize(
    ("cpuinfo", "expected"),
    [(EPYC_AVX2, "float32"), (XEON_BF16, "bfloat16"), (GRAVITON3, "bfloat16"), ("", "float32")],
)
def test_default_config_computes_in_what_the_cpu_does_natively(cpuinfo: str, expected: str) -> None:
    requested = load_config("local").model.compute_dtype
    assert requested == "auto"
    assert resolve_compute_dtype(requested, "cpu", flags=cpu_flags(cpuinfo)) == expected


def test_an_explicit_compute_dtype_wins() -> None:
    avx2 = cpu_flags(EPYC_AVX2)
    assert resolve_compute_dtype("bfloat16", "cpu", flags=avx2) == "bfloat16"
    assert resolve_compute_dtype("float16", "cpu", flags=avx2) == "float16"
    assert load_config("local", ["model.compute_dtype=bfloat16"]).model.compute_dtype == "bfloat16"


def test_cpu_flags_are_read_from_x86_and_arm_cpuinfo() -> None:
    assert {"avx2", "fma"} <= cpu_flags(EPYC_AVX2) and "avx512_bf16" not in cpu_flags(EPYC_AVX2)
    assert "bf16" in cpu_flags(GRAVITON3)


def test_the_4bit_base_on_this_cpu_computes_in_the_resolved_dtype(tiny_llama: Path) -> None:
    model = load_base_model(str(tiny_llama), ModelSettings(), device="cpu")
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.weight.quant_state.dtype == expected
    assert q_proj.compute_dtype == expected


def test_the_environment_names_versions_device_dtype_and_commit() -> None:
    import importlib.metadata

    environment = describe_environment("auto")
    assert environment["packages"]["torch"] == torch.__version__
    assert environment["packages"]["qlora-sweeps"] == importlib.metadata.version("qlora-sweeps")
    assert environment["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    expected = "bfloat16" if cpu_has_native_bf16() else "float32"
    assert torch.cuda.is_available() or environment["compute_dtype"] == expected
    assert environment["cpu"]["native_bf16"] == cpu_has_native_bf16()
    commit = environment["commit"]  # the tests run from a checkout
    assert commit is None or len(commit.split("+")[0]) == 40
