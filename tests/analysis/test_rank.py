"""The ranking rule, on constructed results tables whose right order is known."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from analysis.rank import rank_trials, recommend
from analysis.report import select_finalists
from analysis.score import compare_candidates, score_generations, summarize_quality
from tests.conftest import sweep_summary


def results_table(
    rows: list[tuple[str, str, float]], *, baselines: dict[str, str] | None = None
) -> pd.DataFrame:
    """(trial_id, status, best_eval_loss) rows, the other columns as collect_results writes them;
    `baselines`: {trial id: the baseline it ran (qlora, calibrated)}. Every trial held a quarter of a GPU
    for 360 s."""
    baselines = baselines or {}
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
                "origin": "baseline" if t in baselines else "search",
                "baseline": baselines.get(t, ""),
                "gpu_share": 0.25,
                "wall_time_s": 360.0,
                "gpu_seconds": 90.0,
                "adapter_path": f"/experiments/x/{t}/checkpoint_000001",
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
RESULTS = results_table(
    [
        ("a", "completed", 1.00),
        ("b", "stopped", 1.01),
        ("c", "completed", 1.015),
        ("d", "completed", 1.10),
        ("e", "error", 0.90),
        ("f", "failed", math.nan),
    ]
)
QUALITY = quality_table(
    {"a": (0.50, 40.0), "b": (0.75, 30.0), "c": (0.75, 35.0), "d": (1.0, 90.0), "base": (0.25, 20.0)}
)


def test_quality_ranks_within_tolerance_then_loss_then_failures_last() -> None:
    board = rank_trials(RESULTS, QUALITY, loss_tolerance=0.02, base_eval_loss=2.0)
    # No paired tests: nothing is measurably better. Within the tolerance, c and b tie on exact match and
    # chrF puts c first; d has the best answers but its loss is 10% worse: after them, by loss.
    # e has the lowest loss but errored: unranked, after the base row, like f.
    assert list(board["candidate"]) == ["c", "b", "a", "d", "base", "e", "f"]
    assert list(board["rank"][:4]) == [1, 2, 3, 4]
    assert board["rank"][4:].isna().all()
    assert list(board["ranked_by"][:4]) == ["held-out"] * 4
    notes = board.set_index("candidate")["note"]
    assert notes["d"] == "no measurable held-out difference; outside the loss tolerance: ordered by eval loss"
    assert notes["c"].startswith("no measurable held-out difference; within the loss tolerance")
    assert "out of memory" in notes["e"] and "no finite eval loss" in notes["f"]
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


def test_ties_are_stable() -> None:
    results = results_table([("z", "completed", 1.0), ("y", "completed", 1.0), ("x", "completed", 1.005)])
    quality = quality_table({"z": (0.5, 10.0), "y": (0.5, 10.0), "x": (0.5, 10.0)})
    board = rank_trials(results, quality, loss_tolerance=0.02)
    # Equal scores: lower loss first (y, z before x); y and z tie on loss too: by trial id.
    assert list(board["candidate"][:3]) == ["y", "z", "x"]
    again = rank_trials(results.iloc[::-1].reset_index(drop=True), quality, loss_tolerance=0.02)
    assert list(again["candidate"][:3]) == ["y", "z", "x"]


def test_trials_without_answers_follow_the_finalists_by_loss() -> None:
    # Only the finalists generate: a trial without scores ranks after them, whatever its loss.
    board = rank_trials(RESULTS, QUALITY.drop(index=["a"]), loss_tolerance=0.02)
    assert list(board["candidate"][:4]) == ["c", "b", "d", "a"]
    assert (
        board.set_index("candidate").loc["a", "note"] == "not a finalist (not among the top_k by eval loss)"
    )


def test_no_quality_at_all_is_ranking_by_loss() -> None:
    board = rank_trials(RESULTS, None, loss_tolerance=0.02)
    assert list(board["candidate"]) == ["a", "b", "c", "d", "base", "e", "f"]


def test_unknown_score_is_refused() -> None:
    with pytest.raises(ValueError, match=r"rank_by.*bleu"):
        rank_trials(RESULTS, QUALITY, loss_tolerance=0.02, rank_by=["bleu"])


# ------------------------------------------------------------------ held-out answers through the scoring


def held_out_answers(
    right: dict[str, int], *, prompts: int = 300, free: dict[str, float] | None = None
) -> pd.DataFrame:
    """Scored generations: `prompts` short-answer prompts of alpaca data (no task, no check) where candidate c
    answers the first right[c] correctly, plus four free-text prompts (a handful) answered with the share
    free[c] of the reference's words."""
    reference = "It is rainy in Oslo at seven degrees today, says the report"
    rows = []
    for candidate, count in right.items():
        for i in range(prompts):
            rows.append(
                {
                    "prompt_id": f"test-{i:04d}",
                    "source": "test",
                    "task": None,
                    "check": None,
                    "question": "?",
                    "reference": str(i),
                    "candidate": candidate,
                    "answer": str(i) if i < count else "no idea",
                }
            )
        words = reference.split()
        kept = " ".join(words[: round(len(words) * (free or {}).get(candidate, 0.5))])
        for i in range(4):
            rows.append(
                {
                    "prompt_id": f"free-{i}",
                    "source": "test",
                    "task": None,
                    "check": None,
                    "question": "?",
                    "reference": reference,
                    "candidate": candidate,
                    "answer": kept,
                }
            )
    return score_generations(pd.DataFrame(rows))


