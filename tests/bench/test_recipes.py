"""The benchmark recipes' CPU-checkable parts: the batches both recipes are fed, the shapes, the checkpoint."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from bench.recipes import (
    SHAPES,
    ShapeName,
    fixed_batches,
    make_checkpoint,
    packed_batch,
    padded_batch,
    realistic_batches,
)


def test_batches_depend_on_seed_and_step_only() -> None:
    batches = realistic_batches(8, seed=3)
    first = batches.examples(5, vocab_size=1000)
    assert realistic_batches(8, seed=3).examples(5, vocab_size=1000) == first  # another repeat, same batch
    assert batches.examples(6, vocab_size=1000) != first
    assert realistic_batches(8, seed=4).examples(5, vocab_size=1000) != first


def test_fixed_batches_have_one_length_and_every_token_a_target() -> None:
    examples = fixed_batches(4, 64).examples(0, vocab_size=100)
    assert [len(e["input_ids"]) for e in examples] == [64] * 4
    assert all(e["labels"] == e["input_ids"] for e in examples)
    assert all(0 <= t < 100 for e in examples for t in e["input_ids"])


def test_realistic_lengths_are_spread_around_the_mean_and_capped() -> None:
    batches = realistic_batches(8, mean=300, cap=2048)
    lengths = [len(e["input_ids"]) for step in range(300) for e in batches.examples(step, vocab_size=50)]
    assert min(lengths) >= 8 and max(lengths) <= 2048
    assert 250 < statistics.mean(lengths) < 320  # the log-normal's mean, a little less after the cap
    assert 150 < statistics.median(lengths) < 210  # most examples short: median about 60% of the mean
    assert max(lengths) > 5 * statistics.median(lengths)  # a long tail, which padding pays for
    example = batches.examples(0, vocab_size=50)[0]
    prompt = int(len(example["input_ids"]) * 0.4)
    assert (
        example["labels"][:prompt] == [-100] * prompt
        and example["labels"][prompt:] == example["input_ids"][prompt:]
    )


def test_padded_and_packed_batches_hold_the_same_tokens_and_targets() -> None:
    examples = realistic_batches(4, mean=40, cap=128).examples(0, vocab_size=300)
    lengths = [len(e["input_ids"]) for e in examples]
    assert len(set(lengths)) > 1
    padded, packed = padded_batch(examples), packed_batch(examples)
    assert padded["input_ids"].shape == (4, max(lengths))
    assert padded["attention_mask"].sum().item() == sum(lengths)
    assert packed["input_ids"].shape == (1, sum(lengths))
    real = padded["input_ids"][padded["attention_mask"].bool()]
    assert torch.equal(real, packed["input_ids"][0])
    # The padded side's targets are shifted inside the model; the packed side's first token of each example
    # has no label instead. Either way the same tokens are predicted.
    assert (padded["labels"][:, 1:] != -100).sum() == (packed["labels"] != -100).sum()


def test_padded_batch_has_no_mask_when_nothing_is_padded() -> None:
    assert "attention_mask" not in padded_batch(fixed_batches(2, 16).examples(0, vocab_size=50))


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_shape_parameter_count_is_the_models(name: ShapeName) -> None:
    shape = SHAPES[name]
    model = LlamaForCausalLM(shape.config(vocab_size=300, tie_word_embeddings=False))
    assert shape.parameters(vocab_size=300) == sum(p.numel() for p in model.parameters())


def test_7b_shape_is_llama_2_7b() -> None:
    assert SHAPES["7b"].parameters(vocab_size=32000) == 6_738_415_616


def test_make_checkpoint_saves_a_loadable_bf16_model_once(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "tiny", SHAPES["tiny"], vocab_size=128)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == 128
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    saved = sorted((f.name, f.stat().st_mtime_ns) for f in path.iterdir())
    make_checkpoint(path, SHAPES["tiny"], vocab_size=128)  # exists: kept as it is
    assert sorted((f.name, f.stat().st_mtime_ns) for f in path.iterdir()) == saved


def test_make_checkpoint_needs_exactly_one_vocabulary_source(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one of vocab_size or tokenizer_path"):
        make_checkpoint(tmp_path / "x", SHAPES["tiny"])
    assert not (tmp_path / "x").exists()
