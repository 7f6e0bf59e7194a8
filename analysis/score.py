"""Objective scores of generated answers: exact match where the task's answer is checkable, chrF for all.

exact_match (1.0 / 0.0) is set for prompts whose check is "exact" or "json" (trainable.tasks.answers_match:
normalized string equality, or equal JSON values); chrF (sacrebleu's character n-gram F-score, 0-100) is
set for every prompt that has a reference, free text included. Prompts without a reference (the user's)
get neither: they are read, or judged.
"""

from __future__ import annotations

import math

import pandas as pd

from trainable.tasks import answers_match

CHECKABLE = ("exact", "json")


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
            if reference is not None and check in CHECKABLE
            else math.nan
        )
        similarity.append(
            chrf.sentence_score(row.answer, [reference]).score if reference is not None else math.nan
        )
    return generations.assign(exact_match=exact, chrf=similarity)


def summarize_quality(scored: pd.DataFrame) -> pd.DataFrame:
    """Per candidate: exact_match (mean over checkable prompts) and its count, chrf (mean over prompts with
    a reference) and its count. Indexed by candidate, in the order they first appear."""
    grouped = scored.groupby("candidate", sort=False)
    return pd.DataFrame(
        {
            "exact_match": grouped["exact_match"].mean(),
            "exact_match_n": grouped["exact_match"].count(),
            "chrf": grouped["chrf"].mean(),
            "chrf_n": grouped["chrf"].count(),
        }
    )


def quality_by_task(scored: pd.DataFrame) -> pd.DataFrame:
    """Exact match (checkable tasks) or chrF (free text) per task (rows) and candidate (columns)."""
    with_task = scored[scored["task"].notna()]
    if with_task.empty:
        return pd.DataFrame()
    score = with_task["exact_match"].where(with_task["check"].isin(CHECKABLE), with_task["chrf"] / 100)
    table = with_task.assign(score=score).pivot_table(
        index="task", columns="candidate", values="score", aggfunc="mean"
    )
    return table[[c for c in scored["candidate"].unique() if c in table.columns]]


def side_by_side(generations: pd.DataFrame) -> pd.DataFrame:
    """One row per prompt: question, reference and each candidate's answer in its own column."""
    answers = generations.pivot_table(
        index="prompt_id", columns="candidate", values="answer", aggfunc="first", sort=False
    )
    answers = answers[list(generations["candidate"].unique())]
    meta = generations.drop_duplicates("prompt_id").set_index("prompt_id")[["task", "question", "reference"]]
    return meta.join(answers)
