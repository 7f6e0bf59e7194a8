"""Seed re-checks and the once-per-sweep base eval, end to end through `python -m sweeps.run` on a tiny
random Llama: a driver killed when the search has finished and the re-checks have not started is resumed."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from analysis.experiment import RECHECKS, holds_run_state
from sweeps.config import ConfigError, load_config
from sweeps.recheck import RECHECK_OF, build_recheck_tuner
from trainable.outcome import METRIC, SEED_KEY
from trainable.settings import HYPERPARAMETERS

SPACE_KEYS = ("r", "lora_alpha", "learning_rate")
TRAIN = {"max_steps": 4, "batch_size": 4, "eval_every": 2, "warmup_ratio": 0.0}
DATA = {"max_length": 128, "max_train_examples": 64, "max_eval_examples": 6}


def write_config(tmp_path: Path, model: Path) -> Path:
    config = {
        "name": "recheck",
        "storage_path": str(tmp_path / "experiments"),
        "experiment": "recheck-test",
        "model": {"name_or_path": str(model), "gradient_checkpointing": False},
        "data": DATA,
        "train": TRAIN,
        "lora": {"target_modules": "qv"},
        "search": {
            "num_samples": 2,
            "recheck_top": 1,
            "recheck_seeds": 2,
            "cpus_per_trial": 1,
            "scheduler": "none",
            "baselines": [],
            "space": {
                "r": {"choice": [4, 8]},
                "lora_alpha": {"choice": [8, 16]},
                "learning_rate": {"loguniform": [1e-3, 1e-2]},
            },
        },
        "report": {"enabled": False},
    }
    path = tmp_path / "recheck.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def driver(config: Path, *extra: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sweeps.run", "--config", str(config), *extra],
        cwd=cwd,
        # A Ray instance of its own: the machine may run other sweeps, whose clusters come and go.
        env={**os.environ, "RAY_ADDRESS": "local"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: killing it takes Ray's processes along
    )


@pytest.fixture(scope="module")
def resumed_sweep(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> dict[str, object]:
    """The sweep killed as the re-checks are about to start, then resumed to the end."""
    tmp = tmp_path_factory.mktemp("recheck")
    config = write_config(tmp, tiny_llama)
    experiment = tmp / "experiments" / "recheck-test"
    first = driver(config, cwd=tmp)
    assert first.stdout is not None
    output = []
    for line in first.stdout:
        output.append(line)
        if line.startswith("rechecks:"):
            os.killpg(first.pid, signal.SIGKILL)
            break
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL, "".join(output)[-4000:]
    after_kill = pd.read_parquet(experiment / "results.parquet")
    rechecks_ran_before_kill = holds_run_state(experiment / RECHECKS)
    second = driver(config, "--resume", cwd=tmp)
    resumed, _ = second.communicate(timeout=900)
    assert second.returncode == 0, resumed[-4000:]
    return {
        "experiment": experiment,
        "first_output": "".join(output),
        "resumed_output": resumed,
        "after_kill": after_kill,
        "rechecks_ran_before_kill": rechecks_ran_before_kill,
        "table": pd.read_parquet(experiment / "results.parquet"),
    }


def test_search_results_are_written_before_the_rechecks(resumed_sweep: dict) -> None:
    after_kill = resumed_sweep["after_kill"]
    assert len(after_kill) == 2 and set(after_kill["origin"]) == {"search"}
    # Killed before the re-checks ran. The kill may land before or just after their Tuner was made
    # (tuner.pkl written): either way the resumed sweep has to run them all (the test below and the next).
    assert not resumed_sweep["rechecks_ran_before_kill"]


def test_a_search_made_but_never_run_starts_anew_on_resume(
    tmp_path: Path, tiny_llama: Path, ray_cpus: None
) -> None:
    """The same for the search's own Tuner: killed before Tune first saved the run state, `--resume`
    starts the search instead of failing to restore it."""
    from sweeps.plan import plan_sweep
    from sweeps.resources import plan_resources
    from sweeps.search import build_tuner

    plan = plan_sweep(load_config(str(write_config(tmp_path, tiny_llama))))
    resources = plan_resources(plan, {"CPU": 2.0})

    def trainable(config: dict) -> dict:
        return {METRIC: config["learning_rate"], "step": TRAIN["max_steps"]}

    build_tuner(plan, trainable, resources)  # made, never run
    assert not holds_run_state(plan.experiment_uri)
    grid = build_tuner(plan, trainable, resources, resume=True).fit()
    assert grid.num_errors == 0 and len(grid) == 2
    assert holds_run_state(plan.experiment_uri)


def test_rechecks_made_but_never_run_start_anew_on_resume(tmp_path: Path, ray_cpus: None) -> None:
    """A driver killed between making the re-checks' Tuner and Tune's first save of their run state
    leaves a `rechecks/` folder with tuner.pkl only; resuming from it failed. The resumed sweep starts them."""
    points = [{"r": 4, SEED_KEY: seed, RECHECK_OF: "t0"} for seed in (43, 44)]

    def trainable(config: dict) -> dict:
        return {METRIC: float(config[SEED_KEY])}

    def tuner(resume: bool):
        return build_recheck_tuner(
            points,
            trainable=trainable,
            experiment_uri=str(tmp_path),
            concurrency=1,
            reuse_workers=False,
            callbacks=[],
            max_failures=0,
            resume=resume,
            verbosity=0,
        )

    tuner(resume=False)  # made, never run
    assert (tmp_path / RECHECKS / "tuner.pkl").exists() and not holds_run_state(tmp_path / RECHECKS)
    grid = tuner(resume=True).fit()
    assert grid.num_errors == 0
    assert sorted(result.metrics[METRIC] for result in grid) == [43.0, 44.0]
    assert holds_run_state(tmp_path / RECHECKS)  # and, had this run been killed, the next resume restores it


def test_rechecks_train_the_best_configuration_with_new_seeds(resumed_sweep: dict) -> None:
    table = resumed_sweep["table"]
    assert len(table) == 4 and set(table["status"]) == {"completed"}
    search, rechecks = table[table["origin"] == "search"], table[table["origin"] == "recheck"]
    assert len(search) == 2 and len(rechecks) == 2
    best = search.sort_values("best_eval_loss").iloc[0]
    assert set(search["seed"]) == {42} and sorted(rechecks["seed"]) == [43, 44]  # train.seed + 1, + 2
    for row in rechecks.itertuples():
        assert {k: getattr(row, k) for k in HYPERPARAMETERS} == {k: best[k] for k in HYPERPARAMETERS}
        assert row.config_id == best["trial_id"] and row.step == TRAIN["max_steps"]
    assert list(search["config_id"]) == list(search["trial_id"])
    # New seeds train differently: three runs of one configuration, three different eval curves.
    curves = {tuple(h) for h in table[table["config_id"] == best["trial_id"]]["eval_history"]}
    assert len(curves) == 3


def test_base_eval_runs_once_on_the_plain_quantized_base(resumed_sweep: dict, tiny_llama: Path) -> None:
    experiment, table = resumed_sweep["experiment"], resumed_sweep["table"]
    summary = json.loads((experiment / "sweep.json").read_text())
    measured = summary["base_eval_loss"]
    assert resumed_sweep["first_output"].count("base model: eval loss") == 1
    assert "base model: eval loss" not in resumed_sweep["resumed_output"]  # the resumed sweep reused it
    assert set(table["base_eval_loss"]) == {measured}
    assert measured == pytest.approx(reference_base_eval_loss(tiny_llama), rel=1e-4)
    # No trial evaluated anything before its first step: at every report, one eval pass per report so far.
    for path in table["trial_path"]:
        progress = pd.read_csv(Path(path) / "progress.csv")
        assert list(progress["evaluations"]) == list(progress["step"] // TRAIN["eval_every"])


def reference_base_eval_loss(model_path: Path) -> float:
    """The base model's eval loss computed here, independently of the driver: the adapter-free 4-bit model,
    each eval example's token cross-entropy on its answer tokens, averaged per batch like the trainer."""
    from trainable.model import load_base_model
    from trainable.prepare import prepare_trial
    from trainable.settings import DataSettings, ModelSettings, TrainSettings

    model_settings = ModelSettings(name_or_path=str(model_path), gradient_checkpointing=False)
    trial = prepare_trial(model=model_settings, data=DataSettings(**DATA), train=TrainSettings(**TRAIN))
    model = load_base_model(trial.settings.model_path, model_settings, device="cpu").eval()
    assert not any("lora" in name for name, _ in model.named_modules())
    ids, labels = trial.settings.eval_data["input_ids"], trial.settings.eval_data["labels"]
    batch_means = []
    with torch.no_grad():
        for start in range(0, len(ids), TRAIN["batch_size"]):
            total, count = 0.0, 0
            for x, y in zip(
                ids[start : start + TRAIN["batch_size"]],
                labels[start : start + TRAIN["batch_size"]],
                strict=True,
            ):
                logits = model(input_ids=torch.tensor([x])).logits[0, :-1].float()
                target = torch.tensor(y[1:])
                keep = target != -100
                total += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
                count += int(keep.sum())
            batch_means.append((total / count, len(ids[start : start + TRAIN["batch_size"]])))
    loss = sum(m * n for m, n in batch_means) / sum(n for _, n in batch_means)
    assert math.isfinite(loss)
    return loss


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["search.recheck_top=1"], "search.recheck_top=1, search.recheck_seeds=0"),
        (["search.recheck_seeds=2"], "search.recheck_top=0, search.recheck_seeds=2"),
        (["search.recheck_top=3", "search.recheck_seeds=1", "search.num_samples=2"], "search.recheck_top: 3"),
        (["search.recheck_top=-1"], "search.recheck_top"),
    ],
)
def test_bad_recheck_settings_are_refused(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("local", overrides)
    assert expected in str(err.value)


def test_rechecks_count_against_the_budget() -> None:
    """With search.budget_gpu_hours, a configuration is re-checked only when all its seeds, each costed at
    its own trial's GPU-seconds, fit in what the search left; a dearer one is skipped, a cheaper one not."""
    from sweeps.recheck import plan_rechecks

    config = load_config(
        "local",
        [
            "search.num_samples=3",
            "search.recheck_top=2",
            "search.recheck_seeds=2",
            "search.budget_gpu_hours=1",
        ],
    )
    searched = {k: v for k, v in config.lora.__dict__.items() if k in config.search.space}
    table = pd.DataFrame(
        [
            # GPU-seconds 1,000 / 400 / 100: 1,500 spent, 2,100 of the hour's 3,600 left.
            {
                "trial_id": "a",
                "status": "completed",
                "best_eval_loss": 0.5,
                "wall_time_s": 2000.0,
                "gpu_share": 0.5,
            },
            {
                "trial_id": "b",
                "status": "completed",
                "best_eval_loss": 0.6,
                "wall_time_s": 400.0,
                "gpu_share": 1.0,
            },
            {
                "trial_id": "c",
                "status": "completed",
                "best_eval_loss": 0.7,
                "wall_time_s": 100.0,
                "gpu_share": 1.0,
            },
        ]
    )
    for i, key in enumerate(searched):
        table[key] = [f"{key}-{row}" for row in range(3)] if i == 0 else searched[key]
    points = plan_rechecks(table, config)
    # a's two seeds cost 2 x 1,000 = 2,000 of the 2,100 left; then b's 2 x 400 does not fit in the 100 left.
    assert [p["recheck_of"] for p in points] == ["a", "a"]
    # a dearer: 2,500 spent, 1,100 left; a's seeds (2 x 2,000) do not fit, b's (2 x 400) do.
    dearer = table.assign(wall_time_s=[4000.0, 400.0, 100.0])
    points = plan_rechecks(dearer, config)
    assert [p["recheck_of"] for p in points] == ["b", "b"]
    unlimited = load_config(
        "local", ["search.num_samples=3", "search.recheck_top=2", "search.recheck_seeds=2"]
    )
    assert [p["recheck_of"] for p in plan_rechecks(table, unlimited)] == ["a", "a", "b", "b"]
