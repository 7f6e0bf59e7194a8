"""Planning without Ray: where the study lives, which experiment --resume picks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from sweeps.config import ConfigError, load_config
from sweeps.plan import SweepPlan, find_experiment, study_file
from tests.conftest import sweep_summary
from trainable.prepare import TrialSettings
from trainable.settings import Hyperparameters, ModelSettings, TrainSettings

NO_DATA: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}


def plan_for(storage: str) -> SweepPlan:
    config = load_config("local", [f"storage_path={storage}", "experiment=exp-1"])
    trial = TrialSettings("model", ModelSettings(), TrainSettings(), Hyperparameters(), NO_DATA, NO_DATA)
    return SweepPlan(config, "exp-1", config.storage_uri(), trial, sweep_summary(), points=[])


def test_a_remote_sweeps_study_lives_in_the_configured_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QLORA_SWEEPS_CACHE", str(tmp_path / "cache"))
    remote = study_file(plan_for("s3://bucket/experiments"), resume=False)
    assert remote.parent.parent == tmp_path / "cache" / "studies" and remote.name == "optuna.db"
    assert remote.parent.name.startswith("exp-1-")  # with a hash of the storage: one name in two buckets
    assert study_file(plan_for("s3://other/experiments"), resume=False) != remote
    monkeypatch.delenv("QLORA_SWEEPS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    remote = study_file(plan_for("s3://bucket/experiments"), resume=False)
    assert remote.parent.parent == tmp_path / "xdg" / "qlora-sweeps" / "studies"
    local = plan_for(str(tmp_path / "experiments"))
    assert (
        study_file(local, resume=False) == tmp_path / "experiments" / "exp-1" / "optuna.db"
    )  # beside the results


def test_a_new_remote_sweep_starts_without_a_stale_study(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QLORA_SWEEPS_CACHE", str(tmp_path / "cache"))
    plan = plan_for("s3://bucket/experiments")
    study_file(plan, resume=False).write_bytes(b"an earlier sweep's study")
    assert study_file(plan, resume=True).read_bytes() == b"an earlier sweep's study"  # resumed: kept
    assert not study_file(plan, resume=False).exists()  # a new sweep of the same name: gone


def test_resume_picks_the_newest_experiment_of_the_config(tmp_path: Path) -> None:
    config = load_config("local", [f"storage_path={tmp_path}"])
    with pytest.raises(ConfigError, match="no experiment of config 'local'"):
        find_experiment(config)
    for name in ("local-20261129-090000", "local-20261130-120000", "other-20261201-000000"):
        (tmp_path / name).mkdir()
    assert find_experiment(config) == "local-20261130-120000"
    named = load_config("local", [f"storage_path={tmp_path}", "experiment=local-20261129-090000"])
    assert find_experiment(named) == "local-20261129-090000"


def test_resume_warns_when_the_environment_differs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from analysis.experiment import write_summary
    from sweeps.plan import resume_plan
    from trainable.hardware import describe_environment

    now = describe_environment("auto")
    plan = dataclasses.replace(plan_for(str(tmp_path)), summary=sweep_summary(environment=now))
    write_summary(plan.experiment_uri, plan.summary)
    resume_plan(plan)
    assert "warning" not in capsys.readouterr().out  # the same environment: nothing to say

    other_dtype = "float32" if now["compute_dtype"] == "bfloat16" else "bfloat16"  # whatever this CPU has
    before = {**now, "packages": {**now["packages"], "peft": "0.20.0"}, "compute_dtype": other_dtype}
    write_summary(plan.experiment_uri, sweep_summary(environment=before))
    resume_plan(plan)  # resumed all the same
    said = capsys.readouterr().out
    assert "the environment differs" in said
    assert f"peft: 0.20.0 -> {now['packages']['peft']}" in said
    assert f"compute_dtype: {other_dtype} -> {now['compute_dtype']}" in said
