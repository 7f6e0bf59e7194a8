"""Configurations over seeds: the leaderboard's view of a sweep with seed re-checks (search.recheck_top).

results.parquet has one row per trial; a re-check (origin "recheck") trains the configuration of the trial
named by its `config_id` with another seed. `pool_seeds` turns such a table into one row per configuration,
so that the leaderboard ranks configurations by their mean over seeds, and `describe_seed_spread` says
whether #1's lead over #2 is larger than what a change of seed alone moves:

    board = rank_trials(pool_seeds(results), ...)    # analysis.rank
    describe_seed_spread(board)  # "#1's lead of 0.004 ... is inside the seed spread of 0.011: not a reliable winner"
"""

from __future__ import annotations

import math

import pandas as pd

from trainable.outcome import RECHECK
from trainable.schema import BEST_EVAL_LOSS, CONFIG_ID, ORIGIN, TRIAL_ID, usable


def has_rechecks(results: pd.DataFrame) -> bool:
    return ORIGIN in results and CONFIG_ID in results and bool((results[ORIGIN] == RECHECK).any())


def pool_seeds(results: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration when the sweep has seed re-checks (else `results` as they are).

    Each row is the configuration's own trial (the search's, whose origin, adapter and id it keeps) with
    best_eval_loss replaced by the mean over its seeds that finished with a finite loss (the trial's own
    value kept as trial_best_eval_loss), and the spread of those: seeds (how many), seed_std (sample
    standard deviation), seed_min, seed_max, seed_spread (max - min) and seed_trials (their trial ids).
    A configuration that was not re-checked has one seed and no spread.
    """
    if not has_rechecks(results):
        return results
    loss = pd.to_numeric(results[BEST_EVAL_LOSS], errors="coerce")
    finished = usable(results)
    rows = []
    for _, group in results.groupby(CONFIG_ID, sort=False):
        own = group[group[ORIGIN] != RECHECK]
        row = (own if len(own) else group).iloc[0].to_dict()
        losses = loss[group.index][finished[group.index]]
        row["trial_best_eval_loss"] = row[BEST_EVAL_LOSS]
        row["seeds"] = len(losses)
        row["seed_trials"] = ",".join(str(t) for t in group.loc[losses.index, TRIAL_ID])
        if len(losses):
            row[BEST_EVAL_LOSS] = float(losses.mean())
        row["seed_std"] = float(losses.std(ddof=1)) if len(losses) > 1 else math.nan
        row["seed_min"] = float(losses.min()) if len(losses) > 1 else math.nan
        row["seed_max"] = float(losses.max()) if len(losses) > 1 else math.nan
        row["seed_spread"] = row["seed_max"] - row["seed_min"]
        rows.append(row)
    return pd.DataFrame(rows).reset_index(drop=True)


def describe_seed_spread(board: pd.DataFrame) -> str | None:
    """In words: whether #1's lead over #2 in mean best eval loss is larger than the seed spread (max - min
    over seeds) of the two; None when the leaderboard has no re-checked configuration among them."""
    if "seed_spread" not in board:
        return None
    ranked = board[board["rank"].notna()].sort_values("rank")
    if len(ranked) < 2:
        return None
    first, second = ranked.iloc[0], ranked.iloc[1]
    spreads = [float(s) for s in (first["seed_spread"], second["seed_spread"]) if pd.notna(s)]
    if not spreads:
        return None
    spread = max(spreads)  # the wider of the two: either could have drawn its luckiest seed
    lead = float(second[BEST_EVAL_LOSS]) - float(first[BEST_EVAL_LOSS])
    seeds = f"over {int(first['seeds'])} and {int(second['seeds'])} seeds"
    if lead < 0:
        return (
            f"#1 ({first['candidate']}) has a higher mean best eval loss than #2 ({second['candidate']}) by "
            f"{-lead:.3g} ({seeds}); the seed spread is {spread:.3g}."
        )
    if lead <= spread:
        return (
            f"#1's lead of {lead:.3g} in mean best eval loss over #2 ({second['candidate']}, {seeds}) is "
            f"inside the seed spread of {spread:.3g}: not a reliable winner."
        )
    return (
        f"#1's lead of {lead:.3g} in mean best eval loss over #2 ({second['candidate']}, {seeds}) is larger "
        f"than the seed spread of {spread:.3g}."
    )
