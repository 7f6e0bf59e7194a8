"""bench/suite.sh refuses bad paths and unknown stages before it installs or runs anything, and every stage
runs a benchmark, config or file that exists."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def suite(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(REPO / "bench/suite.sh"), *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["stash"], "unknown stage stash"),
        (["setup", "tests"], "the setup stage needs --wheels DIR"),
        (["--wheels", "{empty}", "setup"], "no .whl files there"),
        (["--gguf", "{missing}", "smollm2"], "{missing}: no such file"),
        (["--adapter", "{empty}", "generation"], "no adapter_config.json there"),
        (["--out"], "--out needs a value"),
        (["--carried", "x", "step"], "unknown option --carried"),
    ],
)
def test_bad_input_is_refused_before_any_work(args: list[str], message: str, tmp_path: Path) -> None:
    paths = {"empty": str(tmp_path), "missing": str(tmp_path / "smollm2.gguf")}
    out = tmp_path / "out"
    result = suite("--out", str(out), *[a.format(**paths) for a in args])
    assert result.returncode == 2
    assert message.format(**paths) in result.stderr
    assert not out.exists()


def test_runs_only_from_the_repository_root(tmp_path: Path) -> None:
    result = suite("--out", str(tmp_path / "out"), "tests", cwd=tmp_path)
    assert result.returncode == 2 and "run from the repository root" in result.stderr


def test_every_stage_it_accepts_is_documented() -> None:
    text = (REPO / "bench/suite.sh").read_text()
    known = text.split('KNOWN=" ', 1)[1].split(' "', 1)[0].split()
    usage = suite("--help").stdout
    stages = usage.split("Stages:", 1)[1].split("Results:", 1)[0]
    assert sorted(known) == sorted(line.split()[0] for line in stages.splitlines() if line[:3].strip())


def test_every_stage_has_a_branch_and_everything_it_runs_exists() -> None:
    """The suite runs on a GPU host, where a moved benchmark or config would fail only mid-run."""
    text = (REPO / "bench/suite.sh").read_text()
    known = text.split('KNOWN=" ', 1)[1].split(' "', 1)[0].split()
    body = text.split('for stage in "${STAGES[@]}"; do', 1)[1]
    assert [stage for stage in known if not re.search(rf"^    {re.escape(stage)}\)$", body, re.M)] == []
    modules = set(re.findall(r"python3? -m (bench(?:\.\w+)+)", text))
    assert {"bench.step.train_step", "bench.sweep.summary", "bench.make_model"} <= modules
    assert [module for module in modules if importlib.util.find_spec(module) is None] == []
    paths = set(re.findall(r"\bbench/[\w./-]+\.(?:yaml|txt|sh)\b", text))
    assert {"bench/packing/packing.yaml", "bench/sweep/tiny.yaml", "bench/wheels.txt"} <= paths
    assert [path for path in paths if not (REPO / path).is_file()] == []


@pytest.mark.parametrize("script", sorted(str(p.relative_to(REPO)) for p in (REPO / "bench").rglob("*.sh")))
def test_shell_scripts_parse(script: str) -> None:
    result = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
