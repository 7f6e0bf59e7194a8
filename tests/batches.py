"""The same examples collated two ways, to compare the fast path with the textbook one: right-padded with an
attention mask, and padding-free as trl's collator packs them (one row, per-example position ids)."""

from __future__ import annotations

import torch


def padded(examples: list[dict[str, list[int]]], device: str = "cpu") -> dict[str, torch.Tensor]:
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), longest, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], mask[i, :n], labels[i, :n] = torch.tensor(e["input_ids"]), 1, torch.tensor(e["labels"])
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def packed(examples: list[dict[str, list[int]]], device: str = "cpu") -> dict[str, object]:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
