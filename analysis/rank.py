"""The leaderboard: eval loss and answer quality combined by one documented rule.

The rule (report.loss_tolerance, report.rank_by):
1. A trial is *usable* when its status is rankable (trainable.outcome.RANKABLE_STATUSES: completed, or
   stopped by the scheduler) and its best eval loss is finite. Trials that are not (error, failed, no loss) are listed last, unranked, with the reason.
2. Among usable trials whose best eval loss is within `loss_tolerance` (relative) of the best one, the
   trials that have answer scores (the top-k that generated) rank first, ordered by the `rank_by` scores,
   higher first, each breaking ties of the one before (default: exact-match accuracy, then chrF).
3. All other usable trials follow, ordered by best eval loss.
4. Remaining ties (equal scores and equal loss) keep the order of trial id, and are marked in `note`.
The base model's row (loss and scores of the model without adapter) stands after the ranked trials, with
no rank, for contrast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from analysis.experiment import LEADERBOARD, Experiment
from analysis.generate import BASE
from analysis.seeds import pool_seeds
from trainable.outcome import RANKABLE_STATUSES
from trainable.settings import HYPERPARAMETERS

# rank_by name -> leaderboard column.
QUALITY_COLUMNS = {"exact_match": "exact_match", "chrf": "chrf", "judge": "judge_strength"}


def usable_trials(results: pd.DataFrame) -> pd.Series:
    """Which rows of a results table may be ranked: a rankable status and a finite best eval loss."""
    loss = pd.to_numeric(results["best_eval_loss"], errors="coerce")
    return results["status"].isin(RANKABLE_STATUSES) & loss.map(lambda x: math.isfinite(x))


def choose_candidates(results: pd.DataFrame, *, top_k: int) -> pd.DataFrame:
    """The `top_k` usable trials that have an adapter, best eval loss first (equal losses by trial id):
    the report's candidates, and the adapter to export when there is no leaderboard yet."""
    usable = results[usable_trials(results) & results["adapter_path"].notna()]
    return usable.sort_values(["best_eval_loss", "trial_id"], kind="stable").head(top_k)


