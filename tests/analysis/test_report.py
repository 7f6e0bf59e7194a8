"""The report on a real (tiny) sweep: made by the driver, rerun by hand, on a copied folder, with a judge."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import EVAL_PROMPTS, REPO_ROOT, TRIALS, USER_PROMPTS

from analysis.experiment import ExperimentError, load_experiment, relocate
from analysis.score import MOST_COMMON
from analysis.settings import load_report_settings


def run_module(
    module: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args], env=env, capture_output=True, text=True, timeout=600
    )


def test_the_driver_wrote_every_output(tiny_sweep: Path) -> None:
    for name in (
        "leaderboard.parquet",
        "leaderboard.csv",
        "generations.parquet",
        "paired_tests.parquet",
        "report.html",
    ):
        assert (tiny_sweep / name).is_file(), name
    assert not list(tiny_sweep.glob(".*.tmp-*")), "a temporary file was left behind"
    page = (tiny_sweep / "report.html").read_text()
    assert 'id="environment"' in page and f"torch {torch.__version__}" in page  # sweep.json's environment
    # The recommendation weighs the search against its baseline, and its cost in CPU trial-hours.
    assert "the calibrated default (trial " in page and "trial-hours on CPUs beyond the baselines" in page


def test_leaderboard_has_every_trial_and_the_base(tiny_sweep: Path) -> None:
    board = pd.read_parquet(tiny_sweep / "leaderboard.parquet")
    results = pd.read_parquet(tiny_sweep / "results.parquet")
    assert len(results) == TRIALS
    assert set(board["candidate"]) == {*results["trial_id"], "base", MOST_COMMON}
    assert list(board["rank"].dropna()) == list(range(1, TRIALS + 1))
    assert pd.read_csv(tiny_sweep / "leaderboard.csv")["candidate"].tolist() == board["candidate"].tolist()
    # The finalists are the two best by loss (top_k 2) and the baseline, whatever its loss: they have scores.
    scored = board[board["exact_match"].notna()]["candidate"]
    best_two = results.sort_values("best_eval_loss")["trial_id"].head(2)
    baseline = results.loc[results["origin"] == "baseline"]
    assert list(baseline["baseline"]) == ["calibrated"] and baseline["step"].iloc[0] == 4  # trained in full
    finalist_ids = {*best_two, *baseline["trial_id"]}
    assert set(scored) == {*finalist_ids, "base", MOST_COMMON}
    finalists = board[board["candidate"].isin(finalist_ids)]
    rows = board.set_index("candidate")
    assert rows.loc[baseline["trial_id"].iloc[0], "best_baseline"] and rows["best_baseline"].sum() == 1
    assert (
        rows.loc[list(finalist_ids - set(baseline["trial_id"])), "vs_baseline"]
        .isin(["better", "tie", "worse"])
        .all()
    )
    # Every held-out prompt has a reference (chrF); the free-text task's is not checked by exact match.
    generations = pd.read_parquet(tiny_sweep / "generations.parquet")
    checkable = generations[(generations["source"] == "test") & generations["check"].isin(["exact", "json"])]
    assert (finalists["chrf_n"] == EVAL_PROMPTS).all()
    assert (finalists["exact_match_n"] == checkable["prompt_id"].nunique()).all()
    assert (finalists["exact_match_low"] <= finalists["exact_match"]).all()
    assert (
        finalists["vs_base"].isin(["better", "tie", "worse"]).all()
        and finalists["vs_base_p"].between(0, 1).all()
    )
    paired = pd.read_parquet(tiny_sweep / "paired_tests.parquet")
    assert set(paired["candidate"]) == {*finalist_ids, "base"} and set(paired["metric"]) == {
        "exact_match",
        "chrf",
    }


def test_generations_are_one_row_per_prompt_and_candidate(tiny_sweep: Path) -> None:
    everything = pd.read_parquet(tiny_sweep / "generations.parquet")
    generations = everything[everything["candidate"] != MOST_COMMON]
    prompts = EVAL_PROMPTS + len(USER_PROMPTS)
    assert generations["prompt_id"].nunique() == prompts
    assert generations["candidate"].nunique() == 3  # top 2 + base
    assert len(generations) == prompts * 3
    assert not everything.duplicated(["prompt_id", "candidate"]).any()
    assert set(generations[generations["source"] == "user"]["question"]) == set(USER_PROMPTS)
    # The held-out prompts come from the bundled set's test split; the baseline answers each of them.
    evals = generations[generations["source"] == "test"]
    assert evals["prompt_id"].nunique() == EVAL_PROMPTS and evals["task"].nunique() == EVAL_PROMPTS
    assert evals["reference"].notna().all() and evals["chrf"].notna().all()
    baseline = everything[everything["candidate"] == MOST_COMMON]
    assert set(baseline["prompt_id"]) == set(evals["prompt_id"]) and baseline["exact_match"].notna().any()
    assert evals[evals["check"].isin(["exact", "json"])]["exact_match"].isin([0.0, 1.0]).all()
    # Generation settings are recorded on every row.
    assert (generations["gen_max_new_tokens"] == 6).all() and (generations["gen_num_beams"] == 1).all()
    assert (generations["new_tokens"] <= 6).all()


def test_a_copied_experiment_reports_with_overrides_and_a_judge(
    tiny_sweep: Path, tiny_llama: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "elsewhere" / "tiny-copy"
    shutil.copytree(tiny_sweep, copy)
    # As on another machine: the recorded absolute paths point nowhere.
    results = pd.read_parquet(copy / "results.parquet")
    for column in ("adapter_path", "trial_path"):
        results[column] = [
            str(Path("/nonexistent/storage/tiny") / Path(p).relative_to(tiny_sweep)) for p in results[column]
        ]
    results.to_parquet(copy / "results.parquet")
    for name in ("leaderboard.parquet", "generations.parquet", "report.html"):
        (copy / name).unlink()
    done = run_module(
        "analysis.report",
        str(copy / "results.parquet"),
        "--top-k",
        "1",
        "report.eval_prompts=2",
        "prompts=[]",
        f"judge={tiny_llama}",
        "rank_by=[judge, exact_match]",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "report:" in done.stdout
    assert "Recommended: trial " in done.stdout or "Recommended: the best baseline, " in done.stdout
    experiment = load_experiment(copy)
    assert all(str(p).startswith(str(copy)) for p in experiment.results["adapter_path"])
    generations = pd.read_parquet(copy / "generations.parquet")
    assert len(generations) == 2 * 2 + 2  # 2 prompts x (top 1 + base) + the baseline's 2
    judgments = pd.read_parquet(copy / "judgments.parquet")
    assert len(judgments) == 2 * 2  # 2 prompts x both orders of the one pair
    assert judgments["judge_prompt"].str.contains("Answer B:").all() and judgments["verdict"].notna().all()
    board = pd.read_parquet(copy / "leaderboard.parquet")
    assert board.loc[board["rank"] == 1, "judge_strength"].notna().all()
    page = (copy / "report.html").read_text()
    assert 'id="judge-table"' in page and 'id="recommendation"' in page and "Recommended: " in page


def test_remote_storage_is_fetched_and_outputs_put_back(tiny_sweep: Path, tmp_path: Path) -> None:
    remote = tmp_path / "bucket" / "tiny"
    shutil.copytree(tiny_sweep, remote)
    (remote / "report.html").unlink()
    done = run_module(
        "analysis.report",
        f"file://{remote}",
        "eval_prompts=1",
        "prompts=[]",
        "top_k=1",
        env={"QLORA_SWEEPS_CACHE": str(tmp_path / "cache")},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (remote / "report.html").is_file()
    # The copy's folder holds a hash of the URI (one experiment name in two storages), then the name.
    [local] = (tmp_path / "cache" / "experiments").glob("tiny-*/tiny")
    assert (local / "results.parquet").is_file() and not list(local.rglob("optimizer.pt"))


def test_bad_overrides_are_named(tiny_sweep: Path) -> None:
    done = run_module(
        "analysis.report", str(tiny_sweep), "top_k=0", "generation.temperature=-1", "colour=red"
    )
    assert done.returncode == 2
    for key in ("report.top_k", "report.generation.temperature", "report.colour"):
        assert key in done.stderr
    with pytest.raises(ExperimentError, match="rank_by"):
        load_report_settings(load_experiment(tiny_sweep), ["rank_by=[bleu]"])


def test_a_folder_without_results_is_explained(tmp_path: Path) -> None:
    done = run_module("analysis.report", str(tmp_path))
    assert done.returncode == 2 and "no results.parquet" in done.stderr


def test_relocate_keeps_the_longest_tail_that_exists(tmp_path: Path) -> None:
    (tmp_path / "trial_a" / "checkpoint_000001").mkdir(parents=True)
    assert relocate("/other/machine/exp/trial_a/checkpoint_000001", tmp_path) == str(
        tmp_path / "trial_a" / "checkpoint_000001"
    )
    assert relocate("/other/machine/exp/trial_b/checkpoint_000001", tmp_path) is None
    assert relocate(None, tmp_path) is None
