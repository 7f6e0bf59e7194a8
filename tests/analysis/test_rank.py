"""The ranking rule, on constructed results tables whose right order is known."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from analysis.rank import rank_trials


def results_table(rows: list[tuple[str, str, float]]) -> pd.DataFrame:
    """(trial_id, status, best_eval_loss) rows, the other columns as collect_results writes them."""
    return pd.DataFrame(
        [
            {
                "trial_id": t,
                "status": s,
                "r": 8,
                "lora_alpha": 16,
                "target_modules": "qv",
                "lora_dropout": 0.0,
                "bias": "none",
                "learning_rate": 1e-4,
                "best_eval_loss": loss,
                "base_eval_loss": 2.0,
                "error": "RuntimeError: out of memory" if s == "error" else None,
            }
            for t, s, loss in rows
        ]
    )


def quality_table(rows: dict[str, tuple[float, float]]) -> pd.DataFrame:
    return pd.DataFrame(
        {"exact_match": [q[0] for q in rows.values()], "chrf": [q[1] for q in rows.values()]},
        index=pd.Index(list(rows), name="candidate"),
    )


# a: the lowest loss; b, c within 2% of it; d outside; e errored; f never reported a loss.
RESULTS = results_table([("a", "completed", 1.00), ("b", "stopped", 1.01), ("c", "completed", 1.015),
                         ("d", "completed", 1.10), ("e", "error", 0.90), ("f", "failed", math.nan)])  # fmt: skip
QUALITY = quality_table(
    {"a": (0.50, 40.0), "b": (0.75, 30.0), "c": (0.75, 35.0), "d": (1.0, 90.0), "base": (0.25, 20.0)}
)


def test_quality_ranks_within_tolerance_then_loss_then_failures_last() -> None:
    board = rank_trials(RESULTS, QUALITY, loss_tolerance=0.02, base_eval_loss=2.0)
    # c and b tie on exact match; chrF puts c first. d has the best answers but its loss is 10% worse.
    # e has the lowest loss but errored: unranked, after the base row, like f.
    assert list(board["candidate"]) == ["c", "b", "a", "d", "base", "e", "f"]
    assert list(board["rank"][:4]) == [1, 2, 3, 4]
    assert board["rank"][4:].isna().all()
    assert list(board["ranked_by"][:4]) == ["quality"] * 3 + ["eval_loss"]
    assert board.set_index("candidate").loc["d", "note"] == "outside the loss tolerance"
    assert "out of memory" in board.set_index("candidate").loc["e", "note"]
    assert "no finite eval loss" in board.set_index("candidate").loc["f", "note"]
    base = board.set_index("candidate").loc["base"]
    assert base["best_eval_loss"] == 2.0 and base["exact_match"] == 0.25


def test_tolerance_zero_is_ranking_by_eval_loss() -> None:
    board = rank_trials(RESULTS, QUALITY, loss_tolerance=0.0)
    assert list(board["candidate"][:4]) == ["a", "b", "c", "d"]


def test_a_wide_tolerance_lets_the_best_answers_win() -> None:
    board = rank_trials(RESULTS, QUALITY, loss_tolerance=0.2)
    assert list(board["candidate"][:4]) == ["d", "c", "b", "a"]


def test_rank_by_is_configurable() -> None:
    board = rank_trials(RESULTS, QUALITY, loss_tolerance=0.02, rank_by=["chrf"])
    assert list(board["candidate"][:3]) == ["a", "c", "b"]


def test_ties_are_stable_and_marked() -> None:
    results = results_table([("z", "completed", 1.0), ("y", "completed", 1.0), ("x", "completed", 1.005)])
    quality = quality_table({"z": (0.5, 10.0), "y": (0.5, 10.0), "x": (0.5, 10.0)})
    board = rank_trials(results, quality, loss_tolerance=0.02)
    # Equal scores: lower loss first (y, z before x); y and z tie on loss too: by trial id.
    assert list(board["candidate"][:3]) == ["y", "z", "x"]
    notes = board.set_index("candidate")["note"]
    assert notes["y"] == notes["z"] == "tied on quality and eval loss; ordered by trial id"
    assert notes["x"] == "tied on quality; ordered by eval loss"
    again = rank_trials(results.iloc[::-1].reset_index(drop=True), quality, loss_tolerance=0.02)
    assert list(again["candidate"][:3]) == ["y", "z", "x"]


def test_trials_without_answers_follow_by_loss() -> None:
    # Only the top-k generate: a trial within tolerance without scores ranks after those with scores.
    board = rank_trials(RESULTS, QUALITY.drop(index=["a"]), loss_tolerance=0.02)
    assert list(board["candidate"][:4]) == ["c", "b", "a", "d"]
    assert board.set_index("candidate").loc["a", "note"] == "no answer scores (not among the top-k)"


def test_no_quality_at_all_is_ranking_by_loss() -> None:
    board = rank_trials(RESULTS, None, loss_tolerance=0.02)
    assert list(board["candidate"]) == ["a", "b", "c", "d", "base", "e", "f"]


def test_unknown_score_is_refused() -> None:
    with pytest.raises(ValueError, match=r"rank_by.*bleu"):
        rank_trials(RESULTS, QUALITY, loss_tolerance=0.02, rank_by=["bleu"])


def test_candidates_are_usable_trials_with_adapters_by_loss() -> None:
    from analysis.rank import choose_candidates

    table = results_table(
        [("e", "error", 0.5), ("c", "completed", 1.2), ("s", "stopped", 1.1), ("f", "failed", math.nan),
         ("o", "oom", 0.9), ("b", "completed", 1.1), ("n", "completed", 1.0)]
    )  # fmt: skip
    table["adapter_path"] = [f"/adapters/{t}" if t != "n" else None for t in table["trial_id"]]
    assert list(choose_candidates(table, top_k=3)["trial_id"]) == ["b", "s", "c"]  # ties by trial id
    assert list(choose_candidates(table, top_k=1)["trial_id"]) == ["b"]


def test_importance_study_rebuilt_from_the_table_uses_the_recorded_space(tmp_path: Path) -> None:
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import TrialState

    from analysis.experiment import Experiment
    from analysis.importance import rebuild_study

    table = results_table([("a", "completed", 1.0), ("b", "stopped", 1.2), ("c", "failed", math.nan)])
    table["r"] = [8, 16, 8]
    table["learning_rate"] = [1e-4, 3e-4, 2e-4]
    space = {"r": {"choice": [8, 16]}, "learning_rate": {"loguniform": [1e-5, 1e-3]}}
    experiment = Experiment(tmp_path, {"config": {"search": {"space": space}}}, table)
    study = rebuild_study(experiment)
    assert [t.value for t in study.trials] == [1.0, 1.2]  # the failed trial is left out
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert study.trials[0].distributions == {
        "r": CategoricalDistribution([8, 16]),
        "learning_rate": FloatDistribution(1e-5, 1e-3, log=True),
    }
