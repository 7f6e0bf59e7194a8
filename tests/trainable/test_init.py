"""The trainable package keeps one library warning nobody can act on out of every process's console."""

from __future__ import annotations

import subprocess
import sys

import pytest

UNTRUSTED_KERNEL = "Failed to load CPU gemm_4bit_forward from kernels-community"


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_bitsandbytes_untrusted_kernel_warning_is_dropped_and_its_other_warnings_kept() -> None:
    if UNTRUSTED_KERNEL not in run_python("import bitsandbytes"):
        pytest.skip("bitsandbytes does not warn here (it asks `kernels` only on CPUs with AVX512-BF16)")
    stderr = run_python(
        "import trainable, bitsandbytes, logging\n"
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('a warning that matters')"
    )
    assert stderr == "a warning that matters\n"
