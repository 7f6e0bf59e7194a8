"""Remote storage for real: a sweep with `storage_path: s3://...` against a local S3-compatible server.

One sweep of the tiny random Llama through `python -m sweeps.run`: its driver is killed once the first
trial has ended, and the sweep is resumed with `--resume` as if on another machine (an empty cache). Then
`python -m analysis.report` and `python -m analysis.export` read the experiment from storage. Every
process gets a HOME of its own, so that whatever they write on this machine can be checked.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml

from analysis.experiment import load_experiment, load_histories
from tests.conftest import assert_resumed_from_checkpoints

BUCKET = "sweeps"
STORAGE = f"s3://{BUCKET}/experiments"
EXPERIMENT = "remote"
URI = f"{STORAGE}/{EXPERIMENT}"
ROOT = f"{BUCKET}/experiments/{EXPERIMENT}"  # the experiment's path inside the S3 filesystem


@dataclass(frozen=True)
class RemoteSweep:
    env: dict[str, str]  # the S3 server's environment
    workdir: Path  # every command's working directory
    homes: tuple[Path, ...]  # the HOME of the first driver; of the resumed one, the report and the export
    killed: bool  # the first driver was killed after a trial had ended and before the sweep had
    outputs: dict[str, str]  # each command's output


def s3(env: dict[str, str]):  # pyarrow.fs.S3FileSystem
    from pyarrow import fs

    return fs.S3FileSystem(
        endpoint_override=env["AWS_ENDPOINT_URL"],
        access_key=env["AWS_ACCESS_KEY_ID"],
        secret_key=env["AWS_SECRET_ACCESS_KEY"],
        region=env["AWS_DEFAULT_REGION"],
    )


def stored_files(env: dict[str, str]) -> dict[str, int]:
    """Every file of the experiment in storage: path relative to the experiment -> size."""
    from pyarrow import fs

    infos = s3(env).get_file_info(fs.FileSelector(ROOT, recursive=True, allow_not_found=True))
    return {i.path[len(ROOT) + 1 :]: i.size for i in infos if i.type == fs.FileType.File}


def read_stored(env: dict[str, str], name: str) -> bytes:
    with s3(env).open_input_stream(f"{ROOT}/{name}") as f:
        return bytes(f.read())


def command_env(s3_env: dict[str, str], home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("QLORA_SWEEPS_CACHE", "XDG_CACHE_HOME")}
    return {**env, **s3_env, "HOME": str(home)}


@pytest.fixture(scope="module")
def remote_sweep(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, s3_server: dict[str, str]
) -> RemoteSweep:
    tmp = tmp_path_factory.mktemp("remote")
    workdir, first_home, other_home = tmp / "work", tmp / "home-1", tmp / "home-2"
    for folder in (workdir, first_home, other_home):
        folder.mkdir()
    config = {
        "name": "remote",
        "storage_path": STORAGE,
        "experiment": EXPERIMENT,
        "model": {"name_or_path": str(tiny_llama), "gradient_checkpointing": False},
        "data": {"max_length": 128, "max_train_examples": 32, "max_eval_examples": 4},
        "train": {"max_steps": 4, "batch_size": 4, "eval_every": 2, "warmup_ratio": 0.0},
        "lora": {"target_modules": "qv", "learning_rate": 5.0e-3},
        "search": {
            "num_samples": 2,
            "max_concurrent_trials": 1,  # one after the other: the driver is killed between the two
            "cpus_per_trial": 1,
            "scheduler": "none",
            "baselines": [],
            "space": {"r": {"choice": [4, 8]}},
        },
        "report": {"enabled": False, "top_k": 1, "eval_prompts": 2, "generation": {"max_new_tokens": 4}},
    }
    path = tmp / "remote.yaml"  # outside the working directory, which must stay empty
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "sweeps.run", "--config", str(path)]
    outputs = {}

    # The first driver, killed (with Ray, its process group) once the first trial has ended, which the
    # study in storage shows, and before results.parquet exists.
    first = subprocess.Popen(
        command,
        cwd=workdir,
        env=command_env(s3_server, first_home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    killed = False
    deadline = time.time() + 600
    while first.poll() is None and time.time() < deadline:
        files = stored_files(s3_server)
        if "optuna.db" in files and "results.parquet" not in files:
            os.killpg(first.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.5)
    outputs["first"] = first.communicate(timeout=60)[0]

    resumed = subprocess.run(
        [*command, "--resume"],
        cwd=workdir,
        env=command_env(s3_server, other_home),
        capture_output=True,
        text=True,
        timeout=600,
    )
    outputs["resume"] = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, outputs["resume"][-4000:]
    for name, module in (("report", "analysis.report"), ("export", "analysis.export")):
        done = subprocess.run(
            [sys.executable, "-m", module, URI],
            cwd=workdir,
            env=command_env(s3_server, other_home),
            capture_output=True,
            text=True,
            timeout=600,
        )
        outputs[name] = done.stdout + done.stderr
        assert done.returncode == 0, outputs[name][-4000:]
    return RemoteSweep(s3_server, workdir, (first_home, other_home), killed, outputs)


def test_sweep_writes_results_checkpoints_and_study_to_storage(remote_sweep: RemoteSweep) -> None:
    files = stored_files(remote_sweep.env)
    assert {"sweep.json", "results.parquet", "optuna.db"} <= set(files)
    table = pd.read_parquet(io.BytesIO(read_stored(remote_sweep.env, "results.parquet")))
    assert len(table) == 2 and set(table["status"]) == {"completed"}
    for adapter in table["adapter_path"]:
        # Recorded as URIs, so that any machine with access to the storage finds them.
        assert adapter.startswith(f"{URI}/"), adapter
        assert files[f"{adapter.removeprefix(URI + '/')}/adapter_model.safetensors"] > 0
    assert f"results: {URI}/results.parquet" in remote_sweep.outputs["resume"]


def test_killed_driver_resumes_from_storage(
    remote_sweep: RemoteSweep, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert remote_sweep.killed, (
        "the driver was to be killed mid-sweep:\n" + remote_sweep.outputs["first"][-3000:]
    )
    table = pd.read_parquet(io.BytesIO(read_stored(remote_sweep.env, "results.parquet")))
    assert table["trial_id"].is_unique and set(table["r"]) == {4, 8}
    assert (table["step"] == 4).all()
    for name, value in {**remote_sweep.env, "QLORA_SWEEPS_CACHE": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    histories = load_histories(load_experiment(URI))
    for trial_id, trial_path in zip(table["trial_id"], table["trial_path"], strict=True):
        assert trial_path.startswith(f"{URI}/"), trial_path
        progress = read_stored(remote_sweep.env, f"{trial_path.removeprefix(URI + '/')}/progress.csv")
        history = histories[histories["trial_id"] == trial_id]
        assert_resumed_from_checkpoints(pd.read_csv(io.BytesIO(progress)), history, max_steps=4)


def test_study_is_kept_with_the_results(remote_sweep: RemoteSweep, tmp_path: Path) -> None:
    """The resumed driver had an empty cache: the trial that ended before the kill is in the study only
    if the study was kept in storage as the sweep ran, and taken from there on resuming."""
    import optuna

    db = tmp_path / "optuna.db"
    db.write_bytes(read_stored(remote_sweep.env, "optuna.db"))
    study = optuna.load_study(study_name=EXPERIMENT, storage=f"sqlite:///{db}")
    assert len(study.trials) == 2
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert {t.params["r"] for t in study.trials} == {4, 8}


def test_report_and_export_read_from_storage(remote_sweep: RemoteSweep) -> None:
    files = stored_files(remote_sweep.env)
    assert {"report.html", "leaderboard.parquet", "generations.parquet"} <= set(files)
    board = pd.read_parquet(io.BytesIO(read_stored(remote_sweep.env, "leaderboard.parquet")))
    table = pd.read_parquet(io.BytesIO(read_stored(remote_sweep.env, "results.parquet")))
    assert set(board["candidate"]) >= {"base", str(table.iloc[0]["trial_id"])}
    exported = [name for name in files if name.startswith("export/")]
    winner = str(board[board["rank"] == 1].iloc[0]["candidate"])
    assert f"export/{winner}/adapter_model.safetensors" in exported, exported
    assert f"export/{winner}/README.md" in exported
    assert f"{URI}/export/{winner}" in remote_sweep.outputs["export"]


def test_nothing_of_the_experiment_reaches_the_local_disk(remote_sweep: RemoteSweep) -> None:
    """The working directory stays empty; in HOME only caches (ours, the hub's) and Ray's session token."""
    assert not list(remote_sweep.workdir.iterdir())
    for home in remote_sweep.homes:
        written = [p.relative_to(home) for p in home.rglob("*") if p.is_file()]
        assert all(p.parts[0] in (".cache", ".ray") for p in written), written
