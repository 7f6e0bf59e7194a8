"""One trial run by hand, without Ray, through the same functions a sweep's trials run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from trainable.faults import Fault, parse_faults
from trainable.prepare import PreparedTrial, prepare_trial
from trainable.settings import DataSettings, ModelSettings, TrainSettings
from trainable.train import train_by_hand


@pytest.fixture(scope="module")
def prepared(tiny_llama: Path) -> PreparedTrial:
    return prepare_trial(
        model=ModelSettings(name_or_path=str(tiny_llama), gradient_checkpointing=False),
        data=DataSettings(max_length=128, max_train_examples=48, max_eval_examples=4),
        train=TrainSettings(max_steps=4, eval_every=2, batch_size=4, warmup_ratio=0.0),
    )


def test_prepare_counts_what_it_tokenized(prepared: PreparedTrial) -> None:
    settings = prepared.settings
    assert prepared.data["train_examples"] == len(settings.train_data["input_ids"]) == 48
    assert prepared.data["eval_examples"] == len(settings.eval_data["input_ids"]) == 4
    assert settings.faults == ()  # a trial injects nothing unless the driver was given faults


def test_a_trial_trained_by_hand_reports_and_keeps_its_adapters(
    prepared: PreparedTrial, tmp_path: Path
) -> None:
    import ray
    from peft import PeftConfig

    reports = train_by_hand(
        {"r": 4, "target_modules": "qv", "learning_rate": 5e-3}, prepared.settings, output_dir=tmp_path
    )
    assert not ray.is_initialized()
    assert [r["step"] for r in reports] == [2, 4]
    losses = [r["eval_loss"] for r in reports]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < reports[0]["base_eval_loss"]
    for report in reports:
        adapter = PeftConfig.from_pretrained(report["checkpoint"])
        assert adapter.r == 4 and set(adapter.target_modules) == {"q_proj", "v_proj"}


def test_faults_travel_in_the_trial_settings(prepared: PreparedTrial, tmp_path: Path) -> None:
    import dataclasses

    faults = parse_faults("nan@1:r=4; oom@1:r=64")
    assert faults == (Fault("nan", 1, (("r", "4"),)), Fault("oom", 1, (("r", "64"),)))
    settings = dataclasses.replace(prepared.settings, faults=faults)
    reports = train_by_hand({"r": 4}, settings, output_dir=tmp_path)
    assert reports[-1]["diverged"] == 1 and math.isnan(reports[-1]["eval_loss"])
    assert all(r["checkpoint"] is None for r in reports)  # no checkpoint of NaN weights


@pytest.mark.parametrize("spec", ["boom@2", "kill@two", "nan@3:r"])
def test_a_bad_fault_spec_names_the_entry(spec: str) -> None:
    with pytest.raises(ValueError, match="QLORA_SWEEPS_FAULTS: bad entry"):
        parse_faults(spec)
