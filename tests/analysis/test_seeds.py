"""Configurations over seeds: the leaderboard's mean and spread, and the flag on a winner inside the spread,
on constructed results tables whose right answers are known."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from analysis.rank import rank_trials
from analysis.seeds import describe_seed_spread, pool_seeds


def results_table(rows: list[tuple[str, str, str, int, str, float]]) -> pd.DataFrame:
    """(trial_id, config_id, origin, seed, status, best_eval_loss) rows, as collect_results writes them."""
    return pd.DataFrame(
        [
            {
                "trial_id": t,
                "config_id": c,
                "origin": o,
                "seed": seed,
                "status": s,
                "r": 8 if c == "a" else 16,
                "lora_alpha": 16,
                "target_modules": "qv",
                "lora_dropout": 0.0,
                "bias": "none",
                "learning_rate": 1e-4,
                "best_eval_loss": loss,
                "base_eval_loss": 2.0,
                "adapter_path": f"/x/{t}",
                "error": None,
            }
            for t, c, o, seed, s, loss in rows
        ]
    )


# a: lucky first seed (0.990), re-checked at 1.010 and 1.020: mean 1.0067. b: 1.000, 1.002, 1.004: mean
# 1.002, the better configuration although a's single best run is lower. c: one seed, never re-checked.
# a's third re-check ran out of memory and is left out of its mean.
RESULTS = results_table(
    [
        ("a", "a", "search", 42, "completed", 0.990),
        ("b", "b", "initial", 42, "completed", 1.000),
        ("c", "c", "search", 42, "completed", 1.050),
        ("a2", "a", "recheck", 43, "completed", 1.010),
        ("a3", "a", "recheck", 44, "completed", 1.020),
        ("a4", "a", "recheck", 45, "oom", math.nan),
        ("b2", "b", "recheck", 43, "completed", 1.002),
        ("b3", "b", "recheck", 44, "completed", 1.004),
    ]
)


def test_configurations_are_pooled_over_their_seeds() -> None:
    pooled = pool_seeds(RESULTS).set_index("config_id")
    assert list(pooled.index) == ["a", "b", "c"]
    assert pooled.loc["a", "best_eval_loss"] == pytest.approx((0.990 + 1.010 + 1.020) / 3)
    assert pooled.loc["a", "trial_best_eval_loss"] == 0.990
    assert pooled.loc["a", "seeds"] == 3 and pooled.loc["a", "seed_trials"] == "a,a2,a3"
    assert pooled.loc["a", "seed_spread"] == pytest.approx(0.030)
    assert pooled.loc["a", "seed_std"] == pytest.approx(pd.Series([0.990, 1.010, 1.020]).std())
    assert pooled.loc["b", "origin"] == "initial" and pooled.loc["b", "trial_id"] == "b"  # its own trial
    assert pooled.loc["c", "seeds"] == 1 and math.isnan(pooled.loc["c", "seed_spread"])


def test_leaderboard_ranks_configurations_by_their_mean() -> None:
    board = rank_trials(pool_seeds(RESULTS), None, loss_tolerance=0.0, base_eval_loss=2.0)
    ranked = board[board["rank"].notna()]
    # By single runs a (0.990) would win; by the mean over seeds b (1.002) beats a (1.0067).
    assert list(ranked["candidate"]) == ["b", "a", "c"]
    assert list(ranked["seeds"]) == [3, 3, 1]
    assert ranked["seed_spread"].iloc[0] == pytest.approx(0.004)


def test_without_rechecks_the_table_is_unchanged() -> None:
    plain = RESULTS[RESULTS["origin"] != "recheck"]
    assert pool_seeds(plain) is plain
    assert describe_seed_spread(rank_trials(plain, None, loss_tolerance=0.0)) is None


def test_a_lead_inside_the_seed_spread_is_flagged() -> None:
    board = rank_trials(pool_seeds(RESULTS), None, loss_tolerance=0.0)
    text = describe_seed_spread(board)
    # b leads a by 1.0067 - 1.002 = 0.0047, inside a's spread of 0.030.
    assert text is not None and "not a reliable winner" in text
    assert "lead of 0.00467" in text and "seed spread of 0.03" in text


def test_a_lead_beyond_the_seed_spread_is_not_flagged() -> None:
    far = RESULTS.copy()
    far.loc[far["config_id"] == "a", "best_eval_loss"] += 0.1  # a's mean now 1.107, behind c (1.050)
    # b leads c by 0.048, beyond b's spread of 0.004 (c, one seed, has none).
    text = describe_seed_spread(rank_trials(pool_seeds(far), None, loss_tolerance=0.0))
    assert text is not None and "not a reliable winner" not in text and "larger than the seed spread" in text
