"""One trial run by hand, without Ray, through the same functions a sweep's trials run."""

from __future__ import annotations

import math
import weakref
from pathlib import Path
from typing import Any

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


def test_a_reused_worker_trains_later_trials_on_a_copy_of_the_base_it_kept(
    prepared: PreparedTrial, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Three trials in this process, as Tune runs them in a reused worker: the first loads (and quantizes)
    # the base and keeps an untouched copy; the later ones train copies of it, loading nothing. A trained
    # copy must not leak into the kept base: the third trial, like the first, must draw the same curve.
    import dataclasses

    import torch

    import trainable.train as train
    import trainable.worker as worker
    from trainable.model import build_lora_model, load_base_model

    loads: list[str] = []

    def counting_load(path: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        loads.append(path)
        return load_base_model(path, *args, **kwargs)

    trained: list[weakref.ref[Any]] = []

    def recording_build(*args, **kwargs):  # type: ignore[no-untyped-def]
        model = build_lora_model(*args, **kwargs)
        trained.append(weakref.ref(model))
        return model

    monkeypatch.setattr(worker, "load_base_model", counting_load)
    monkeypatch.setattr(train, "build_lora_model", recording_build)
    monkeypatch.setattr(worker, "WORKER", worker.WorkerProcess(started_at=0.0))
    settings = dataclasses.replace(prepared.settings, reused_worker=True, base_eval_loss=1.0)
    a = {"r": 4, "target_modules": "qv", "learning_rate": 5e-3}
    b = {"r": 8, "target_modules": "all-linear", "learning_rate": 1e-2}
    runs = [
        train_by_hand(hparams, settings, output_dir=tmp_path / str(i)) for i, hparams in enumerate([a, b, a])
    ]

    assert len(loads) == 1
    # Each trial's start freed the trial before it: the process's objects from before its first trial are
    # left out of collections (gc.freeze), the trials' own are not.
    assert len(trained) == 3 and [ref() is None for ref in trained[:2]] == [True, True]
    assert [run[-1]["base_copied"] for run in runs] == [0, 1, 1]
    curves = [[r["eval_loss"] for r in run] for run in runs]
    assert curves[0] != curves[1]
    assert curves[2] == curves[0]  # bit for bit: same seed, same base
    # The kept base is still the loaded model, bit for bit: no LoRA layers, no upcast norms.
    kept = worker.WORKER.base.model.state_dict()
    fresh = load_base_model(settings.model_path, settings.model, device="cpu").state_dict()
    assert kept.keys() == fresh.keys()
    assert all(kept[k].dtype == fresh[k].dtype and torch.equal(kept[k], fresh[k]) for k in fresh)


def test_a_worker_that_runs_one_trial_keeps_no_base(
    prepared: PreparedTrial, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    import trainable.worker as worker

    monkeypatch.setattr(worker, "WORKER", worker.WorkerProcess(started_at=0.0))
    settings = dataclasses.replace(prepared.settings, base_eval_loss=1.0)  # reused_worker off
    reports = train_by_hand({"r": 4}, settings, output_dir=tmp_path)
    assert reports[-1]["base_copied"] == 0 and worker.WORKER.base is None
