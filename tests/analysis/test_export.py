"""Export: the adapter folder loads with peft and computes what the trial's checkpoint computes; the merged
model computes what base + adapter compute."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from analysis.experiment import load_experiment
from analysis.export import choose_trial, export_trial, main
from trainable.model import load_base_model

TOKENS = torch.tensor([[1, 42, 314, 2718, 99, 7]])


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=TOKENS).logits.float()


def test_default_is_the_leaderboards_first(tiny_sweep: Path) -> None:
    board = pd.read_parquet(tiny_sweep / "leaderboard.parquet")
    row, why = choose_trial(load_experiment(tiny_sweep))
    assert row["trial_id"] == board.loc[board["rank"] == 1, "candidate"].item()
    assert "leaderboard" in why


def test_unknown_trial_lists_the_trials(tiny_sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tiny_sweep), "--trial", "nope"]) == 2
    assert "matches 0 trials" in capsys.readouterr().err


def strengthen(adapter: Path, largest: float) -> None:
    """Scale an adapter's B matrices until their largest entry is `largest`: four tiny training steps (at a
    learning rate as low as the space's 2e-5) move the logits less than bf16 rounding does, too little to
    tell a merge that worked from one that did nothing."""
    from safetensors.torch import load_file, save_file

    path = adapter / "adapter_model.safetensors"
    weights = load_file(path)
    top = max(float(v.abs().max()) for k, v in weights.items() if "lora_B" in k)
    assert top > 0, "the adapter's B matrices never moved from their zero start"
    save_file({k: v * (largest / top) if "lora_B" in k else v for k, v in weights.items()}, path)


def test_exported_adapter_and_merged_model_compute_like_the_trial(tiny_sweep: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    copy = tmp_path / "tiny"
    shutil.copytree(tiny_sweep, copy)
    experiment = load_experiment(copy)
    row = experiment.results.sort_values("best_eval_loss").iloc[-1]  # not the default choice: --trial works
    strengthen(Path(row["adapter_path"]), largest=0.5)
    out = Path(export_trial(copy, trial=str(row["trial_id"])[:6], out=tmp_path / "export", merge=True))
    assert (out / "adapter_model.safetensors").is_file() and not (out / "optimizer.pt").exists()
    card = (out / "README.md").read_text()
    assert str(row["trial_id"]) in card and "learning_rate" in card and "best eval loss" in card
    assert "exact_match (base)" in card

    model_path = experiment.summary.model_path
    settings = experiment.model_settings
    from_checkpoint = PeftModel.from_pretrained(
        load_base_model(model_path, settings, device="cpu"), row["adapter_path"]
    )
    exported = PeftModel.from_pretrained(load_base_model(model_path, settings, device="cpu"), str(out))
    expected = logits(from_checkpoint.eval())
    assert torch.equal(logits(exported.eval()), expected)
    base = logits(load_base_model(model_path, settings, device="cpu").eval())
    effect = (expected - base).abs().max()
    assert effect > 0.1  # the adapter changes the output

    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.bfloat16).eval()
    assert not any("4bit" in type(m).__name__ for m in merged.modules())
    assert json.loads((out / "merged" / "merge.json").read_text())["merged_into"] == "dequantized"
    # bf16 merged weights against the 4-bit base + LoRA: equal up to bf16 rounding, far below the effect.
    assert (logits(merged) - expected).abs().max() < 0.1 * effect
