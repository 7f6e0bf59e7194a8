"""rsLoRA, DoRA and LoRA+ (Hyperparameters.use_rslora, use_dora, loraplus_lr_ratio) on the tiny Llama,
4-bit NF4 as a sweep's trials are: built through build_lora_model / setup_trial, trained by hand."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from bench.recipes import padded_batch
from tests.conftest import TINY
from trainable.fast import apply_fast_path
from trainable.model import build_lora_model, load_base_model
from trainable.prepare import PreparedTrial, prepare_trial
from trainable.settings import DataSettings, Hyperparameters, ModelSettings, TrainSettings
from trainable.train import setup_trial, train_by_hand


@pytest.fixture(scope="module")
def prepared(tiny_llama: Path) -> PreparedTrial:
    return prepare_trial(
        model=ModelSettings(name_or_path=str(tiny_llama), gradient_checkpointing=False),
        data=DataSettings(max_length=128, max_train_examples=48, max_eval_examples=4),
        train=TrainSettings(max_steps=4, eval_every=2, batch_size=4, warmup_ratio=0.0),
    )


def lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]


@pytest.mark.parametrize(("use_rslora", "scaling"), [(False, 8 / 16), (True, 8 / math.sqrt(16))])
def test_rslora_scales_by_alpha_over_the_root_of_r(
    tiny_llama: Path, use_rslora: bool, scaling: float
) -> None:
    base = load_base_model(str(tiny_llama), ModelSettings(), device="cpu")
    hparams = Hyperparameters(r=16, lora_alpha=8, use_rslora=use_rslora)
    layers = lora_layers(build_lora_model(base, hparams, gradient_checkpointing=False))
    assert len(layers) == 2 * 7 and all(
        layer.scaling["default"] == pytest.approx(scaling) for layer in layers
    )


def test_dora_adds_a_trainable_magnitude_per_output(tiny_llama: Path) -> None:
    base = load_base_model(str(tiny_llama), ModelSettings(), device="cpu")
    model = build_lora_model(base, Hyperparameters(r=4, use_dora=True), gradient_checkpointing=False)
    magnitudes = {n: p for n, p in model.named_parameters() if "lora_magnitude_vector" in n}
    assert len(magnitudes) == 2 * 7 and all(p.requires_grad and p.ndim == 1 for p in magnitudes.values())
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert (
        magnitudes[next(n for n in magnitudes if "layers.0.self_attn.q_proj" in n)].numel()
        == q_proj.out_features
    )


def test_loraplus_gives_b_ratio_times_the_learning_rate(prepared: PreparedTrial, tmp_path: Path) -> None:
    hparams = Hyperparameters(r=4, learning_rate=1e-3, loraplus_lr_ratio=16)
    trainer = setup_trial(hparams, prepared.settings, output_dir=str(tmp_path), device="cpu", callbacks=[])
    assert isinstance(trainer.optimizer, torch.optim.AdamW)  # the class args.optim names on CPU
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    lr_of = {names[id(p)]: group["lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    assert {n for n, p in trainer.model.named_parameters() if p.requires_grad} == set(lr_of)
    assert all(lr == 1e-3 for n, lr in lr_of.items() if "lora_A" in n)
    assert all(lr == pytest.approx(16e-3) for n, lr in lr_of.items() if "lora_B" in n)
    plain = setup_trial(
        Hyperparameters(r=4, learning_rate=1e-3),
        prepared.settings,
        output_dir=str(tmp_path),
        device="cpu",
        callbacks=[],
    )
    assert plain.optimizer is None  # ratio 1: the trainer builds its usual optimizer


@pytest.mark.parametrize(
    "option",
    [{"use_rslora": True}, {"use_dora": True}, {"loraplus_lr_ratio": 8.0}],
    ids=lambda o: next(iter(o)),
)
def test_a_short_run_with_each_option_lowers_the_eval_loss(
    prepared: PreparedTrial, tmp_path: Path, option: dict[str, object]
) -> None:
    reports = train_by_hand(
        {"r": 4, "target_modules": "qv", "learning_rate": 5e-3, **option},
        prepared.settings,
        output_dir=tmp_path,
    )
    losses = [r["eval_loss"] for r in reports]
    assert [r["step"] for r in reports] == [2, 4]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < reports[0]["base_eval_loss"]


def test_fast_path_leaves_dora_layers_to_peft_with_the_same_loss() -> None:
    config = LlamaConfig(vocab_size=300, **TINY)
    targets = ["q_proj", "v_proj", "gate_proj"]
    plain = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=targets, use_dora=True))
    fast = copy.deepcopy(plain)
    report = apply_fast_path(fast)
    assert report.skipped is None and report.dora_layers == 2 * 3 and report.lora_layers == 0
    ids = torch.randint(0, 300, (12,)).tolist()
    batch = padded_batch([{"input_ids": ids, "labels": ids}, {"input_ids": ids[:7], "labels": ids[:7]}])
    reference, out = plain(**batch).loss, fast(**batch).loss
    assert out.item() == pytest.approx(reference.item(), rel=1e-5)
    out.backward()
    magnitudes = [p.grad for n, p in fast.named_parameters() if "lora_magnitude_vector" in n]
    assert magnitudes and all(g is not None and g.abs().sum() > 0 for g in magnitudes)


@pytest.mark.gpu
def test_on_cuda_dora_and_loraplus_train_with_paged_adamw(prepared: PreparedTrial, tmp_path: Path) -> None:
    """On a GPU host: the fast path leaves DoRA layers to peft, LoRA+ gets bitsandbytes' paged AdamW (the
    class `optim: auto` picks on CUDA) with B at ratio x the learning rate, and the run lowers the loss."""
    hparams = Hyperparameters(r=4, learning_rate=5e-3, use_dora=True, loraplus_lr_ratio=8.0)
    trainer = setup_trial(hparams, prepared.settings, output_dir=str(tmp_path), device="cuda", callbacks=[])
    optimizer = trainer.optimizer
    assert type(optimizer).__module__.startswith("bitsandbytes") and optimizer.is_paged
    assert {round(g["lr"], 6) for g in optimizer.param_groups if g["params"]} == {0.005, 0.04}
    base = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < base
    # The fused forward plans itself on a layer's first call; DoRA layers were never handed to it.
    assert not any("_fast_plan" in m.__dict__ for m in trainer.model.modules())
