"""The experiment folder's writes and reads, on a local path and through a storage URI."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from analysis.experiment import (
    REPORT_PAGE,
    RESULTS,
    ExperimentError,
    experiment_names,
    load_experiment,
    load_histories,
    read_file,
    read_summary,
    write_file,
    write_summary,
    write_table,
)
from tests.conftest import sweep_summary, trial_result
from trainable.outcome import TrialReport
from trainable.schema import results_table


@pytest.mark.parametrize("remote", [False, True], ids=["local", "uri"])
def test_writes_are_whole_and_read_back(tmp_path: Path, remote: bool) -> None:
    folder = f"file://{tmp_path}/exp" if remote else str(tmp_path / "exp")
    write_file(folder, "trial_a/checkpoint/adapter.json", b'{"r": 8}')
    summary = sweep_summary({"train": {"max_steps": 4}}, fingerprint={"data": "abc"}, base_eval_loss=1.5)
    write_summary(folder, summary)
    table = pd.DataFrame({"trial_id": ["a", "b"], "best_eval_loss": [1.0, 2.0]})
    write_table(table, folder, RESULTS)
    write_table(table, folder, "leaderboard.csv")
    assert read_file(folder, "trial_a/checkpoint/adapter.json") == b'{"r": 8}'
    assert read_summary(folder) == summary
    assert pd.read_parquet(tmp_path / "exp" / RESULTS).equals(table)
    assert pd.read_csv(tmp_path / "exp" / "leaderboard.csv").equals(table)
    write_file(folder, REPORT_PAGE, b"<html>old</html>")
    write_file(folder, REPORT_PAGE, b"<html>new</html>")  # replaced whole
    assert (tmp_path / "exp" / REPORT_PAGE).read_bytes() == b"<html>new</html>"
    assert not [p for p in (tmp_path / "exp").rglob("*") if ".tmp-" in p.name], "a staging file was left"
    with pytest.raises(FileNotFoundError):
        read_file(folder, "no-such-file")


def test_experiment_names_are_listed_oldest_first(tmp_path: Path) -> None:
    for name in ("local-20261130-120000", "local-20261129-090000", "other-20261201-000000"):
        (tmp_path / name).mkdir()
    (tmp_path / "local-notes.txt").write_text("not a folder")
    assert experiment_names(tmp_path, prefix="local-") == ["local-20261129-090000", "local-20261130-120000"]
    assert experiment_names(tmp_path / "missing", prefix="local-") == []


def test_a_restarted_trials_history_keeps_the_steps_it_trained_again(tmp_path: Path) -> None:
    """Killed after reporting step 6 while Tune's saved state knew only the checkpoint of step 2, the trial
    trained steps 3-6 again: the history is the steps once each, as the run that went on reported them."""
    trial = tmp_path / "exp" / "trial_a"
    trial.mkdir(parents=True)
    reports = [
        TrialReport(eval_loss=2.0, step=2),
        TrialReport(eval_loss=1.5, step=4),
        TrialReport(eval_loss=1.3, step=6),
        TrialReport(eval_loss=1.4, step=4, retries=1, restored_from_step=2),
        TrialReport(eval_loss=1.2, step=6, retries=1, restored_from_step=2),
        TrialReport(eval_loss=1.0, step=8, retries=1, restored_from_step=2),
    ]
    pd.DataFrame([r.to_tune() for r in reports]).to_csv(trial / "progress.csv", index=False)
    write_table(results_table([trial_result("a", trial_path=str(trial))]), tmp_path / "exp", RESULTS)
    write_summary(tmp_path / "exp", sweep_summary())
    history = load_histories(load_experiment(tmp_path / "exp"))
    assert list(history["step"]) == [2, 4, 6, 8]
    assert list(history["eval_loss"]) == [2.0, 1.4, 1.2, 1.0]


def test_an_experiment_whose_results_lack_a_column_is_refused_by_name(tmp_path: Path) -> None:
    folder = tmp_path / "exp"
    write_summary(folder, sweep_summary())
    table = results_table([trial_result("a"), trial_result("b", 0.5)])
    write_table(table.drop(columns=["status"]), folder, RESULTS)
    with pytest.raises(
        ExperimentError, match=r"results\.parquet: no column status; results\.parquet must hold"
    ):
        load_experiment(folder)
    write_table(table, folder, RESULTS)
    assert list(load_experiment(folder).results["trial_id"]) == ["b", "a"]  # ranked: the lower loss first
    (folder / "sweep.json").write_text('{"config": {}}')
    with pytest.raises(ExperimentError, match=r"sweep\.json: no fingerprint, model_path, chat_template"):
        load_experiment(folder)
    (folder / "sweep.json").unlink()
    with pytest.raises(ExperimentError, match=r"no sweep\.json"):
        load_experiment(folder)
