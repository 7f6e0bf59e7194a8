"""End to end through the real entry point: `python -m sweeps.run` on a tiny random Llama."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from trainable.settings import HYPERPARAMETERS

FIRST = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "learning_rate": 5e-3}


def tiny_sweep_config(tmp_path: Path, model: Path, **search: object) -> Path:
    config = {
        "name": "tiny",
        "storage_path": str(tmp_path / "experiments"),
        "experiment": "tiny-test",
        "model": {"name_or_path": str(model), "gradient_checkpointing": False},
        "data": {"max_length": 128, "max_train_examples": 96, "max_eval_examples": 8},
        "train": {"max_steps": 8, "batch_size": 4, "eval_every": 2, "warmup_ratio": 0.0},
        "search": {
            "num_samples": 3,
            "cpus_per_trial": 1,
            "scheduler": "none",
            "baselines": [],
            "initial_points": [FIRST],
            "space": {
                "r": {"choice": [4, 8]},
                "lora_alpha": {"choice": [8, 16]},
                "target_modules": {"choice": ["qv", "all-linear"]},
                "learning_rate": {"loguniform": [1e-3, 1e-2]},
            },
            **search,
        },
        "report": {"enabled": False},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


CANARY = "hf_canary_5bd1e0a7c3"  # a fake secret in the environment that must never be written anywhere


def run_driver(*args: str, cwd: Path, **environ: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_TOKEN": CANARY, "WANDB_API_KEY": CANARY, **environ}
    return subprocess.run(
        [sys.executable, "-m", "sweeps.run", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def unused_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"  # closed again: nothing answers there


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> tuple[Path, str]:
    """The sweep on a machine where `ray start` once recorded a cluster that has since gone (a killed head,
    a crashed test): Ray's own ray.init() would wait five minutes on it, then fail."""
    tmp = tmp_path_factory.mktemp("sweep")
    # Short: Ray's socket paths under RAY_TMPDIR must stay within the 107-byte limit of a Unix socket's name.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(unused_address())
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("RAY_ADDRESS", raising=False)
        done = run_driver(
            "--config", str(tiny_sweep_config(tmp, tiny_llama)), cwd=tmp, RAY_TMPDIR=str(ray_tmp)
        )
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return tmp / "experiments" / "tiny-test", done.stdout + done.stderr


def test_a_recorded_cluster_that_is_gone_gives_a_local_ray(tiny_sweep: tuple[Path, str]) -> None:
    assert "does not answer; starting a local Ray instead" in tiny_sweep[1]


