"""A CPU trial's loss from the labelled tokens only equals trl's loss over every position, and so do its
gradients (trainable/compact.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from trl import SFTTrainer

from trainable.compact import CompactLossTrainer
from trainable.evaluate import evaluate_base
from trainable.prepare import prepare_trial
from trainable.settings import DataSettings, Hyperparameters, ModelSettings, TrainSettings
from trainable.train import setup_trial


@pytest.mark.parametrize("num_items_in_batch", [None, 97])
def test_compact_loss_and_gradients_equal_trl(
    tiny_llama: Path, tmp_path: Path, num_items_in_batch: int | None
) -> None:
    model_settings = ModelSettings(name_or_path=str(tiny_llama), gradient_checkpointing=False)
    trial = prepare_trial(
        model=model_settings,
        data=DataSettings(max_length=128, max_train_examples=16, max_eval_examples=4),
        train=TrainSettings(max_steps=1, eval_every=1, batch_size=8),
    ).settings
    hparams = Hyperparameters(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    trainer = setup_trial(hparams, trial, output_dir=str(tmp_path), device="cpu", callbacks=[])
    assert isinstance(trainer, CompactLossTrainer)  # what a CPU trial trains with
    batch = next(iter(trainer.get_train_dataloader()))
    labels = batch["labels"]
    # The batch has what the compact loss leaves out: padding and prompt tokens without a label.
    assert 0 < int((labels != -100).sum()) < labels.numel() // 2
    model = trainer.model
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    torch.nn.init.normal_(lora[1], std=0.02)  # LoRA B starts at zero: give every gradient a nonzero path

    def loss_and_grads(compute_loss) -> tuple[torch.Tensor, list[torch.Tensor]]:  # type: ignore[no-untyped-def]
        loss = compute_loss(model, dict(batch), num_items_in_batch=num_items_in_batch)
        return loss.detach(), [g.detach() for g in torch.autograd.grad(loss, lora)]

    compact_loss, compact_grads = loss_and_grads(trainer.compute_loss)
    trl_loss, trl_grads = loss_and_grads(lambda *a, **k: SFTTrainer.compute_loss(trainer, *a, **k))
    assert torch.isfinite(compact_loss) and compact_loss > 0
    torch.testing.assert_close(compact_loss, trl_loss, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(compact_grads, trl_grads, strict=True):
        # Equal up to float32 summation order: the two sum the same terms in other orders.
        assert torch.linalg.vector_norm(ours - theirs) <= 1e-4 * torch.linalg.vector_norm(theirs) + 1e-9
    assert any(g.abs().sum() > 0 for g in compact_grads)


def test_a_cpu_trial_trains_padding_free_with_the_loss_and_gradients_of_padded_batches(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """One row of packed examples (transformers keeps them apart by position_ids): the padded batch's loss
    and gradients, without the padding's compute."""
    trial = prepare_trial(
        model=ModelSettings(name_or_path=str(tiny_llama), gradient_checkpointing=False),
        data=DataSettings(max_length=128, max_train_examples=16, max_eval_examples=4),
        train=TrainSettings(max_steps=1, eval_every=1, batch_size=8),
    ).settings
    hparams = Hyperparameters(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    trainer = setup_trial(hparams, trial, output_dir=str(tmp_path), device="cpu", callbacks=[])
    examples = [trainer.train_dataset[i] for i in range(8)]
    packed = trainer.data_collator(examples)
    padded = dataclasses.replace(trainer.data_collator, padding_free=False)(examples)
    real = sum(len(e["input_ids"]) for e in examples)
    assert packed["input_ids"].shape == (1, real) and "attention_mask" not in packed
    assert padded["input_ids"].numel() > real  # what padding-free saves
    lora = [p for n, p in trainer.model.named_parameters() if p.requires_grad]
    torch.nn.init.normal_(lora[1], std=0.02)  # LoRA B starts at zero: give every gradient a nonzero path

    def loss_and_grads(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        loss = trainer.compute_loss(trainer.model, dict(batch))
        return loss.detach(), [g.detach() for g in torch.autograd.grad(loss, lora)]

    packed_loss, packed_grads = loss_and_grads(packed)
    padded_loss, padded_grads = loss_and_grads(padded)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(packed_grads, padded_grads, strict=True):
        assert torch.linalg.vector_norm(ours - theirs) <= 1e-4 * torch.linalg.vector_norm(theirs) + 1e-9
    # Without the position_ids' boundaries the examples would attend to each other: other gradients.
    _, crossed_grads = loss_and_grads({k: v for k, v in packed.items() if k != "position_ids"})
    assert any(
        torch.linalg.vector_norm(ours - theirs) > 1e-2 * torch.linalg.vector_norm(theirs)
        for ours, theirs in zip(crossed_grads, padded_grads, strict=True)
    )


def test_a_trial_before_training_reports_the_base_models_eval_loss(tiny_llama: Path, tmp_path: Path) -> None:
    """An adapter starts as the identity (LoRA B is zero), so a trial's eval loss before its first step is
    the base model's: the driver's evaluate_base averages the eval batches as the trainer does, also when
    the last batch is short (6 examples in batches of 4). In float32 on every CPU: in bf16 (chosen where the
    CPU has it) the two paths round differently, by 2.4e-4 of a loss of 10.8, more than the 1.4e-4 that
    averaging the batches equally would change."""
    trial = prepare_trial(
        model=ModelSettings(
            name_or_path=str(tiny_llama), gradient_checkpointing=False, compute_dtype="float32"
        ),
        data=DataSettings(max_length=128, max_train_examples=16, max_eval_examples=6),
        train=TrainSettings(max_steps=1, eval_every=1, batch_size=4),
    ).settings
    assert len(trial.eval_data["input_ids"]) % trial.train.batch_size != 0
    hparams = Hyperparameters(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    trainer = setup_trial(hparams, trial, output_dir=str(tmp_path), device="cpu", callbacks=[])
    assert trainer.args.padding_free
    trial_loss = trainer.evaluate()["eval_loss"]
    assert trial_loss == pytest.approx(evaluate_base(trial), rel=1e-5)