def rank_trials(
    results: pd.DataFrame,
    quality: pd.DataFrame | None = None,
    *,
    loss_tolerance: float,
    rank_by: Sequence[str] = ("exact_match", "chrf"),
    base_eval_loss: float = math.nan,
) -> pd.DataFrame:
    """The leaderboard of `results` (one row per trial) with `quality` (indexed by candidate: a trial id or
    "base"; columns exact_match, chrf, judge_strength, ...). One row per trial plus the base row."""
    unknown = [name for name in rank_by if name not in QUALITY_COLUMNS]
    if unknown:
        raise ValueError(f"rank_by: {unknown} unknown; choose from {', '.join(QUALITY_COLUMNS)}")
    if loss_tolerance < 0:
        raise ValueError(f"loss_tolerance must be >= 0, got {loss_tolerance}")
    quality = quality if quality is not None else pd.DataFrame()
    keys = [QUALITY_COLUMNS[name] for name in rank_by]
    table = results.drop(columns=["rank"], errors="ignore").copy()
    table.insert(0, "candidate", table["trial_id"].astype(str))
    table = table.join(quality, on="candidate", rsuffix="_q") if len(quality) else table
    for column in {*keys, "exact_match", "chrf"}:
        if column not in table:
            table[column] = math.nan

    loss = pd.to_numeric(table["best_eval_loss"], errors="coerce")
    usable = usable_trials(table)
    best = loss[usable].min() if usable.any() else math.nan
    limit = best + loss_tolerance * abs(best) if usable.any() else math.nan
    scored = table[keys].notna().any(axis=1) if keys else pd.Series(False, index=table.index)
    by_quality = usable & (loss <= limit) & scored
    table["within_tolerance"] = usable & (loss <= limit)
    table["loss_gap"] = (loss - best) / abs(best) if usable.any() else math.nan

    # Sort keys: negated quality (higher first; NaN last), then loss, then trial id.
    first = table[by_quality].copy()
    first = first.sort_values([*keys, "best_eval_loss", "candidate"], ascending=[False] * len(keys) + [True, True],
                              na_position="last", kind="stable")  # fmt: skip
    second = table[usable & ~by_quality].sort_values(["best_eval_loss", "candidate"], kind="stable")
    rest = table[~usable].sort_values(["status", "candidate"], kind="stable")

    first["ranked_by"], second["ranked_by"], rest["ranked_by"] = "quality", "eval_loss", ""
    first["note"] = _tie_notes(
        first, [*keys, "best_eval_loss"], "tied on quality and eval loss; ordered by trial id"
    )
    first["note"] = first["note"].where(
        first["note"] != "", _tie_notes(first, keys, "tied on quality; ordered by eval loss")
    )
    second["note"] = _tie_notes(second, ["best_eval_loss"], "tied on eval loss; ordered by trial id")
    second["note"] = second["note"].where(
        second["note"] != "",
        [
            "outside the loss tolerance" if not w else "no answer scores (not among the top-k)"
            for w in second["within_tolerance"]
        ],
    )
    rest["note"] = [_failure_note(row) for row in rest.itertuples()]
    ranked = pd.concat([first, second], ignore_index=True)
    ranked.insert(0, "rank", pd.array(range(1, len(ranked) + 1), dtype="Int64"))
    rest.insert(0, "rank", pd.array([None] * len(rest), dtype="Int64"))

    base = {"rank": pd.NA, "candidate": BASE, "trial_id": None, "status": "base",
            "best_eval_loss": base_eval_loss, "final_eval_loss": base_eval_loss, "ranked_by": "",
            "note": "base model without adapter, for contrast", "within_tolerance": False,
            "loss_gap": (base_eval_loss - best) / abs(best) if usable.any() else math.nan}  # fmt: skip
    if BASE in quality.index:
        base.update({k: v for k, v in quality.loc[BASE].items() if k in table.columns})
    base_row = pd.DataFrame([base]).astype({"rank": "Int64"})
    board = pd.concat([frame for frame in (ranked, base_row, rest) if len(frame)], ignore_index=True)
    front = ["rank", "candidate", "status", "ranked_by", *keys, "exact_match", "chrf", "best_eval_loss", "loss_gap",
             "within_tolerance", *[h for h in HYPERPARAMETERS if h in board], "note"]  # fmt: skip
    front = list(dict.fromkeys(c for c in front if c in board))
    return board[front + [c for c in board.columns if c not in front]]


def _tie_notes(frame: pd.DataFrame, columns: list[str], text: str) -> list[str]:
    """`text` for rows whose values in `columns` equal their neighbour's (all NaN counts as equal)."""
    if not columns or len(frame) < 2:
        return [""] * len(frame)
    values = [
        tuple("nan" if pd.isna(v) else v for v in row) for row in frame[columns].itertuples(index=False)
    ]
    notes = []
    for i, value in enumerate(values):
        tied = (i > 0 and values[i - 1] == value) or (i + 1 < len(values) and values[i + 1] == value)
        notes.append(text if tied else "")
    return notes


def _failure_note(row: object) -> str:
    error = getattr(row, "error", None)
    status = getattr(row, "status", "")
    if isinstance(error, str) and error:
        return f"{status}: {error.splitlines()[0][:200]}"
    return f"{status}: no finite eval loss" if status in ("failed", *RANKABLE_STATUSES) else f"{status}"


def load_leaderboard(experiment: Experiment) -> pd.DataFrame:
    """leaderboard.parquet when the report has run; else the trials ranked by eval loss alone (no answers)."""
    path = experiment.path / LEADERBOARD
    if path.is_file():
        return pd.read_parquet(path)
    tolerance = float(experiment.config.get("report", {}).get("loss_tolerance", 0.0))
    return rank_trials(
        pool_seeds(experiment.results),
        None,
        loss_tolerance=tolerance,
        base_eval_loss=experiment.base_eval_loss,
    )
