"""Scores of answers: exact match where checkable (or short), chrF where there is a reference, the trivial
baseline, intervals and paired tests."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from analysis.score import (
    MOST_COMMON,
    answers_match,
    baseline_generations,
    compare_candidates,
    exact_match_applies,
    most_common_answers,
    normalize_answer,
    quality_by_task,
    score_generations,
    side_by_side,
    summarize_quality,
)

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


def test_exact_match_on_alpaca_data_without_check() -> None:
    # A sentiment set in alpaca format: no `check` column, so no task or check on the rows; short labels
    # are still checked exactly, a long reference only by chrF.
    generations = pd.DataFrame(
        {
            "prompt_id": ["a", "b", "c", "d"],
            "task": [None] * 4,
            "check": [None] * 4,
            "question": ["Great film!", "Dull.", "Two plus two?", "Describe Oslo."],
            "reference": ["positive", "negative", "4", "Oslo is the capital of Norway, on a fjord."],
            "candidate": ["t1"] * 4,
            "answer": ["Positive.", "positive", " 4.0 ", "Oslo is the capital of Norway, on a fjord."],
        }
    )
    scored = score_generations(generations).set_index("prompt_id")
    assert list(scored["exact_match"][:3]) == [1.0, 0.0, 1.0]
    assert math.isnan(scored.loc["d", "exact_match"]) and scored.loc["d", "chrf"] == 100.0
    quality = summarize_quality(scored.reset_index())
    assert (
        quality.loc["t1", "exact_match"] == pytest.approx(2 / 3) and quality.loc["t1", "exact_match_n"] == 3
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  42  ", "42"),
        ("It is   rainy\nin Oslo.", "it is rainy in oslo"),
        ("Done .", "done"),
        ("KCIRB", "kcirb"),
        ("3.50", "3.5"),
        ("42.0", "42"),
        ("+7", "7"),
        ("-7 degrees", "-7 degrees"),
        ("Positive!", "positive"),
        ("6, 12, 20", "6 12 20"),
        ("", ""),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("check", "prediction", "reference", "expected"),
    [
        ("exact", " 81.", "81", True),
        ("exact", "82", "81", False),
        ("exact", "81 apples", "81", False),
        ("exact", "Even", "even", True),
        ("exact", "6, 12, 20", "6, 12, 20", True),
        ("exact", "12, 6, 20", "6, 12, 20", False),
        (None, "1000.00", "1000", True),
        (None, "-5", "5", False),
        (None, "Paris, France", "paris france", True),
        ("free", "it is rainy in  Oslo at 7 degrees", "It is rainy in Oslo at 7 degrees.", True),
        ("free", "It is sunny in Oslo at 7 degrees.", "It is rainy in Oslo at 7 degrees.", False),
        ("json", '{"age": 34, "name": "Maria"}', '{"name": "Maria", "age": 34}', True),
        ("json", '\n  {"name": "Maria", "age": 34}  \n', '{"name": "Maria", "age": 34}', True),
        ("json", '```json\n{"name": "Maria", "age": 34}\n```', '{"name": "Maria", "age": 34}', True),
        ("json", '```\n{"name": "Maria", "age": 34}\n```', '{"name": "Maria", "age": 34}', True),
        ("json", '{"name": "Maria", "age": 35}', '{"name": "Maria", "age": 34}', False),
        ("json", '{"name": "Maria", "age": "34"}', '{"name": "Maria", "age": 34}', False),
        ("json", '{"name": "Maria"}', '{"name": "Maria", "age": 34}', False),
        ("json", '{"name": "Maria", "age": 34, "city": "Oslo"}', '{"name": "Maria", "age": 34}', False),
        ("json", '{"name": "Maria", "age": 34', '{"name": "Maria", "age": 34}', False),
        ("json", "name: Maria, age: 34", '{"name": "Maria", "age": 34}', False),
        ("json", '{"flag": true}', '{"flag": 1}', False),
        ("json", "", '{"name": "Maria"}', False),
    ],
)
def test_answers_match(check: str | None, prediction: str, reference: str, expected: bool) -> None:
    assert answers_match(check, prediction, reference) is expected


def test_answers_match_rejects_an_unknown_check() -> None:
    with pytest.raises(ValueError, match=r"'exact', 'json', 'free'.*'fuzzy'"):
        answers_match("fuzzy", "1", "1")


def test_exact_match_applies_to_checks_and_short_references() -> None:
    assert exact_match_applies("exact", "a long sentence that is checked anyway because the row says so")
    assert not exact_match_applies("free", "42")
    assert exact_match_applies(None, "New York City")
    assert not exact_match_applies(None, "It is sunny in Oslo at 20 degrees.")
    assert not exact_match_applies(None, None)


def test_summary_counts_only_applicable_prompts_and_has_intervals() -> None:
    quality = summarize_quality(score_generations(GENERATIONS))
    assert list(quality.index) == ["base", "t1"]
    assert quality.loc["t1", "exact_match"] == 1.0 and quality.loc["t1", "exact_match_n"] == 2
    assert quality.loc["base", "exact_match"] == 0.0 and quality.loc["base", "chrf_n"] == 3
    assert quality.loc["t1", "exact_match_low"] == quality.loc["t1", "exact_match_high"] == 1.0
    assert quality.loc["base", "chrf_low"] <= quality.loc["base", "chrf"] <= quality.loc["base", "chrf_high"]


def test_per_task_and_side_by_side_views() -> None:
    scored = score_generations(GENERATIONS)
    by_task = quality_by_task(scored).set_index(["task", "candidate"])
    assert by_task.loc[("add", "t1"), "mean"] == 1.0 and by_task.loc[("add", "t1"), "metric"] == "exact_match"
    assert by_task.loc[("describe_weather", "t1"), "mean"] == 1.0
    assert by_task.loc[("describe_weather", "t1"), "metric"] == "chrf"
    table = side_by_side(scored)
    assert list(table.columns) == ["task", "question", "reference", "base", "t1"]
    assert table.loc["p4", "t1"] == "violets"


def test_the_trivial_baseline_answers_the_most_common_training_answer() -> None:
    answers = most_common_answers(
        [("even_odd", "even"), ("even_odd", "odd"), ("even_odd", "even"), ("add", "5")]
    )
    assert answers == {None: "even", "even_odd": "even", "add": "5"}
    prompts = pd.DataFrame(
        {
            "prompt_id": ["e1", "e2", "x1", "u1"],
            "task": ["even_odd", "even_odd", "unseen", None],
            "check": ["exact", "exact", "exact", None],
            "question": ["4", "7", "?", "poem"],
            "reference": ["even", "odd", "even", None],
            "candidate": ["base"] * 4,
            "answer": ["", "", "", ""],
        }
    )
    baseline = baseline_generations(prompts, answers)
    assert list(baseline["candidate"].unique()) == [MOST_COMMON]
    assert list(baseline["answer"]) == ["even", "even", "even"]  # the unseen task gets the overall answer
    quality = summarize_quality(score_generations(baseline))
    assert quality.loc[MOST_COMMON, "exact_match"] == pytest.approx(2 / 3)


def test_compare_candidates_is_paired_per_prompt() -> None:
    n = 60
    rows = []
    for i in range(n):
        reference = str(i)
        # t1 right on all, t2 right on the first 30, base right on none.
        for candidate, right in (("t1", True), ("t2", i < 30), ("base", False)):
            rows.append(
                {
                    "prompt_id": f"p{i}",
                    "task": "add",
                    "check": "exact",
                    "question": "?",
                    "reference": reference,
                    "candidate": candidate,
                    "answer": reference if right else "x",
                }
            )
    pairs = compare_candidates(score_generations(pd.DataFrame(rows)), ["t1", "t2", "base"])
    exact = pairs[pairs["metric"] == "exact_match"].set_index(["candidate", "other"])
    assert exact.loc[("t1", "t2"), "verdict"] == "better" and exact.loc[("t2", "t1"), "verdict"] == "worse"
    assert (
        exact.loc[("t1", "t2"), "delta"] == pytest.approx(0.5)
        and exact.loc[("t1", "t2"), "test"] == "mcnemar"
    )
    assert exact.loc[("t1", "t2"), "p_value"] == pytest.approx(2 / 2**30)
    assert len(exact) == 6 and set(pairs["metric"]) == {"exact_match", "chrf"}
