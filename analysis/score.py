"""Objective scores of generated answers on the held-out prompts, with intervals and paired tests.

exact_match (1.0 / 0.0) is set where an answer can be checked (`answers_match`): prompts whose data row says
`check` "exact" (normalized text equality) or "json" (equal JSON values), and, for data without a `check`
column, every prompt whose reference is short (at most SHORT_ANSWER_WORDS words: a label, a number, a
name). chrF (sacrebleu's character n-gram F-score, 0-100) is set for every prompt that has a reference,
free text included. Prompts without a reference (the user's) get neither: they are read, or judged.
Every mean comes with a bootstrap 95% interval (analysis.stats).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from decimal import Decimal

import numpy as np
import pandas as pd

from analysis.stats import bootstrap_interval, paired_test

CHECKABLE = ("exact", "json")
# A reference of up to this many words is checked by exact match when the data has no `check` column:
# labels ("positive"), numbers, names and short phrases have one right wording; a longer reference is a
# sentence that can be right in many wordings, so it is scored by chrF only.
SHORT_ANSWER_WORDS = 5
MOST_COMMON = "most-common"  # the candidate name of the trivial baseline: the most common training answer
METRICS = ("exact_match", "chrf")

# A number (sign and decimals kept, so "-3" and "3" differ and "3.50" equals "3.5"), or a run of letters
# and digits; everything else (punctuation, spaces) separates tokens and is dropped.
_TOKEN = re.compile(r"[-+]?\d+(?:\.\d+)?(?![\w])|[^\W_]+")
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
_FENCE = re.compile(r"^```[A-Za-z]*\s*\n?(.*?)\n?\s*```$", re.DOTALL)


def normalize_answer(text: str) -> str:
    """Canonical form for exact match: casefolded words and numbers separated by single spaces;
    punctuation dropped; numbers written canonically ("3.50" -> "3.5", "+7" -> "7", "42.0" -> "42")."""
    tokens = []
    for token in _TOKEN.findall(text.casefold()):
        # The pattern admits only plain decimals, which Decimal always parses.
        tokens.append(format(Decimal(token).normalize(), "f") if _NUMBER.fullmatch(token) else token)
    return " ".join(tokens)


def _parse_json(text: str) -> tuple[bool, object]:
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return True, json.loads(text)
    except json.JSONDecodeError:
        return False, None


def _json_equal(a: object, b: object) -> bool:
    # Python's == says True == 1 and 34 == 34.0; an answer of true for an age is wrong, so bools stay bools.
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def answers_match(check: str | None, prediction: str, reference: str) -> bool:
    """Whether a prediction is right: equal normalized text (`normalize_answer`; check "exact", "free" or
    None) or equal JSON values (check "json": the prediction may carry whitespace or a Markdown code fence;
    key order does not matter; text that does not parse never matches)."""
    if check in ("exact", "free", None):
        return normalize_answer(prediction) == normalize_answer(reference)
    if check == "json":
        ok_prediction, predicted = _parse_json(prediction)
        ok_reference, expected = _parse_json(reference)
        return ok_prediction and ok_reference and _json_equal(predicted, expected)
    raise ValueError(f"check must be one of 'exact', 'json', 'free' or None; got {check!r}")


def exact_match_applies(check: str | None, reference: str | None) -> bool:
    """Whether a prompt is scored by exact match: its row's check says so, or it has none and a short reference."""
    if reference is None:
        return False
    if check is not None:
        return check in CHECKABLE
    return 0 < len(reference.split()) <= SHORT_ANSWER_WORDS


def score_generations(generations: pd.DataFrame) -> pd.DataFrame:
    """The generations with exact_match and chrf columns added (NaN where a score does not apply)."""
    from sacrebleu.metrics import CHRF

    chrf = CHRF()
    exact, similarity = [], []
    for row in generations.itertuples():
        reference = row.reference if isinstance(row.reference, str) else None
        check = row.check if isinstance(row.check, str) else None
        exact.append(
            float(answers_match(check, row.answer, reference))
            if reference is not None and exact_match_applies(check, reference)
            else math.nan
        )
        similarity.append(
            chrf.sentence_score(row.answer, [reference]).score if reference is not None else math.nan
        )
    return generations.assign(exact_match=exact, chrf=similarity)


