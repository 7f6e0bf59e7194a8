from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import has_avx512bf16

from trainable.model import (
    TARGET_PRESETS,
    build_lora_model,
    keep_4bit_trainable_on_cpu,
    linear_module_names,
    load_base_model,
    load_module_names,
    resolve_target_modules,
)
from trainable.settings import Hyperparameters, ModelSettings

LLAMA_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_module_names_come_from_the_config_alone(tiny_llama: Path) -> None:
    assert load_module_names(str(tiny_llama), ModelSettings()) == LLAMA_LINEAR


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("all-linear", sorted(LLAMA_LINEAR)),
        ("qv", ["q_proj", "v_proj"]),
        ("mlp", list(TARGET_PRESETS["mlp"])),
        ("k_proj, o_proj", ["k_proj", "o_proj"]),
    ],
)
def test_target_presets_and_names(spec: str, expected: list[str]) -> None:
    assert resolve_target_modules(spec, LLAMA_LINEAR) == expected


def test_unknown_target_lists_what_the_model_has() -> None:
    with pytest.raises(ValueError, match=r"query_key_value.*down_proj, gate_proj"):
        resolve_target_modules("query_key_value", LLAMA_LINEAR)


def test_base_is_nf4_with_double_quant_and_lora_sits_exactly_on_targets(tiny_llama: Path) -> None:
    model = load_base_model(str(tiny_llama), ModelSettings(), device="cpu")
    linears = {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in LLAMA_LINEAR}
    assert len(linears) == 2 * 7
    for module in linears.values():
        assert isinstance(module, bnb.nn.Linear4bit)
        assert module.weight.quant_state.quant_type == "nf4"
        assert module.weight.quant_state.nested  # double quantization: the absmax constants are quantized
        assert module.weight.dtype == torch.uint8
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)

    peft_model = build_lora_model(
        model, Hyperparameters(r=4, target_modules="qv"), gradient_checkpointing=True
    )
    adapted = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]
    assert {n.rsplit(".", 1)[-1] for n in adapted} == {"q_proj", "v_proj"}
    assert len(adapted) == 2 * 2
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_bias_setting_trains_biases(tiny_llama: Path) -> None:
    model = load_base_model(str(tiny_llama), ModelSettings(quantization="none"), device="cpu")
    # Llama has no biases in its projections; 'all' must then train exactly the LoRA weights still.
    peft_model = build_lora_model(model, Hyperparameters(r=4, bias="all"), gradient_checkpointing=False)
    assert all("lora_" in n or "bias" in n for n, p in peft_model.named_parameters() if p.requires_grad)


def lora_grads_after_an_eval_pass(model: torch.nn.Module) -> list[torch.Tensor | None]:
    ids = torch.randint(0, 1000, (2, 16))
    model.eval()
    # bf16 autocast, as the trainer runs on CPUs with bf16 support.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    # lora_B: lora_A's gradient is zero by construction while B is still at its zero init.
    return [p.grad for n, p in model.named_parameters() if "lora_B" in n]


def test_evaluation_does_not_freeze_4bit_training(tiny_llama: Path) -> None:
    """An eval pass under no_grad must leave LoRA gradients alive (see keep_4bit_trainable_on_cpu)."""
    model = load_base_model(str(tiny_llama), ModelSettings(), device="cpu")
    model = build_lora_model(model, Hyperparameters(r=4), gradient_checkpointing=False)
    grads = lora_grads_after_an_eval_pass(model)
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.skipif(not has_avx512bf16(), reason="the repacking only happens on CPUs with AVX512-BF16")
def test_without_the_switch_an_eval_pass_freezes_training(tiny_llama: Path) -> None:
    """The control: bitsandbytes' default behaviour zeroes the LoRA gradients, which is why the switch exists."""
    model = load_base_model(str(tiny_llama), ModelSettings(), device="cpu")
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = True
    model = build_lora_model(model, Hyperparameters(r=4), gradient_checkpointing=True)
    grads = lora_grads_after_an_eval_pass(model)
    frozen = [g for g in grads if g is None or g.abs().sum() == 0]
    assert len(frozen) >= len(grads) // 2


def test_cpu_repacking_switch_is_turned_off(tiny_llama: Path) -> None:
    model = load_base_model(str(tiny_llama), ModelSettings(), device="cpu")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    keep_4bit_trainable_on_cpu(model)  # idempotent
    assert linear_module_names(model) == LLAMA_LINEAR


def test_training_changes_lora_weights_and_leaves_the_base_alone(tiny_llama: Path, tmp_path: Path) -> None:
    from trainable.prepare import prepare_trial
    from trainable.settings import DataSettings, TrainSettings
    from trainable.train import setup_trial

    prepared = prepare_trial(
        model=ModelSettings(name_or_path=str(tiny_llama), gradient_checkpointing=False),
        data=DataSettings(max_length=128, max_train_examples=32, max_eval_examples=4),
        train=TrainSettings(max_steps=3, eval_every=3, batch_size=4),
    )
    hparams = Hyperparameters(r=4, learning_rate=1e-2)
    stages: list[str] = []
    trainer = setup_trial(
        hparams,
        prepared.settings,
        output_dir=str(tmp_path),
        device="cpu",
        callbacks=[],
        on_stage=stages.append,
    )
    assert stages == ["tokenizer", "base_model_loaded", "lora_attached", "trainer_built"]
    model = trainer.model
    assert model.peft_config["default"].r == 4 and trainer.args.learning_rate == 1e-2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.evaluate()  # an eval pass first: a trial evaluates every train.eval_every steps
    trainer.train()
    after = dict(model.named_parameters())
    lora_names = [n for n in before if "lora_" in n]
    base_names = [n for n in before if "lora_" not in n]
    assert lora_names and base_names
    assert all(not torch.equal(before[n], after[n]) for n in lora_names if "lora_B" in n)
    assert all(torch.equal(before[n], after[n].detach()) for n in base_names)
