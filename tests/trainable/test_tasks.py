"""The bundled instruction dataset: reproducible, split as promised, and every answer right."""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.score import answers_match
from trainable.tasks import BUNDLED_PATH, generate_examples, write_examples

REPO_ROOT = Path(__file__).resolve().parents[2]
# Written out here rather than read from the module, so a task that goes missing fails the test.
EXPECTED_TASKS = {
    "add": "exact",
    "subtract": "exact",
    "multiply": "exact",
    "even_odd": "exact",
    "reverse_word": "exact",
    "first_letter": "exact",
    "sort_numbers": "exact",
    "max_number": "exact",
    "count_items": "exact",
    "unit_convert": "exact",
    "extract_json": "json",
    "describe_weather": "free",
}
FIELDS = ["id", "task", "check", "instruction", "input", "output", "split"]


@pytest.fixture
def seed() -> int:
    return 0


@pytest.fixture(scope="module")
def bundled() -> list[dict[str, str]]:
    with BUNDLED_PATH.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _ints(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"-?\d+", text)]


def test_bundled_path_is_the_package_data_file() -> None:
    assert BUNDLED_PATH.is_absolute()
    assert BUNDLED_PATH == REPO_ROOT / "trainable" / "bundled" / "tasks.jsonl"


def test_cli_with_default_seed_reproduces_the_committed_file(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "tasks.jsonl"
    # Run from another directory: the default path must not depend on the working directory.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(
        [sys.executable, "-m", "trainable.tasks", "--out", str(out), "--seed", "0"],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
    )
    assert out.read_bytes() == BUNDLED_PATH.read_bytes()


def test_write_examples_reproduces_the_committed_file(tmp_path: Path, seed: int) -> None:
    out = tmp_path / "tasks.jsonl"
    write_examples(out, generate_examples(seed=seed))
    assert out.read_bytes() == BUNDLED_PATH.read_bytes()


def test_seed_changes_the_draw_and_repeats_exactly(seed: int) -> None:
    assert generate_examples(seed=seed) == generate_examples(seed=seed)
    assert generate_examples(seed=seed + 1) != generate_examples(seed=seed)


def test_records_have_the_schema(bundled: list[dict[str, str]]) -> None:
    for row in bundled:
        assert list(row) == FIELDS
        assert all(isinstance(row[key], str) for key in FIELDS)
        assert row["check"] == EXPECTED_TASKS[row["task"]]
        assert row["instruction"] and row["output"]
        assert row["id"].startswith(row["task"].replace("_", "-") + "-")
    assert len({row["id"] for row in bundled}) == len(bundled)


def test_split_sizes(bundled: list[dict[str, str]]) -> None:
    assert collections.Counter(row["split"] for row in bundled) == {"train": 1000, "eval": 100, "test": 300}


def test_every_split_has_every_task(bundled: list[dict[str, str]]) -> None:
    for split in ("train", "eval", "test"):
        assert {row["task"] for row in bundled if row["split"] == split} == set(EXPECTED_TASKS)


