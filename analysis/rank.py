"""The leaderboard: held-out answer quality where it separates the finalists, eval loss where it does not.

The rule (report.top_k, report.loss_tolerance, report.rank_by):
1. A trial is *usable* (trainable.schema.usable) when its status is rankable (completed, or
   stopped by the scheduler) and its best eval loss is finite. Trials that are not (error, failed, no loss)
   are listed last, unranked, with the reason.
2. The *finalists* (choose_candidates) are the top_k usable trials by best eval loss plus every baseline
   trial (search.baselines: QLoRA's recipe, the calibrated default; always, when usable): they answered the
   held-out prompts. They rank first, ordered by
   a. net wins: how many other finalists a finalist is measurably better than (paired test on the held-out
      prompts, p < 0.05: McNemar's exact test for exact match, a paired bootstrap for chrF; the first of
      those in rank_by that was scored), minus how many are measurably better than it;
   b. equal net wins: those within `loss_tolerance` (relative) of the best eval loss first, ordered by their
      held-out scores in rank_by order (higher first; ties fall to the next score); then the others;
   c. then best eval loss, then trial id.
   The best baseline (the first baseline in that order) is what a user gets without the search, so a
   searched finalist ranks above it only if it is measurably better than it: those that are not move to
   just below it. A sweep that could not beat its best baseline ranks that baseline #1.
3. All other usable trials follow, ordered by best eval loss.
The base model's row and the trivial most-common-answer row (the most common training answer of each task)
stand after the ranked trials, with no rank, for contrast. vs_baseline and vs_base say whether a finalist
is measurably better than, tied with or worse than the best baseline and the base model, with the p-value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from analysis.experiment import LEADERBOARD, Experiment
from analysis.generate import BASE
from analysis.score import MOST_COMMON
from analysis.seeds import pool_seeds
from trainable.outcome import BASELINE, DESCRIPTIONS, RANKABLE_STATUSES
from trainable.schema import (
    ADAPTER_PATH,
    BASELINE_NAME,
    BEST_EVAL_LOSS,
    FINAL_EVAL_LOSS,
    GPU_SECONDS,
    GPU_SHARE,
    ORIGIN,
    STATUS,
    TRIAL_ID,
    WALL_TIME_S,
    usable,
)
from trainable.settings import HYPERPARAMETERS

# rank_by name -> leaderboard column.
QUALITY_COLUMNS = {"exact_match": "exact_match", "chrf": "chrf", "judge": "judge_strength"}
TESTED = ("exact_match", "chrf")  # the scores with a paired test per prompt
TEST_NAMES = {"mcnemar": "McNemar", "paired_bootstrap": "paired bootstrap"}


def baseline_trials(results: pd.DataFrame) -> dict[str, str]:
    """{trial id: the baseline's name (sweeps.baselines)} of the sweep's baseline trials."""
    if ORIGIN not in results or BASELINE_NAME not in results:  # a table of the trials alone, as in a test
        return {}
    rows = results[results[ORIGIN] == BASELINE]
    return {str(t): str(name) for t, name in zip(rows[TRIAL_ID], rows[BASELINE_NAME], strict=True)}


def tested_metric(quality: pd.DataFrame | None, rank_by: Sequence[str]) -> str | None:
    """The held-out score the paired tests separate finalists by: the first of rank_by with a paired test
    that some trial was scored on."""
    for name in rank_by:
        if name in TESTED and quality is not None and name in quality and quality[name].notna().any():
            return name
    return None


def choose_candidates(results: pd.DataFrame, *, top_k: int) -> pd.DataFrame:
    """The finalists: the `top_k` usable trials that have an adapter, best eval loss first (equal losses by
    trial id), then the baseline trials (results' `origin`) that are usable and not among them. The
    report's finalists; the first row is the adapter to export when there is no leaderboard yet."""
    finished = results[usable(results) & results[ADAPTER_PATH].notna()]
    ordered = finished.sort_values([BEST_EVAL_LOSS, TRIAL_ID], kind="stable")
    baselines = ordered[ordered[ORIGIN] == BASELINE]
    return pd.concat([ordered.head(top_k), baselines]).drop_duplicates(TRIAL_ID)


def rank_trials(
    results: pd.DataFrame,
    quality: pd.DataFrame | None = None,
    *,
    loss_tolerance: float,
    rank_by: Sequence[str] = ("exact_match", "chrf"),
    base_eval_loss: float = math.nan,
    paired: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The leaderboard of `results` (one row per trial, with `origin`) with `quality` (indexed by candidate:
    a trial id, "base" or the baseline; columns exact_match, chrf, their intervals, judge_strength, ...) and
    `paired` (analysis.score.compare_candidates). One row per trial plus the base and baseline rows."""
    unknown = [name for name in rank_by if name not in QUALITY_COLUMNS]
    if unknown:
        raise ValueError(f"rank_by: {unknown} unknown; choose from {', '.join(QUALITY_COLUMNS)}")
    if loss_tolerance < 0:
        raise ValueError(f"loss_tolerance must be >= 0, got {loss_tolerance}")
    quality = quality if quality is not None else pd.DataFrame()
    keys = [QUALITY_COLUMNS[name] for name in rank_by]
    metric = tested_metric(quality, rank_by)
    baselines = baseline_trials(results)
    table = results.drop(columns=["rank"], errors="ignore").copy()
    table.insert(0, "candidate", table[TRIAL_ID].astype(str))
    trial_quality = quality.drop(index=[BASE, MOST_COMMON], errors="ignore")
    table = table.join(trial_quality, on="candidate", rsuffix="_q") if len(trial_quality) else table
    for column in {*keys, "exact_match", "chrf"}:
        if column not in table:
            table[column] = math.nan

    loss = pd.to_numeric(table[BEST_EVAL_LOSS], errors="coerce")
    finished = usable(table)
    best = loss[finished].min() if finished.any() else math.nan
    limit = best + loss_tolerance * abs(best) if finished.any() else math.nan
    finalist = finished & table[keys].notna().any(axis=1) if keys else finished & False
    table["within_tolerance"] = finished & (loss <= limit)
    table["loss_gap"] = (loss - best) / abs(best) if finished.any() else math.nan

    finalists = set(table.loc[finalist, "candidate"])
    table["wins"], table["losses"] = 0, 0
    if metric is not None and paired is not None and len(paired):
        among = paired[
            (paired["metric"] == metric)
            & paired["candidate"].isin(finalists)
            & paired["other"].isin(finalists)
        ]
        wins = among[among["verdict"] == "better"].groupby("candidate").size()
        losses = among[among["verdict"] == "worse"].groupby("candidate").size()
        table["wins"] = table["candidate"].map(wins).fillna(0).astype(int)
        table["losses"] = table["candidate"].map(losses).fillna(0).astype(int)
    table["net_wins"] = table["wins"] - table["losses"]

    first = table[finalist].copy()
    # Held-out scores order only the finalists within the tolerance; the others fall through to eval loss.
    sort_keys = [f"_{k}" for k in keys]
    for key, column in zip(keys, sort_keys, strict=True):
        first[column] = first[key].where(first["within_tolerance"])
    first = first.sort_values(
        ["net_wins", "within_tolerance", *sort_keys, BEST_EVAL_LOSS, "candidate"],
        ascending=[False, False, *[False] * len(keys), True, True],
        na_position="last",
        kind="stable",
    ).drop(columns=sort_keys)
    best_baseline = next((c for c in first["candidate"] if c in baselines), None)
    first = _beat_the_baseline(first, best_baseline, paired, metric)
    second = table[finished & ~finalist].sort_values([BEST_EVAL_LOSS, "candidate"], kind="stable")
    rest = table[~finished].sort_values([STATUS, "candidate"], kind="stable")

    first["ranked_by"], second["ranked_by"], rest["ranked_by"] = "held-out", "eval_loss", ""
    label = metric.replace("_", " ") if metric else "answers"
    first["note"] = [_finalist_note(row, label) for row in first.itertuples()]
    second["note"] = "not a finalist (not among the top_k by eval loss)"
    rest["note"] = [_failure_note(row) for row in rest.itertuples()]
    ranked = pd.concat([first, second], ignore_index=True)
    ranked.insert(0, "rank", pd.array(range(1, len(ranked) + 1), dtype="Int64"))
    rest.insert(0, "rank", pd.array([None] * len(rest), dtype="Int64"))
    for frame in (ranked, rest):
        for trial, name in baselines.items():
            here = frame["candidate"] == trial
            tag = " (the best)" if trial == best_baseline else ""
            if here.any():
                frame.loc[here, "note"] = (
                    f"baseline{tag}: {DESCRIPTIONS.get(name, name)}; " + frame.loc[here, "note"]
                )

    contrast = []
    for name, status, note, eval_loss in (
        (BASE, "base", "base model without adapter, for contrast", base_eval_loss),
        (MOST_COMMON, "trivial", "the most common training answer of each task, for contrast", math.nan),
    ):
        if name != BASE and name not in quality.index:
            continue
        row = {
            "rank": pd.NA,
            "candidate": name,
            TRIAL_ID: None,
            STATUS: status,
            BEST_EVAL_LOSS: eval_loss,
            FINAL_EVAL_LOSS: eval_loss,
            "ranked_by": "",
            "note": note,
            "within_tolerance": False,
            "loss_gap": (eval_loss - best) / abs(best) if finished.any() else math.nan,
        }
        if name in quality.index:
            row.update({k: v for k, v in quality.loc[name].items() if k in table.columns})
        contrast.append(row)
    contrast_rows = pd.DataFrame(contrast).astype({"rank": "Int64"})
    board = pd.concat([frame for frame in (ranked, contrast_rows, rest) if len(frame)], ignore_index=True)
    board = _add_comparisons(
        board, paired, metric=metric, against={"vs_baseline": best_baseline, "vs_base": BASE}
    )
    board["best_baseline"] = board["candidate"] == best_baseline
    front = [
        "rank",
        "candidate",
        STATUS,
        "ranked_by",
        *keys,
        "exact_match",
        "exact_match_low",
        "exact_match_high",
        "exact_match_n",
        "chrf",
        "chrf_low",
        "chrf_high",
        "chrf_n",
        "vs_baseline",
        "vs_baseline_p",
        "vs_base",
        "vs_base_p",
        BEST_EVAL_LOSS,
        "loss_gap",
        "within_tolerance",
        "net_wins",
        *[h for h in HYPERPARAMETERS if h in board],
        "note",
    ]
    front = list(dict.fromkeys(c for c in front if c in board))
    return board[front + [c for c in board.columns if c not in front]]


def _beat_the_baseline(
    first: pd.DataFrame, best_baseline: str | None, paired: pd.DataFrame | None, metric: str | None
) -> pd.DataFrame:
    """The finalists in rank order with those ahead of the best baseline that are not measurably better than
    it (on the tested metric) moved to just below it (rule 2 of the module docstring)."""
    if best_baseline is None:
        return first
    order = list(first["candidate"])
    at = order.index(best_baseline)
    beats = set()
    if metric is not None and paired is not None and len(paired):
        tests = paired[(paired["metric"] == metric) & (paired["other"] == best_baseline)]
        beats = set(tests.loc[tests["verdict"] == "better", "candidate"])
    ahead = [c for c in order[:at] if c in beats]
    behind = [c for c in order[:at] if c not in beats]
    new_order = [*ahead, best_baseline, *behind, *order[at + 1 :]]
    return first.set_index("candidate", drop=False).loc[new_order].reset_index(drop=True)


def _add_comparisons(
    board: pd.DataFrame, paired: pd.DataFrame | None, *, metric: str | None, against: dict[str, str | None]
) -> pd.DataFrame:
    """Columns PREFIX (verdict), PREFIX_delta, _low, _high, _p for each finalist and the base, against the
    candidate named in `against` (PREFIX -> candidate), on the tested metric (named in vs_metric)."""
    board = board.copy()
    board["vs_metric"] = metric  # the score the vs_* columns compare (exact match differences are in 0-1)
    for prefix, other in against.items():
        board[prefix] = None
        for suffix in ("delta", "low", "high", "p"):
            board[f"{prefix}_{suffix}"] = math.nan
        if metric is None or other is None or paired is None or paired.empty:
            continue
        rows = paired[(paired["metric"] == metric) & (paired["other"] == other)].set_index("candidate")
        for index, candidate in board["candidate"].items():
            if candidate in rows.index:
                test = rows.loc[candidate]
                board.loc[index, prefix] = test["verdict"]
                board.loc[index, [f"{prefix}_delta", f"{prefix}_low", f"{prefix}_high", f"{prefix}_p"]] = [
                    test["delta"],
                    test["low"],
                    test["high"],
                    test["p_value"],
                ]
    return board


def _finalist_note(row: object, label: str) -> str:
    wins, losses = int(getattr(row, "wins", 0)), int(getattr(row, "losses", 0))
    if wins or losses:
        return f"held-out {label}: measurably better than {wins}, worse than {losses} other finalist(s)"
    if getattr(row, "within_tolerance", False):
        return f"no measurable held-out difference; within the loss tolerance: ordered by held-out {label}"
    return "no measurable held-out difference; outside the loss tolerance: ordered by eval loss"


def _failure_note(row: object) -> str:
    error = getattr(row, "error", None)
    status = getattr(row, STATUS, "")
    if isinstance(error, str) and error:
        return f"{status}: {error.splitlines()[0][:200]}"
    return f"{status}: no finite eval loss" if status in ("failed", *RANKABLE_STATUSES) else f"{status}"


def format_p(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.2g}"


def describe_difference(
    delta: float, low: float, high: float, p: float, test: str, metric: str, n: int
) -> str:
    """'6.0 points of held-out exact match (95% CI 2.1 to 9.9, McNemar p=0.003, 300 prompts)'."""
    scale = 100 if metric == "exact_match" else 1
    name = "exact match" if metric == "exact_match" else "chrF"
    return (
        f"{scale * delta:+.1f} points of held-out {name} (95% CI {scale * low:+.1f} to {scale * high:+.1f}, "
        f"{TEST_NAMES.get(test, test)} {format_p(p)}, {n} prompts)"
    )


def recommend(board: pd.DataFrame, paired: pd.DataFrame | None, *, rank_by: Sequence[str]) -> str:
    """In words: which adapter the leaderboard recommends (its #1) and how sure it is. Against the best
    baseline on the held-out prompts (difference, 95% interval, p-value), what the search cost beyond the
    baselines, and against the base model. A sweep whose search could not beat its best baseline says so
    and recommends that baseline (the ranking puts it first: module docstring, rule 2)."""
    ranked = board[board["rank"].notna()]
    if ranked.empty:
        return "No adapter to recommend: no trial finished with a finite eval loss."
    first = ranked.iloc[0]
    name = str(first["candidate"])
    trials = board[board[TRIAL_ID].notna()]
    baselines = baseline_trials(trials)
    best = next(
        (str(c) for c, b in zip(board["candidate"], board.get("best_baseline", []), strict=False) if b), None
    )
    metric = tested_metric(ranked, rank_by)
    if first["ranked_by"] != "held-out" or metric is None or paired is None or paired.empty:
        return f"Recommended: trial {name} (#1), by eval loss alone: no held-out answers were scored."

    def test(a: str, b: str) -> pd.Series | None:
        rows = paired[(paired["candidate"] == a) & (paired["other"] == b) & (paired["metric"] == metric)]
        return rows.iloc[0] if len(rows) else None

    def words(row: pd.Series) -> str:
        return describe_difference(
            row["delta"], row["low"], row["high"], row["p_value"], row["test"], metric, int(row["n"])
        )

    def baseline(trial: str) -> str:
        return f"{DESCRIPTIONS.get(baselines[trial], baselines[trial])} (trial {trial})"

    cost = describe_search_cost(trials)
    if not baselines:
        text = [
            f"Recommended: trial {name} (#1). The sweep ran no baseline (search.baselines: []), so nothing "
            f"says what it gained over a default; it cost {cost}."
        ]
    elif best is None:
        statuses = ", ".join(f"{baseline(t)} {_status(board, t)}" for t in baselines)
        text = [
            f"Recommended: trial {name} (#1). No baseline finished to compare with ({statuses}); the search "
            f"cost {cost}."
        ]
    elif name == best and len(trials) == len(baselines):
        text = [f"Recommended: {baseline(best)}. The sweep trained its baselines only (no search ran)."]
    elif name == best:
        text = [
            f"Recommended: the best baseline, {baseline(best)}: no finalist of the search is measurably "
            "better than it on the held-out prompts."
        ]
        searched = [
            str(c) for c in ranked["candidate"] if c not in baselines and test(str(c), best) is not None
        ]
        if searched and (against := test(searched[0], best)) is not None:
            text.append(f"The search's best finalist, trial {searched[0]}, against it: {words(against)}.")
        text.append(f"The search cost {cost} without a measurable gain.")
    elif (against := test(name, best)) is not None:
        text = [
            f"Recommended: trial {name} (#1). It beats the best baseline, {baseline(best)}: {words(against)}. "
            f"The search cost {cost}."
        ]
    else:  # ranked above the best baseline without a test against it: not a finalist of the same prompts
        text = [
            f"Recommended: trial {name} (#1); it has no paired test against the best baseline, {baseline(best)}."
        ]
    if (base := test(name, BASE)) is not None:
        text.append(f"Against the base model: {words(base)}.")
    return " ".join(text)


def describe_search_cost(trials: pd.DataFrame) -> str:
    """What the trials other than the baselines cost, beside the baselines' own: GPU-hours, or for CPU
    trials their trial-hours."""
    baseline = trials[ORIGIN] == BASELINE
    gpu = bool((trials[GPU_SHARE] > 0).any())
    column = GPU_SECONDS if gpu else WALL_TIME_S
    unit = "GPU-hours" if gpu else "trial-hours on CPUs"
    search, baselines = trials.loc[~baseline, column].sum() / 3600, trials.loc[baseline, column].sum() / 3600
    return f"{search:.3g} {unit} beyond the baselines' {baselines:.3g}"


def _status(board: pd.DataFrame, candidate: str) -> str:
    rows = board.loc[board["candidate"] == candidate, STATUS]
    return str(rows.iloc[0]) if len(rows) else "unknown"


def load_leaderboard(experiment: Experiment) -> pd.DataFrame:
    """leaderboard.parquet when the report has run; else the trials ranked by eval loss alone (no answers)."""
    path = experiment.path / LEADERBOARD
    if path.is_file():
        return pd.read_parquet(path)
    tolerance = float(experiment.summary.section("report").get("loss_tolerance", 0.0))
    return rank_trials(
        pool_seeds(experiment.results),
        None,
        loss_tolerance=tolerance,
        base_eval_loss=experiment.base_eval_loss,
    )
