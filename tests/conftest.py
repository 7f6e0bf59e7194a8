"""Shared fixtures: a seed for every test, a tiny random Llama on disk, a Ray runtime."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from trainable.outcome import TrialReport
from trainable.schema import SweepSummary, TrialResult
from trainable.settings import Hyperparameters

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def trial_result(trial_id: str, best_eval_loss: float = 1.0, **fields: object) -> TrialResult:
    """A results row for tests of the analysis: a completed trial of the default hyperparameters, with
    `fields` (TrialResult's, or `r`, `learning_rate`, ... for its hyperparameters) set."""
    hparams = {k: fields.pop(k) for k in list(fields) if k in Hyperparameters.__dataclass_fields__}
    values: dict[str, object] = dict(
        trial_id=trial_id,
        status="completed",
        origin="search",
        config_id=trial_id,
        seed=42,
        hparams=Hyperparameters(**hparams),
        best_eval_loss=best_eval_loss,
        final_eval_loss=best_eval_loss,
        eval_history=[best_eval_loss],
        wall_time_s=10.0,
        gpu_seconds=0.0,
        cost_usd=math.nan,
        adapter_path=None,
        trial_path=f"/nowhere/{trial_id}",
        error=None,
        last=TrialReport(step=4),
    )
    values.update(fields)
    return TrialResult(**values)  # type: ignore[arg-type]


def sweep_summary(config: dict[str, object] | None = None, **fields: object) -> SweepSummary:
    """A sweep.json for tests of the analysis: `config` as recorded, the rest made up unless given."""
    values: dict[str, object] = dict(
        config=config or {},
        fingerprint={},
        model_path="",
        chat_template="",
        linear_modules=[],
        data={},
        environment={},
    )
    values.update(fields)
    return SweepSummary(**values)  # type: ignore[arg-type]


def bad_config(tmp_path: Path, tiny_llama: Path) -> Path:
    """A config that runs on the tiny model, for the override under test to break."""
    config = {
        "name": "bad",
        "storage_path": str(tmp_path / "experiments"),
        "model": {"name_or_path": str(tiny_llama)},
        "search": {"initial_points": [], "baselines": []},
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def tiny_sweep(tmp_path: Path, tiny_llama: Path, name: str) -> Path:
    """One trial of two steps on the tiny model (no baselines, no scheduler, no report): the smallest sweep
    that runs end to end, as tmp_path/<name>.yaml."""
    config = {
        "name": name,
        "storage_path": str(tmp_path / "experiments"),
        "model": {"name_or_path": str(tiny_llama), "gradient_checkpointing": False},
        "data": {"max_length": 128, "max_train_examples": 32, "max_eval_examples": 4},
        "train": {"max_steps": 2, "batch_size": 4, "eval_every": 2},
        "search": {
            "num_samples": 1,
            "scheduler": "none",
            "baselines": [],
            "space": {"r": {"choice": [4, 8]}},
        },
        "report": {"enabled": False},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def assert_resumed_from_checkpoints(progress: pd.DataFrame, history: pd.DataFrame, *, max_steps: int) -> None:
    """A trial's progress.csv rows and its history as the analysis reads it (analysis.experiment
    .load_histories), after crashes or driver kills: every restart (a row whose retries went up) began at
    the newest checkpoint the trial had reported, no step was trained twice, and the history has each
    step once, up to max_steps.

    A step may be in progress.csv twice with the same eval loss: the report of a checkpoint that Tune's
    saved state did not hold, sent again by the restarted trial (trainable/train.py's train_trial), where
    the killed driver had already written it to progress.csv."""
    steps, losses = list(progress["step"]), list(progress["eval_loss"])
    retries, restored = list(progress["retries"]), list(progress["restored_from_step"])
    reported: dict[int, float] = {}
    for i, (step, loss) in enumerate(zip(steps, losses, strict=True)):
        if step in reported:
            assert loss == reported[step], (i, steps, losses)  # the same report again, not a step retrained
        else:
            assert step > max(reported, default=0), (i, steps)
        if i > 0 and retries[i] > retries[i - 1]:
            assert restored[i] == max(steps[:i]), (i, steps, restored)
        reported[step] = loss
    assert list(history["step"]) == sorted(set(steps)) and steps[-1] == max_steps, (steps, history)


@pytest.fixture(autouse=True)
def seed() -> int:
    random.seed(0)
    torch.manual_seed(0)
    return 0


def gpu_available() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on a GPU host)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded model's tokenizer alone (converted from GGUF once per machine, then cached)."""
    from transformers import AutoTokenizer

    from trainable.model import resolve_model

    path = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(resolve_model("smollm2")).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, tokenizer_path: Path) -> Path:
    """A 2-layer Llama with random weights and the real tokenizer, saved like a hub checkpoint."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        **TINY,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ray_cpus():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A local S3-compatible server (moto's server mode, on 127.0.0.1 only) with one bucket, `sweeps`.

    Yields the environment that points the AWS SDKs at it (pyarrow's S3FileSystem, and so Ray Tune's
    storage, read AWS_ENDPOINT_URL): give it to the processes that should use it.
    """
    import socket
    import subprocess
    import sys
    import time

    from pyarrow import fs

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",  # moto accepts any credentials
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # no lookups of an instance's role on this machine
    }
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the S3 server did not start; its log: {log}") from None
                time.sleep(0.2)
        s3 = fs.S3FileSystem(
            endpoint_override=endpoint,
            access_key="testing",
            secret_key="testing",
            region="us-east-1",
            allow_bucket_creation=True,
        )
        s3.create_dir("sweeps")
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)
