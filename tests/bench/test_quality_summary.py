"""bench.quality.summary on the recorded quality benchmark (three sweeps on an H100, 2026-12-08): the table
docs/report.md shows is what the experiments' own leaderboards and paired tests say."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.quality.summary import main

RECORD = Path(__file__).resolve().parents[2] / "bench/quality/results/quality-h100-2026-12-08"
DATASETS = ("bundled", "vader_movie_sentiment", "dm_math")


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("quality") / "quality.jsonl"
    assert main([str(RECORD / name) for name in DATASETS] + ["--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert out.with_suffix(".md").read_text() == (RECORD / "quality.md").read_text()
    return {Path(row["data"]).stem: row for row in lines}


def test_the_calibrated_default_is_first_where_no_finalist_beats_it_measurably(rows: dict[str, dict]) -> None:
    for name in DATASETS:
        row = rows[name]
        calibrated = row["baselines"]["calibrated"]["candidate"]
        assert row["first"]["candidate"] == calibrated == row["best_baseline"] and row["first_is_baseline"]
        assert row["first_vs_best_baseline"] is None
        searched = row["search_vs_best_baseline"]
        assert searched["candidate"] not in {s["candidate"] for s in row["baselines"].values()}
        assert searched["low"] <= 0 <= searched["high"] and searched["p"] > 0.05  # not measurably better


def test_the_figures_are_the_reports(rows: dict[str, dict]) -> None:
    bundled = rows["bundled"]
    assert bundled["test_prompts"] == 271 and rows["dm_math"]["test_prompts"] == 400
    assert bundled["calibrated_vs_qlora"]["delta"] == pytest.approx(51 / 271)  # 144 vs 93 of 271 right
    assert bundled["most_accurate"]["exact_match"] == pytest.approx(154 / 271)
    assert bundled["search_vs_best_baseline"]["delta"] == pytest.approx(10 / 271)
    for row in rows.values():
        assert row["trials"] == 16
        assert 0 < row["baseline_gpu_hours"] < row["search_gpu_hours"]
        assert row["gpu_hours"] == pytest.approx(row["baseline_gpu_hours"] + row["search_gpu_hours"])
