"""Trial workers reused between trials (search.reuse_workers): through `python -m sweeps.run` on a tiny
random Llama, trials run one after another in one process and train exactly as in a fresh one; and the
driver's rule for where reuse is not safe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from bench.recipes import LLAMA2_VOCAB, SHAPES
from sweeps.config import validate_config
from sweeps.resources import worker_reuse_problem
from trainable.memory import ModelShape, TrialMemory

# A learns faster than B on the tiny model, so ASHA ranks them the same way every time.
A = {"r": 8, "target_modules": "all-linear", "learning_rate": 5e-3}
B = {"r": 4, "target_modules": "qv", "learning_rate": 1e-3}


@pytest.mark.slow
def test_a_reused_worker_runs_trial_after_trial_and_trains_as_a_new_one(
    tmp_path: Path, tiny_llama: Path
) -> None:
    # One trial at a time, B, A, B, A, all in one worker process. ASHA judges each trial at its second of
    # three evaluations against the median of those before it: the first B (alone) and both A's go on, the
    # second B falls below and is stopped there, and the last A takes over the process of that stopped
    # trial. Same seed: every run of a configuration must draw the same eval-loss curve, whatever ran
    # before it in the process (the first B ran in a new one).
    config = {
        "name": "reuse",
        "storage_path": str(tmp_path / "experiments"),
        "experiment": "reuse-test",
        "model": {"name_or_path": str(tiny_llama), "gradient_checkpointing": False},
        "data": {"max_length": 128, "max_train_examples": 64, "max_eval_examples": 8},
        "train": {"max_steps": 6, "batch_size": 4, "eval_every": 2, "warmup_ratio": 0.0},
        "search": {
            "num_samples": 4,
            "cpus_per_trial": 1,
            "max_concurrent_trials": 1,
            "scheduler": "asha",
            "grace_period": 2,
            "reduction_factor": 2,
            "baselines": [],
            "initial_points": [B, A, B, A],
            "space": {
                "r": {"choice": [4, 8]},
                "target_modules": {"choice": ["qv", "all-linear"]},
                "learning_rate": {"loguniform": [1e-3, 1e-2]},
            },
        },
        "report": {"enabled": False},
    }
    path = tmp_path / "reuse.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [sys.executable, "-m", "sweeps.run", "--config", str(path)],
        cwd=tmp_path,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "workers reused between trials" in done.stdout
    table = pd.read_parquet(tmp_path / "experiments" / "reuse-test" / "results.parquet")
    table = table.sort_values("worker_trial").reset_index(drop=True)

    # One process ran the four trials in turn; only the first paid for starting it.
    assert table["worker_pid"].nunique() == 1 and list(table["worker_trial"]) == [1, 2, 3, 4]
    assert table["start_imports_s"].iloc[0] > 0 and (table["start_imports_s"].iloc[1:] == 0).all()
    # The first loaded the base and kept a copy; the others trained copies of it.
    assert list(table["base_copied"]) == [False, True, True, True]
    parts = ["start_imports_s", "start_worker_s", "start_model_s", "start_trainer_s", "start_step_s"]
    assert (table[parts] >= 0).all().all()
    assert (table["startup_s"] - table[parts].sum(axis=1)).abs().max() < 1e-9
    assert list(table["status"]) == ["completed", "completed", "stopped", "completed"]
    assert table["peak_memory_gib"].notna().all()

    # Each configuration's curve is the same in every run, the stopped one's as far as it went.
    curves = [list(history) for history in table["eval_history"]]
    assert [len(c) for c in curves] == [3, 3, 2, 3]
    assert curves[2] == pytest.approx(curves[0][:2], rel=1e-5), (curves[0], curves[2])  # B: new vs reused
    assert curves[3] == pytest.approx(curves[1], rel=1e-5), (curves[1], curves[3])  # A, after a stopped trial
    assert curves[1][-1] < curves[0][-1]  # A learns faster, as the schedule above assumes


SMOLLM2_135M = ModelShape(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    vocab_size=49152,
    tie_word_embeddings=True,
)
LLAMA_7B = ModelShape.from_config(SHAPES["7b"].config(vocab_size=LLAMA2_VOCAB).to_dict())
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def memory_plan(shape: ModelShape, optimizer: str = "paged_adamw_32bit") -> TrialMemory:
    return TrialMemory(
        model=shape,
        linear_modules=LINEAR,
        batch_size=8,
        longest=256,
        largest_batch_tokens=None,
        quantization="nf4",
        double_quant=True,
        compute_dtype="bfloat16",
        gradient_checkpointing=False,
        activation_memory_gib=0.0,
        optimizer=optimizer,
        card_gib=80.0,
        share=1.0,
    )  # type: ignore[arg-type]


def test_reuse_is_off_where_paged_optimizer_states_would_pile_up() -> None:
    """bitsandbytes never frees a paged state (100k elements or more), so a reused GPU worker would keep
    every earlier trial's: the default space's r=64 on a 7B model's MLP (64 x 11008) pages, SmolLM2-135M's
    largest LoRA matrix (64 x 1536) does not."""
    default = validate_config({"name": "x"})
    assert worker_reuse_problem(default, gpus=1, memory=memory_plan(SMOLLM2_135M)) == ""
    assert "never freed" in worker_reuse_problem(default, gpus=1, memory=memory_plan(LLAMA_7B))
    # Smaller ranks page nothing on 7B either: r=4 x 11008 stays under 100k elements.
    small = validate_config({"name": "x", "search": {"space": {"r": {"choice": [4]}}, "baselines": []}})
    assert worker_reuse_problem(small, gpus=1, memory=memory_plan(LLAMA_7B)) == ""
    # torch's AdamW and CPU trials page nothing; without an estimate a paged GPU sweep cannot tell.
    torch_adamw = validate_config({"name": "x", "train": {"optimizer": "adamw_torch"}})
    assert worker_reuse_problem(torch_adamw, gpus=1, memory=None) == ""
    assert worker_reuse_problem(default, gpus=0, memory=None) == ""
    assert "estimate is off" in worker_reuse_problem(default, gpus=1, memory=None)


def test_a_reused_gpu_worker_keeps_a_base_copy_only_where_the_trial_leaves_room_for_it() -> None:
    """The kept base (trainable.worker.KeptBase) sits in the trial's share of the card beside the trial: it
    is kept where the trial's estimate plus the copy's weights fit the share, never without an estimate,
    always on CPU (host memory), and only where Tune may reuse the worker."""
    import dataclasses

    from trainable.memory import estimate_trial_memory
    from trainable.prepare import TrialSettings
    from trainable.settings import Hyperparameters
    from trainable.worker import room_to_keep_base

    hparams = Hyperparameters(r=64, target_modules="all-linear")
    plan = memory_plan(LLAMA_7B)
    estimate = estimate_trial_memory(plan, hparams)
    copy_gib = estimate.base_weights + estimate.dequant_scales + estimate.embeddings
    assert 3 < copy_gib < 5  # a 7B model's 4-bit weights and bf16 embeddings

    def settings(card_gib: float, *, reused: bool = True) -> TrialSettings:
        memory = dataclasses.replace(plan, card_gib=card_gib, share=0.5)
        return TrialSettings(
            model_path="m",
            model=None,
            train=None,
            default_hparams=hparams,  # type: ignore[arg-type]
            train_data={},
            eval_data={},
            gpu_share=0.5,
            memory=memory,
            reused_worker=reused,
        )

    roomy = 2 * (estimate.total_gib + copy_gib) + 0.01  # half of it holds the trial and the copy
    tight = 2 * (estimate.total_gib + copy_gib / 2)  # half of it holds the trial, not the copy
    assert room_to_keep_base(settings(roomy), estimate, device="cuda")
    assert not room_to_keep_base(settings(tight), estimate, device="cuda")
    assert not room_to_keep_base(settings(roomy, reused=False), estimate, device="cuda")
    assert not room_to_keep_base(settings(roomy), None, device="cuda")
    assert room_to_keep_base(settings(roomy), None, device="cpu")
    assert not room_to_keep_base(settings(roomy, reused=False), None, device="cpu")


def test_the_memory_check_estimates_each_costly_value_the_space_allows() -> None:
    """The hyperparameters that cost memory are declared with them (trainable.settings.MEMORY_COSTS); the
    check estimates the largest r, dropout and use_dora the space allows, with each target_modules value."""
    from sweeps.resources import configuration_estimates, largest_estimate
    from trainable.memory import estimate_trial_memory
    from trainable.settings import MEMORY_COSTS, Hyperparameters

    assert MEMORY_COSTS == {
        "r": "largest",
        "target_modules": "each",
        "lora_dropout": "largest",
        "use_dora": "largest",
    }
    plan = memory_plan(LLAMA_7B)
    space = {
        "r": {"choice": [8, 64]},
        "target_modules": {"choice": ["qv", "mlp"]},
        "lora_dropout": {"choice": [0.0, 0.1]},
    }
    plain = configuration_estimates(
        validate_config({"name": "x", "search": {"space": space, "baselines": []}}), plan
    )
    expected = [
        estimate_trial_memory(plan, Hyperparameters(r=64, lora_dropout=0.1, target_modules=t))
        for t in ("qv", "mlp")
    ]
    assert plain == expected
    dora = validate_config(
        {
            "name": "x",
            "search": {
                "space": {**space, "use_dora": {"choice": [False, True]}},
                "baselines": [],
            },
        }
    )
    assert largest_estimate(dora, plan).total_gib > max(e.total_gib for e in plain)  # DoRA costs memory
