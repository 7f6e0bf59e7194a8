"""The trial-to-driver contract: reports through Tune's dict and back, and the one status rule."""

from __future__ import annotations

import dataclasses
import math

import pytest

from trainable.outcome import METRIC, RANKABLE_STATUSES, STATUSES, TRAIN_LOSS, TrialReport, trial_status

FULL = TrialReport(
    eval_loss=1.25,
    train_loss=1.5,
    grad_norm=0.75,
    step=8,
    tokens=4096,
    tokens_per_s=512.0,
    peak_memory_gib=3.5,
    cuda_visible_devices="1",
    visible_gpus=1,
    base_eval_loss=2.0,
    retries=1,
    restored_from_step=4,
    oom=False,
    diverged=True,
    node_id="abc123",
    gpu_ids="1",
    started_at=1700000000.5,
    worker_pid=4242,
    worker_trial=2,
    start_imports_s=0.0,
    start_worker_s=0.25,
    start_model_s=1.5,
    start_trainer_s=0.75,
    start_step_s=2.0,
    estimated_memory_gib=12.5,
    skipped_oom=False,
    gpu_share=0.5,
)


def test_report_survives_tune_and_back() -> None:
    metrics = FULL.to_tune()
    assert metrics[METRIC] == 1.25  # the key Tune's scheduler and checkpoints are told to read
    assert metrics[TRAIN_LOSS] == FULL.train_loss
    assert metrics["diverged"] == 1 and type(metrics["diverged"]) is int  # progress.csv holds numbers
    # Tune adds its own keys to every result; they are not part of the report.
    assert TrialReport.from_tune({**metrics, "training_iteration": 4, "trial_id": "x"}) == FULL


def test_every_field_reaches_tune() -> None:
    assert set(FULL.to_tune()) == {f.name for f in dataclasses.fields(TrialReport)}


def test_startup_is_the_sum_of_its_parts_and_unknown_without_a_first_step() -> None:
    assert FULL.startup_s == 4.5
    assert math.isnan(dataclasses.replace(FULL, start_step_s=math.nan).startup_s)


def test_missing_and_empty_values_take_the_defaults() -> None:
    # An out-of-memory report knows little; a progress.csv row reads missing text as NaN.
    report = TrialReport.from_tune(
        {METRIC: math.nan, "oom": 1, "retries": 2, "node_id": math.nan, "step": 6.0}
    )
    assert report.oom is True and report.retries == 2 and report.step == 6 and type(report.step) is int
    assert report.node_id == "" and math.isnan(report.eval_loss) and report.diverged is False
    assert TrialReport.from_tune({}) == TrialReport()


@pytest.mark.parametrize(
    ("last", "errored", "best", "expected"),
    [
        (TrialReport(eval_loss=1.0, step=8), False, 1.0, "completed"),
        (TrialReport(eval_loss=1.0, step=12), False, 0.9, "completed"),
        (TrialReport(eval_loss=1.0, step=4), False, 1.0, "stopped"),
        (TrialReport(oom=True), False, math.nan, "oom"),
        (TrialReport(oom=True, step=6), False, 1.0, "oom"),  # finite losses before running out
        (TrialReport(eval_loss=math.nan, step=6, diverged=True), False, 1.0, "failed"),
        (TrialReport(eval_loss=1.0, step=8), False, math.inf, "failed"),
        (TrialReport(), False, math.nan, "failed"),  # never reported
        (TrialReport(eval_loss=1.0, step=4), True, 1.0, "error"),  # crashed, out of retries
        (TrialReport(oom=True), True, math.nan, "error"),
        # Never started: its infinite loss is for the searcher; the skip comes before any other reading.
        (TrialReport(eval_loss=math.inf, skipped_oom=True), False, math.nan, "skipped_oom"),
    ],
)
def test_status_rule(last: TrialReport, errored: bool, best: float, expected: str) -> None:
    assert trial_status(last, errored=errored, best_eval_loss=best, max_steps=8) == expected


def test_rankable_statuses_are_statuses() -> None:
    assert set(RANKABLE_STATUSES) == {"completed", "stopped"} and set(RANKABLE_STATUSES) < set(STATUSES)