def test_splits_are_stratified(bundled: list[dict[str, str]]) -> None:
    counts = collections.Counter((row["split"], row["task"]) for row in bundled)
    for split, size in (("train", 1000), ("eval", 100), ("test", 300)):
        per_task = [counts[split, task] for task in EXPECTED_TASKS]
        # Equal shares up to rounding; the free-text task is weighted a little higher.
        assert max(per_task) - min(per_task) <= max(2, size // 50)


def test_no_question_appears_in_two_splits(bundled: list[dict[str, str]]) -> None:
    splits_of: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
    for row in bundled:
        splits_of[row["instruction"], row["input"]].add(row["split"])
    assert all(len(splits) == 1 for splits in splits_of.values())
    # Stronger: within a task an input is never repeated, even under another phrasing.
    assert len({(row["task"], row["input"]) for row in bundled}) == len(bundled)


def test_free_text_is_about_a_tenth(bundled: list[dict[str, str]]) -> None:
    share = sum(row["check"] == "free" for row in bundled) / len(bundled)
    assert 0.08 <= share <= 0.12


def test_answers_are_short(bundled: list[dict[str, str]]) -> None:
    for row in bundled:
        limit = {"exact": 20, "json": 60, "free": 60}[row["check"]]
        assert len(row["output"]) <= limit, row


def test_phrasings_per_task_are_few(bundled: list[dict[str, str]]) -> None:
    by_task: dict[str, set[str]] = collections.defaultdict(set)
    for row in bundled:
        # unit_convert names the target unit in the instruction; fold it out to count phrasings.
        by_task[row["task"]].add(
            re.sub(r"meters|grams|centimeters|minutes|seconds|hours", "UNIT", row["instruction"])
        )
    assert all(1 <= len(phrasings) <= 3 for phrasings in by_task.values()), by_task


def _operands(text: str, operator: str) -> tuple[int, int]:
    match = re.fullmatch(rf"(\d+) {re.escape(operator)} (\d+)", text)
    assert match is not None, f"{text!r} is not '<a> {operator} <b>'"
    return int(match.group(1)), int(match.group(2))


def _recompute(row: dict[str, str]) -> str:
    """The answer worked out again from the input, independently of the generator."""
    task, text = row["task"], row["input"]
    if task == "add":
        a, b = _operands(text, "+")
        return str(a + b)
    if task == "subtract":
        a, b = _operands(text, "-")
        return str(a - b)
    if task == "multiply":
        a, b = _operands(text, "x")
        return str(a * b)
    if task == "even_odd":
        return ("even", "odd")[int(text) % 2]
    if task == "reverse_word":
        return "".join(reversed(text))
    if task == "first_letter":
        return text[:1]
    if task == "sort_numbers":
        return ", ".join(str(n) for n in sorted(_ints(text)))
    if task == "max_number":
        return str(max(_ints(text)))
    if task == "count_items":
        return str(len(text.split(",")))
    if task == "unit_convert":
        value, unit = text.split(" ")
        target = re.search(r"meters|grams|centimeters|minutes|seconds|hours", row["instruction"])
        assert target is not None
        factor = {
            ("km", "meters"): 1000,
            ("kg", "grams"): 1000,
            ("m", "centimeters"): 100,
            ("hours", "minutes"): 60,
            ("minutes", "seconds"): 60,
            ("days", "hours"): 24,
        }[unit, target.group()]
        return str(int(value) * factor)
    if task == "describe_weather":
        fields = dict(part.split(": ") for part in text.split("; "))
        return f"It is {fields['weather']} in {fields['city']} at {fields['temp']} degrees."
    raise AssertionError(f"no recomputation for task {task!r}")


def test_checkable_answers_are_right(bundled: list[dict[str, str]]) -> None:
    checked: collections.Counter[str] = collections.Counter()
    for row in bundled:
        if row["task"] == "extract_json":
            continue
        assert row["output"] == _recompute(row), row
        checked[row["task"]] += 1
    assert set(checked) == set(EXPECTED_TASKS) - {"extract_json"}


def test_subtraction_is_never_negative(bundled: list[dict[str, str]]) -> None:
    assert all(int(row["output"]) >= 0 for row in bundled if row["task"] == "subtract")


def test_extracted_json_is_canonical_and_true_to_the_sentence(bundled: list[dict[str, str]]) -> None:
    rows = [row for row in bundled if row["task"] == "extract_json"]
    assert rows
    for row in rows:
        obj = json.loads(row["output"])
        assert list(obj) == ["name", "age", "city"]
        assert row["output"] == json.dumps(obj)
        assert isinstance(obj["age"], int) and _ints(row["input"]) == [obj["age"]]
        sentence_words = re.findall(r"[A-Z][a-z]+", row["input"])
        # The name and the city are the sentence's capitalized words (besides a leading "Living").
        assert sorted(w for w in sentence_words if w != "Living") == sorted([obj["name"], obj["city"]])
        assert row["output"] != row["input"]


def test_count_items_lists_have_no_repeats(bundled: list[dict[str, str]]) -> None:
    for row in bundled:
        if row["task"] == "count_items":
            items = row["input"].split(", ")
            assert len(set(items)) == len(items)


def test_every_bundled_reference_matches_itself_and_not_a_neighbour(bundled: list[dict[str, str]]) -> None:
    for row, other in zip(bundled, bundled[1:] + bundled[:1], strict=True):
        assert answers_match(row["check"], row["output"], row["output"])
        if row["task"] == other["task"] and row["output"] != other["output"]:
            assert not answers_match(row["check"], other["output"], row["output"])
