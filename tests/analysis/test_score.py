"""Scores of answers: exact match where checkable, chrF where there is a reference."""

from __future__ import annotations

import math

import pandas as pd

from analysis.score import quality_by_task, score_generations, side_by_side, summarize_quality

GENERATIONS = pd.DataFrame(
    {
        "prompt_id": ["p1", "p2", "p3", "p4"] * 2,
        "task": ["add", "extract_json", "describe_weather", None] * 2,
        "check": ["exact", "json", "free", None] * 2,
        "question": ["12 + 30", "Maria is 30", "weather", "a poem"] * 2,
        "reference": ["42", '{"name": "Maria", "age": 30}', "It is sunny in Oslo.", None] * 2,
        "candidate": ["base"] * 4 + ["t1"] * 4,
        "answer": [
            "41",
            "{}",
            "Sunny.",
            "roses",
            "42.",
            '```json\n{"age": 30, "name": "Maria"}\n```',
            "It is sunny in Oslo.",
            "violets",
        ],
    }
)


def test_exact_json_and_free_text_scores() -> None:
    scored = score_generations(GENERATIONS).set_index(["candidate", "prompt_id"])
    assert scored.loc[("t1", "p1"), "exact_match"] == 1.0  # trailing period normalized away
    assert scored.loc[("t1", "p2"), "exact_match"] == 1.0  # fenced JSON, keys in another order
    assert scored.loc[("base", "p1"), "exact_match"] == 0.0
    assert math.isnan(scored.loc[("t1", "p3"), "exact_match"])  # free text: chrF only
    assert scored.loc[("t1", "p3"), "chrf"] == 100.0
    assert 0 < scored.loc[("base", "p3"), "chrf"] < 100
    assert math.isnan(scored.loc[("t1", "p4"), "chrf"])  # the user's prompt has no reference


def test_summary_counts_only_applicable_prompts() -> None:
    quality = summarize_quality(score_generations(GENERATIONS))
    assert list(quality.index) == ["base", "t1"]
    assert quality.loc["t1", "exact_match"] == 1.0 and quality.loc["t1", "exact_match_n"] == 2
    assert quality.loc["base", "exact_match"] == 0.0 and quality.loc["base", "chrf_n"] == 3


def test_per_task_and_side_by_side_views() -> None:
    scored = score_generations(GENERATIONS)
    by_task = quality_by_task(scored)
    assert by_task.loc["add", "t1"] == 1.0 and by_task.loc["describe_weather", "t1"] == 1.0
    table = side_by_side(scored)
    assert list(table.columns) == ["task", "question", "reference", "base", "t1"]
    assert table.loc["p4", "t1"] == "violets"