def board_for(
    results: pd.DataFrame, scored: pd.DataFrame, **options: float
) -> tuple[pd.DataFrame, pd.DataFrame]:
    candidates = list(scored["candidate"].unique())
    paired = compare_candidates(scored, candidates)
    board = rank_trials(
        results,
        summarize_quality(scored),
        paired=paired,
        base_eval_loss=2.0,
        loss_tolerance=options.get("loss_tolerance", 0.02),
    )
    return board, paired


def test_a_tie_within_the_tolerance_is_broken_by_held_out_accuracy_not_chrf() -> None:
    # a has the lower loss (b is 1% worse: within the tolerance) and the better chrF on the four free-text
    # prompts; b answers 20 more of 300 short questions right: measurably better (McNemar).
    results = results_table([("a", "completed", 1.00), ("b", "completed", 1.01)])
    scored = held_out_answers({"a": 200, "b": 220, "base": 10}, free={"a": 1.0, "b": 0.3, "base": 0.1})
    board, paired = board_for(results, scored)
    assert list(board["candidate"][:2]) == ["b", "a"]
    free_text = scored[scored["prompt_id"].str.startswith("free")].groupby("candidate")["chrf"].mean()
    assert (
        free_text["a"] > free_text["b"]
    )  # chrF over the handful of free-text prompts would have put a first
    assert (
        paired[(paired["candidate"] == "b") & (paired["other"] == "a")]
        .set_index("metric")
        .loc["exact_match", "verdict"]
        == "better"
    )
    row = board.set_index("candidate").loc["b"]
    assert row["exact_match_n"] == 300 and row["net_wins"] == 1
    assert row["exact_match_low"] < row["exact_match"] < row["exact_match_high"]
    # Not significant (5 more right), still within the tolerance: the held-out accuracy orders them, not chrF.
    scored = held_out_answers({"a": 200, "b": 205, "base": 10}, free={"a": 1.0, "b": 0.3, "base": 0.1})
    board, _ = board_for(results, scored)
    assert list(board["candidate"][:2]) == ["b", "a"]
    assert board.set_index("candidate").loc["b", "net_wins"] == 0


def test_a_measurably_better_baseline_outranks_a_lower_loss() -> None:
    # The QLoRA-recipe baseline r is 10% worse on eval loss (outside the tolerance) but measurably better.
    results = results_table([("a", "completed", 1.00), ("r", "completed", 1.10)], baselines={"r": "qlora"})
    scored = held_out_answers({"a": 150, "r": 190, "base": 10})
    board, paired = board_for(results, scored)
    assert list(board["candidate"][:2]) == ["r", "a"]
    rows = board.set_index("candidate")
    assert rows.loc["r", "note"].startswith(
        "baseline (the best): the QLoRA recipe; held-out exact match: measurably better than 1"
    )
    assert rows.loc["a", "vs_baseline"] == "worse" and rows.loc["a", "vs_baseline_p"] < 0.001
    assert (
        rows.loc["a", "vs_baseline_delta"] == pytest.approx(-40 / 300)
        and rows.loc["a", "vs_metric"] == "exact_match"
    )
    assert rows.loc["r", "vs_base"] == "better" and pd.isna(rows.loc["r", "vs_baseline"])
    assert list(rows["best_baseline"][["r", "a"]]) == [True, False]
    text = recommend(board, paired, rank_by=["exact_match", "chrf"])
    assert text.startswith(
        "Recommended: the best baseline, the QLoRA recipe (trial r): no finalist of the search "
        "is measurably better than it on the held-out prompts. The search's best finalist, trial "
        "a, against it: -13.3 points of held-out exact match"
    )
    assert "The search cost 0.025 GPU-hours beyond the baselines' 0.025 without a measurable gain." in text
    assert "Against the base model: +60.0 points" in text


