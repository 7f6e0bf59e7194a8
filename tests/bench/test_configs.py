"""Every benchmark config under bench/ loads as a sweep config and opens with the command that runs it, by
its own path: a config moved or renamed without its command fails here, not on a GPU host."""

from __future__ import annotations

from pathlib import Path

import pytest

from sweeps.config import load_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "bench").rglob("*.yaml"))


def test_the_configs_are_found() -> None:
    assert {"bench/search/table.yaml", "bench/start/trial_start.yaml", "bench/quality/quality.yaml"} <= set(
        CONFIGS
    )


@pytest.mark.parametrize("config", CONFIGS)
def test_config_loads_and_its_header_runs_it_by_its_path(config: str) -> None:
    loaded = load_config(str(REPO / config))
    assert loaded.name  # every benchmark sweep is named, for its experiment folders
    header = []
    for line in (REPO / config).read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert any(f"--config {config}" in line and "python -m " in line for line in header), header
