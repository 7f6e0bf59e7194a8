"""The baselines a sweep has to beat (sweeps/baselines.py), through `python -m sweeps.run` on tiny random
Llamas: they run first and in full (ASHA never stops them), a resumed sweep keeps them, and the calibrated
default's learning rate follows the model's width."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from sweeps.baselines import QLORA_RECIPE, calibrated_learning_rate, calibrated_point

MAX_STEPS = 6


def test_the_calibrated_learning_rate_follows_the_width() -> None:
    """5e-5 x 10 x (2000 / hidden_size) ** 0.781 for Llama-family models (0.0775 for Qwen)."""
    assert calibrated_learning_rate(576) == 1.32e-3  # SmolLM2-135M
    assert calibrated_learning_rate(4096) == 2.86e-4  # Llama-2-7B
    assert calibrated_learning_rate(2000) == 5e-4
    assert calibrated_learning_rate(4096, "qwen2") == 4.73e-4  # Qwen's exponent: nearly flat in the width


def tiny_model(path: Path, tokenizer_path: Path, hidden_size: int) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_the_plan_calibrates_to_each_models_width(tmp_path: Path, tokenizer_path: Path) -> None:
    """Two models of different widths: each plan's calibrated baseline, its learning-rate range and
    sweep.json's record follow that model's width."""
    from sweeps.config import load_config
    from sweeps.plan import plan_sweep

    for hidden_size in (64, 256):
        model = tiny_model(tmp_path / f"llama-{hidden_size}", tokenizer_path, hidden_size)
        overrides = [
            f"model.name_or_path={model}",
            "data.max_train_examples=16",
            "data.max_eval_examples=2",
            "search.num_samples=4",
            "search.baselines=[qlora, calibrated]",
            "search.space.learning_rate.loguniform=[1e-4, calibrated * 10]",
        ]
        plan = plan_sweep(load_config("local", overrides))
        rate = calibrated_learning_rate(hidden_size)
        assert plan.summary.calibrated_learning_rate == rate
        assert [p.values for p in plan.points] == [QLORA_RECIPE, calibrated_point(rate)]
        assert plan.config.search.space["learning_rate"] == {"loguniform": [1e-4, float(f"{rate * 10:.3g}")]}
    assert calibrated_learning_rate(64) > calibrated_learning_rate(256)  # narrower: a larger rate


def test_asha_never_stops_a_baseline() -> None:
    """The scheduler's own decision, fed results by hand as Tune feeds them: the baseline's trial goes on
    with the worst loss at the rung, a later trial of the same values is stopped like any other."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from sweeps.search import ASHAWithBaselines

    scheduler = ASHAWithBaselines(
        baselines=[QLORA_RECIPE],
        time_attr="training_iteration",
        max_t=4,
        grace_period=1,
        reduction_factor=2,
        metric="eval_loss",
        mode="min",
    )
    configs = [QLORA_RECIPE, {**QLORA_RECIPE, "r": 8}, {**QLORA_RECIPE, "r": 16}, dict(QLORA_RECIPE)]
    trials = [Trial("stand-in", config=dict(c), stub=True) for c in configs]
    for trial in trials:
        scheduler.on_trial_add(None, trial)
    decisions = [
        scheduler.on_trial_result(None, trial, {"training_iteration": 1, "eval_loss": loss})
        for trial, loss in zip(trials, [5.0, 1.0, 0.9, 5.0], strict=True)
    ]
    assert decisions == [
        TrialScheduler.CONTINUE,
        TrialScheduler.CONTINUE,
        TrialScheduler.CONTINUE,
        TrialScheduler.STOP,
    ]


def driver(config: Path, *extra: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sweeps.run", "--config", str(config), *extra],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_baselines_run_first_in_full_and_a_resumed_sweep_keeps_them(tmp_path: Path, tiny_llama: Path) -> None:
    """Both baselines, then the searcher's trials, ASHA at its most eager (a rung at every evaluation, half
    stopped): the driver is killed once its first trials have reported and resumed. The baselines are the
    first trials, trained to the last step, named in results.parquet, in the study, and kept as such."""
    rate = calibrated_learning_rate(64)  # the tiny Llama's width
    config = {
        "name": "baselines",
        "storage_path": str(tmp_path / "experiments"),
        "experiment": "baselines",
        "model": {"name_or_path": str(tiny_llama), "gradient_checkpointing": False},
        "data": {"max_length": 128, "max_train_examples": 64, "max_eval_examples": 4},
        "train": {"max_steps": MAX_STEPS, "batch_size": 4, "eval_every": 2, "warmup_ratio": 0.0},
        "search": {
            "num_samples": 5,
            "cpus_per_trial": 1,
            "scheduler": "asha",
            "grace_period": 1,
            "reduction_factor": 2,
            "baselines": ["qlora", "calibrated"],
            "space": {
                "learning_rate": {"loguniform": [1e-4, "calibrated * 10"]},
                "r": {"choice": [8, 32, 64]},
                "lora_alpha": {"choice": [16, 32]},
            },
        },
        "report": {"enabled": False},
    }
    path = tmp_path / "baselines.yaml"
    path.write_text(yaml.safe_dump(config))
    experiment = tmp_path / "experiments" / "baselines"
    process = driver(path, cwd=tmp_path)
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline and not list(experiment.glob("*/progress.csv")):
        time.sleep(0.5)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    resumed = driver(path, "--resume", cwd=tmp_path)
    output, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, output[-4000:]

    table = pd.read_parquet(experiment / "results.parquet")
    assert len(table) == 5 and table["trial_id"].is_unique
    baselines = table[table["origin"] == "baseline"].set_index("baseline")
    assert sorted(baselines.index) == ["calibrated", "qlora"]
    for name, values in (("qlora", QLORA_RECIPE), ("calibrated", calibrated_point(rate))):
        row = baselines.loc[name]
        assert row["status"] == "completed" and row["step"] == MAX_STEPS  # never stopped early
        assert {k: row[k] for k in ("learning_rate", "r", "lora_alpha")} == {
            k: values[k] for k in ("learning_rate", "r", "lora_alpha")
        }
    assert set(table.loc[table["origin"] != "baseline", "origin"]) == {"search"}
    # The baselines were Tune's first two trials: a trial's folder, train_trial_<id>_<number>_..., numbers
    # the trials in the order Tune created them.
    assert sorted(int(Path(p).name.split("_")[3]) for p in baselines["trial_path"]) == [1, 2]