def test_the_recommendation_says_how_sure_it_is_and_what_the_search_cost() -> None:
    results = results_table(
        [
            ("a", "completed", 1.00),
            ("b", "completed", 1.05),
            ("q", "completed", 1.08),
            ("c", "completed", 1.02),
        ],
        baselines={"q": "qlora", "c": "calibrated"},
    )
    board, paired = board_for(results, held_out_answers({"a": 236, "b": 200, "q": 150, "c": 206, "base": 10}))
    assert list(board["candidate"][:2]) == ["a", "c"]  # a beats the best baseline, the calibrated default
    text = recommend(board, paired, rank_by=["exact_match", "chrf"])
    assert text.startswith(
        "Recommended: trial a (#1). It beats the best baseline, the calibrated default (trial c): "
        "+10.0 points of held-out exact match (95% CI +"
    )
    assert "McNemar p<0.001, 300 prompts). The search cost 0.05 GPU-hours beyond the baselines' 0.05." in text


def test_a_search_that_could_not_beat_its_best_baseline_recommends_the_baseline() -> None:
    """a has the lowest loss and 5 more right answers than the calibrated default c, not a measurable
    difference: c ranks #1 and the recommendation says the search bought nothing measurable."""
    results = results_table(
        [
            ("a", "completed", 1.00),
            ("b", "completed", 1.05),
            ("q", "completed", 1.08),
            ("c", "completed", 1.02),
        ],
        baselines={"q": "qlora", "c": "calibrated"},
    )
    board, paired = board_for(results, held_out_answers({"a": 205, "b": 200, "q": 150, "c": 200, "base": 10}))
    assert list(board["candidate"][:3]) == ["c", "a", "b"]
    rows = board.set_index("candidate")
    assert rows.loc["a", "vs_baseline"] == "tie" and rows.loc["q", "vs_baseline"] == "worse"
    text = recommend(board, paired, rank_by=["exact_match", "chrf"])
    assert text.startswith(
        "Recommended: the best baseline, the calibrated default (trial c): no finalist of the "
        "search is measurably better than it"
    )
    assert "The search's best finalist, trial a, against it: +1.7 points of held-out exact match" in text
    assert "McNemar p=0.062" in text and "without a measurable gain" in text


def test_without_a_baseline_the_recommendation_says_so() -> None:
    board, paired = board_for(
        results_table([("a", "completed", 1.0)]), held_out_answers({"a": 100, "base": 10})
    )
    text = recommend(board, paired, rank_by=["exact_match"])
    assert "The sweep ran no baseline (search.baselines: [])" in text
    assert "Against the base model: +30.0 points" in text


def test_a_sweep_of_its_baseline_alone_recommends_it_without_a_search_cost() -> None:
    # The local sweep: one trial, the calibrated default.
    results = results_table([("c", "completed", 1.0)], baselines={"c": "calibrated"})
    board, paired = board_for(results, held_out_answers({"c": 100, "base": 10}))
    text = recommend(board, paired, rank_by=["exact_match"])
    assert text.startswith(
        "Recommended: the calibrated default (trial c). The sweep trained its baselines only (no search "
        "ran). Against the base model: +30.0 points"
    )
    assert "search cost" not in text


def test_the_baseline_trials_are_always_finalists() -> None:
    results = results_table(
        [
            ("a", "completed", 1.0),
            ("b", "completed", 1.01),
            ("c", "completed", 1.02),
            ("q", "stopped", 1.5),
            ("k", "completed", 1.6),
            ("x", "error", math.nan),
        ],
        baselines={"q": "qlora", "k": "calibrated"},
    )
    assert [c.name for c in select_finalists(results, top_k=2)] == ["base", "a", "b", "q", "k"]
    assert [c.name for c in select_finalists(results, top_k=4)] == ["base", "a", "b", "c", "q", "k"]
    failed = results.assign(status=["completed", "completed", "completed", "error", "error", "error"])
    assert [c.name for c in select_finalists(failed, top_k=2)] == ["base", "a", "b"]


def test_candidates_are_usable_trials_with_adapters_by_loss() -> None:
    from analysis.rank import choose_candidates

    table = results_table(
        [
            ("e", "error", 0.5),
            ("c", "completed", 1.2),
            ("s", "stopped", 1.1),
            ("f", "failed", math.nan),
            ("o", "oom", 0.9),
            ("b", "completed", 1.1),
            ("n", "completed", 1.0),
        ]
    )
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
    experiment = Experiment(tmp_path, sweep_summary({"search": {"space": space}}), table)
    study = rebuild_study(experiment)
    assert [t.value for t in study.trials] == [1.0, 1.2]  # the failed trial is left out
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert study.trials[0].distributions == {
        "r": CategoricalDistribution([8, 16]),
        "learning_rate": FloatDistribution(1e-5, 1e-3, log=True),
    }