def test_a_recorded_cluster_that_answers_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sweeps.cluster import ray_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    (tmp_path / "ray").mkdir()
    assert ray_address() is None  # nothing recorded: Ray starts its own
    with socket.socket() as head:
        head.bind(("127.0.0.1", 0))
        head.listen()
        (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{head.getsockname()[1]}")
        assert ray_address() is None  # Ray connects to it
    assert ray_address() == "local"  # closed: gone
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert ray_address() is None  # the user's choice, left to Ray


def test_results_table_has_every_trial_with_config_and_metrics(tiny_sweep: tuple[Path, str]) -> None:
    experiment, stdout = tiny_sweep
    table = pd.read_parquet(experiment / "results.parquet")
    assert len(table) == 3 and set(table["status"]) == {"completed"}
    assert set(HYPERPARAMETERS) <= set(table.columns)
    for column in ("best_eval_loss", "final_eval_loss", "base_eval_loss", "tokens_per_s", "wall_time_s"):
        assert table[column].notna().all(), column
    assert (table["step"] == 8).all() and (table["tokens"] > 0).all()
    assert list(table["rank"]) == [1, 2, 3]
    assert table["best_eval_loss"].is_monotonic_increasing
    assert (table["best_eval_loss"] < table["base_eval_loss"]).all()
    assert str(experiment / "results.parquet") in stdout


def test_learning_continues_after_every_evaluation(tiny_sweep: tuple[Path, str]) -> None:
    """With frozen LoRA gradients after an eval pass, eval loss would stop moving after the first one."""
    table = pd.read_parquet(tiny_sweep[0] / "results.parquet")
    first = table[(table["learning_rate"] == FIRST["learning_rate"]) & (table["r"] == FIRST["r"])].iloc[0]
    history = list(first["eval_history"])
    assert len(history) == 4
    assert all(later < earlier for earlier, later in itertools.pairwise(history)), history
    assert first["base_eval_loss"] > history[0]


def test_console_shows_one_line_per_evaluation_and_no_library_noise(tiny_sweep: tuple[Path, str]) -> None:
    experiment, output = tiny_sweep
    table = pd.read_parquet(experiment / "results.parquet")
    # Every evaluation of every trial, once: steps 2, 4, 6 and 8, the last one too.
    found = re.findall(r"trial (\w+): step (\d+)/8, eval_loss ([\d.]+) \(base [\d.]+\)", output)
    steps: dict[str, list[int]] = {}
    for trial, step, _ in found:
        steps.setdefault(trial, []).append(int(step))
    assert steps == {trial: [2, 4, 6, 8] for trial in table["trial_id"]}, found
    for noise in (
        "Loading weights",
        "FutureWarning",
        "{'eval_loss'",
        "Checkpoint successfully created",
        "Failed to load CPU gemm_4bit_forward",
        "SystemExit",
    ):
        assert noise not in output, noise
    environment = json.loads((experiment / "sweep.json").read_text())["environment"]
    assert environment["packages"]["torch"] and environment["compute_dtype"] in ("float32", "bfloat16")
    # Tune's progress table carries the trial's progress, not only its hyperparameters.
    assert re.search(r"eval_loss\s+train_loss\s+step\s+tokens_per_s", output)


def test_console_says_where_the_drivers_start_went(tiny_sweep: tuple[Path, str]) -> None:
    """One line before the first trial: each part of the driver's start, in the order spent, adding up to
    the total; the base model's eval part holds the eval the driver timed on its own."""
    _, output = tiny_sweep
    line = re.search(r"driver ready in (\d+) s: (.+)", output)
    assert line, output[-3000:]
    parts = re.findall(r"([A-Za-z][A-Za-z ]*?) ([\d.]+) s", line[2])
    assert [name for name, _ in parts] == [
        "imports",
        "plan",
        "Ray",
        "resources",
        "base model eval",
        "searcher and Tune",
    ]
    seconds = {name: float(value) for name, value in parts}
    assert abs(sum(seconds.values()) - int(line[1])) <= 1
    assert seconds["imports"] > 0.5 and seconds["Ray"] > 0.5  # torch and Ray take seconds to load and start
    base_eval = float(re.search(r"measured once for the sweep, (\d+) s", output)[1])
    assert seconds["base model eval"] >= base_eval - 0.5
    assert output.index("driver ready in") < re.search(r"trial \w+: step", output).start()


def test_the_driver_imports_no_training_library() -> None:
    # The driver (and the worker that measures the base model, which unpickles its function from
    # sweeps.run) plans, tokenizes and loads the base: peft and trl are for the trials. Importing them cost
    # the driver's start about 4 s of 16 on a GPU host (docs/cost.md#the-drivers-start).
    code = "import sys, sweeps.run, sweeps.resources; print(sorted(m for m in ('peft', 'trl') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_adapters_load_with_peft_on_their_targets(tiny_sweep: tuple[Path, str], tiny_llama: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    table = pd.read_parquet(tiny_sweep[0] / "results.parquet")
    for row in table.itertuples():
        base = AutoModelForCausalLM.from_pretrained(tiny_llama)
        model = PeftModel.from_pretrained(base, row.adapter_path)
        adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
        expected = (
            {"q_proj", "v_proj"}
            if row.target_modules == "qv"
            else {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        )
        assert adapted == expected
        assert model.peft_config["default"].r == row.r


def test_optuna_study_holds_every_trial(tiny_sweep: tuple[Path, str]) -> None:
    import optuna

    study = optuna.load_study(study_name="tiny-test", storage=f"sqlite:///{tiny_sweep[0] / 'optuna.db'}")
    assert len(study.trials) == 3
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    first = {k: v for k, v in FIRST.items() if k != "learning_rate"}
    assert any(first.items() <= t.params.items() for t in study.trials)  # the initial point ran


def test_bad_config_fails_before_ray_starts(
    tmp_path: Path, tiny_llama: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray

    from sweeps.run import main

    config = tiny_sweep_config(tmp_path, tiny_llama)
    assert main(["--config", str(config), "lora.target_modules=qkv_proj"]) == 2
    stderr = capsys.readouterr().err
    assert "lora.target_modules" in stderr and "qkv_proj" in stderr and "down_proj" in stderr
    assert not ray.is_initialized() and not (tmp_path / "experiments").exists()


def test_no_secret_from_the_environment_is_written(tiny_sweep: tuple[Path, str]) -> None:
    experiment, output = tiny_sweep
    assert CANARY not in output
    files = [p for p in experiment.rglob("*") if p.is_file()]
    ray_logs = [p for p in Path("/tmp/ray/session_latest/logs").glob("*") if p.is_file()]
    assert files
    for path in files + ray_logs:
        assert CANARY.encode() not in path.read_bytes(), path


@pytest.mark.parametrize(
    ("override", "part"),
    [
        ("data.max_train_examples=50", "data"),
        ("search.space.r.choice=[8, 16]", "search space"),
        ("model.quantization=none", "model"),
    ],
)
def test_resume_refuses_a_changed_sweep(
    tiny_sweep: tuple[Path, str],
    override: str,
    part: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sweeps.run import main  # in this process: the refusal comes before Ray, and a new driver costs 10 s

    experiment = tiny_sweep[0]
    monkeypatch.chdir(experiment.parent.parent)
    assert main(["--config", "tiny.yaml", "--resume", override]) == 2
    stderr = capsys.readouterr().err
    assert f"the {part} differ" in stderr and str(experiment) in stderr