def summarize_quality(scored: pd.DataFrame) -> pd.DataFrame:
    """Per candidate, for exact_match (accuracy, 0-1, over the prompts it applies to) and chrf (0-100, over
    the prompts with a reference): the mean, its 95% interval (`_low`, `_high`) and the count (`_n`).
    Indexed by candidate, in the order they first appear."""
    rows = {}
    for candidate, group in scored.groupby("candidate", sort=False):
        row: dict[str, float] = {}
        for metric in METRICS:
            interval = bootstrap_interval(group[metric].to_numpy(dtype=float))
            row |= {
                metric: interval.mean,
                f"{metric}_low": interval.low,
                f"{metric}_high": interval.high,
                f"{metric}_n": interval.n,
            }
        rows[candidate] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "candidate"
    return table


def quality_by_task(scored: pd.DataFrame) -> pd.DataFrame:
    """Per task and candidate: the task's score (exact match, 0-1, where it applies, else chrF / 100) with its
    95% interval and count. Columns task, metric, candidate, mean, low, high, n; empty without tasks."""
    with_task = scored[scored["task"].notna() & scored["reference"].notna()]
    columns = ["task", "metric", "candidate", "mean", "low", "high", "n"]
    if with_task.empty:
        return pd.DataFrame(columns=columns)
    exact = with_task["exact_match"].notna()
    frame = with_task.assign(
        metric=np.where(exact, "exact_match", "chrf"),
        value=with_task["exact_match"].where(exact, with_task["chrf"] / 100),
    )
    rows = []
    for (task, metric, candidate), group in frame.groupby(["task", "metric", "candidate"], sort=False):
        interval = bootstrap_interval(group["value"].to_numpy(dtype=float))
        rows.append([task, metric, candidate, interval.mean, interval.low, interval.high, interval.n])
    return pd.DataFrame(rows, columns=columns)


def most_common_answers(references: Sequence[tuple[str | None, str]]) -> dict[str | None, str]:
    """The most common reference per task from (task, reference) pairs of the training data (first seen
    wins a tie), and under None the most common overall: the trivial baseline's answers."""
    by_task: dict[str | None, Counter[str]] = {None: Counter()}
    for task, reference in references:
        by_task.setdefault(task, Counter())[reference] += 1
        by_task[None][reference] += 1
    return {task: counts.most_common(1)[0][0] for task, counts in by_task.items() if counts}


def baseline_generations(generations: pd.DataFrame, answers: dict[str | None, str]) -> pd.DataFrame:
    """The trivial baseline as a candidate: for every prompt with a reference, the most common training
    answer of its task (of all the data where the task is unknown). No model, no tokens."""
    prompts = generations[generations["reference"].notna()].drop_duplicates("prompt_id")
    if prompts.empty or not answers:
        return generations.iloc[0:0]
    chosen = [
        answers.get(task if isinstance(task, str) else None, answers.get(None, ""))
        for task in prompts["task"]
    ]
    return prompts.assign(candidate=MOST_COMMON, adapter_path=None, answer=chosen, new_tokens=0)


def compare_candidates(scored: pd.DataFrame, candidates: Sequence[str]) -> pd.DataFrame:
    """A paired test of every ordered pair of `candidates` on every metric they were scored on: candidate,
    other, metric, test, delta (candidate's mean minus other's; exact match in 0-1), low, high, p_value, n,
    verdict ("better", "tie" or "worse": the candidate against the other)."""
    columns = ["candidate", "other", "metric", "test", "delta", "low", "high", "p_value", "n", "verdict"]
    rows = []
    for metric in METRICS:
        table = scored.pivot_table(index="prompt_id", columns="candidate", values=metric, aggfunc="first")
        for a, b in itertools.permutations([c for c in candidates if c in table.columns], 2):
            test = paired_test(
                table[a].to_numpy(dtype=float), table[b].to_numpy(dtype=float), binary=metric == "exact_match"
            )
            if test.n:
                rows.append(
                    [
                        a,
                        b,
                        metric,
                        test.test,
                        test.delta,
                        test.low,
                        test.high,
                        test.p_value,
                        test.n,
                        test.verdict,
                    ]
                )
    return pd.DataFrame(rows, columns=columns)


def side_by_side(generations: pd.DataFrame) -> pd.DataFrame:
    """One row per prompt: question, reference and each candidate's answer in its own column."""
    answers = generations.pivot_table(
        index="prompt_id", columns="candidate", values="answer", aggfunc="first", sort=False
    )
    answers = answers[list(generations["candidate"].unique())]
    meta = generations.drop_duplicates("prompt_id").set_index("prompt_id")[["task", "question", "reference"]]
    return meta.join(answers)
