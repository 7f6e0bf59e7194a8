"""Batched generation: left padding changes no answer, and swapping adapters in place equals loading each
fresh."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from analysis.generate import (
    BASE,
    Candidate,
    build_prompts,
    generate_batched,
    generate_for_candidates,
    render_prompts,
)
from analysis.settings import GenerationSettings
from trainable.data import DEFAULT_CHAT_TEMPLATE, Example
from trainable.model import load_base_model, load_tokenizer
from trainable.settings import ModelSettings

# Full precision, no quantization: batched and one-by-one runs then agree to the last token.
EXACT = ModelSettings(quantization="none", compute_dtype="float32")
QUESTIONS = [
    "Add the two numbers.\n\n12 + 30",
    "Reverse the letters of the word.\n\napple",
    "Write me a poem about Singapore",
    "Hi",
]


def examples(n: int) -> list[Example]:
    return [
        Example(
            messages=[{"role": "user", "content": q}, {"role": "assistant", "content": str(i)}],
            task=f"task{i % 2}",
            check="exact",
        )
        for i, q in enumerate(QUESTIONS[:n])
    ]


def make_adapter(model_path: Path, out: Path, *, seed: int) -> str:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = load_base_model(str(model_path), EXACT, device="cpu")
    # Random B as well as A (peft starts B at zero): the adapter changes the answers.
    config = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return str(out)


def test_prompts_spread_over_tasks_then_user_prompts() -> None:
    eval_examples = [
        Example(
            messages=[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}],
            task="add" if i < 6 else "even_odd",
            check="exact",
        )
        for i in range(8)
    ]
    prompts = build_prompts(eval_examples, ["Write me a poem"], count=4, system_prompt=None)
    assert [p.example.task for p in prompts[:4]].count("even_odd") == 2  # round robin, not the first four
    assert prompts[-1].source == "user" and prompts[-1].reference is None
    assert prompts[0].reference == "a" and prompts[0].source == "test" and prompts[0].prompt_id == "test-0000"
    everything = build_prompts(eval_examples, [], count=500, source="eval")
    assert len(everything) == 8 and {p.source for p in everything} == {"eval"}  # all of it, under the cap


@pytest.mark.parametrize("batch_size", [1, 3])
def test_left_padded_batches_give_the_one_by_one_answers(tiny_llama: Path, batch_size: int) -> None:
    tokenizer = load_tokenizer(str(tiny_llama), EXACT)
    model = load_base_model(str(tiny_llama), EXACT, device="cpu")
    texts = render_prompts(build_prompts(examples(4), [], count=4), tokenizer, DEFAULT_CHAT_TEMPLATE)
    assert len({len(tokenizer(t)["input_ids"]) for t in texts}) > 1  # prompts of different lengths: padding
    settings = GenerationSettings(max_new_tokens=8, batch_size=batch_size)
    one_by_one = [generate_batched(model, tokenizer, [t], settings)[0] for t in texts]
    assert generate_batched(model, tokenizer, texts, settings) == one_by_one


def test_adapters_swapped_in_place_answer_as_freshly_loaded_ones(tiny_llama: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    adapters = [make_adapter(tiny_llama, tmp_path / f"adapter{i}", seed=i) for i in range(2)]
    tokenizer = load_tokenizer(str(tiny_llama), EXACT)
    prompts = build_prompts(examples(3), ["Hello"], count=3)
    texts = render_prompts(prompts, tokenizer, DEFAULT_CHAT_TEMPLATE)
    settings = GenerationSettings(max_new_tokens=6)
    candidates = [Candidate("t0", adapters[0]), Candidate(BASE), Candidate("t1", adapters[1])]
    generations, timing = generate_for_candidates(
        load_base_model(str(tiny_llama), EXACT, device="cpu"), tokenizer, prompts, texts, candidates, settings
    )
    assert len(generations) == len(prompts) * len(candidates)
    assert list(timing["candidate"]) == [BASE, "t0", "t1"]  # the bare base answers first
    assert (generations["gen_max_new_tokens"] == 6).all() and (generations["gen_temperature"] == 0.0).all()
    answers = generations.set_index(["candidate", "prompt_id"])["answer"]
    for name, path in (("t0", adapters[0]), ("t1", adapters[1])):
        fresh = PeftModel.from_pretrained(load_base_model(str(tiny_llama), EXACT, device="cpu"), path).eval()
        expected = [a for a, _ in generate_batched(fresh, tokenizer, texts, settings)]
        assert [answers[(name, p.prompt_id)] for p in prompts] == expected
    base = load_base_model(str(tiny_llama), EXACT, device="cpu")
    assert [answers[(BASE, p.prompt_id)] for p in prompts] == [
        a for a, _ in generate_batched(base, tokenizer, texts, settings)
    ]
    assert [answers[("t0", p.prompt_id)] for p in prompts] != [answers[(BASE, p.prompt_id)] for p in prompts]


def test_the_dequantized_base_answers_as_the_4bit_one_on_the_cpu(tiny_llama: Path, tmp_path: Path) -> None:
    """The report generates on a CPU with the 4-bit base dequantized once (analysis.report says why): the
    same weights, so the same answers, with and without an adapter."""
    from analysis.report import dequantized_for_generation

    four_bit = ModelSettings(quantization="nf4", compute_dtype="float32")
    adapter = make_adapter(tiny_llama, tmp_path / "adapter", seed=0)
    tokenizer = load_tokenizer(str(tiny_llama), four_bit)
    prompts = build_prompts(examples(4), ["Hello"], count=4)
    texts = render_prompts(prompts, tokenizer, DEFAULT_CHAT_TEMPLATE)
    candidates = [Candidate(BASE), Candidate("t0", adapter)]
    settings = GenerationSettings(max_new_tokens=8)

    def answers(model: torch.nn.Module) -> list[str]:
        return list(
            generate_for_candidates(model, tokenizer, prompts, texts, candidates, settings)[0]["answer"]
        )

    quantized = load_base_model(str(tiny_llama), four_bit, device="cpu")
    assert any(type(m).__name__ == "Linear4bit" for m in quantized.modules())
    expected = answers(quantized)
    dequantized = dequantized_for_generation(
        load_base_model(str(tiny_llama), four_bit, device="cpu"), four_bit
    )
    assert not any(type(m).__name__ == "Linear4bit" for m in dequantized.modules())
    assert answers(dequantized) == expected
    assert expected[: len(prompts)] != expected[len(prompts) :]  # the adapter changed the answers


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_adapters_merged_into_a_copy_answer_as_attached_ones(
    tiny_llama: Path, tmp_path: Path, quantization: str
) -> None:
    """On the CPU each adapter answers merged into a copy of the (dequantized) base, at the base's speed: the
    same greedy answers as the adapter attached with peft, logits equal up to rounding, the base unchanged."""
    from analysis.generate import merged_copy
    from analysis.report import dequantized_for_generation

    model_settings = ModelSettings(quantization=quantization, compute_dtype="float32")
    adapters = [make_adapter(tiny_llama, tmp_path / f"adapter{i}", seed=i) for i in range(2)]
    tokenizer = load_tokenizer(str(tiny_llama), model_settings)
    prompts = build_prompts(examples(4), ["Hello"], count=4)
    texts = render_prompts(prompts, tokenizer, DEFAULT_CHAT_TEMPLATE)
    candidates = [Candidate(BASE), Candidate("t0", adapters[0]), Candidate("t1", adapters[1])]
    settings = GenerationSettings(max_new_tokens=8)

    def base() -> torch.nn.Module:
        model = load_base_model(str(tiny_llama), model_settings, device="cpu")
        return dequantized_for_generation(model, model_settings) if quantization != "none" else model

    model = base()
    before = {name: p.clone() for name, p in model.state_dict().items()}
    merged = generate_for_candidates(
        model, tokenizer, prompts, texts, candidates, settings, merge_adapters=True
    )[0]
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())  # the base as it was
    attached = generate_for_candidates(base(), tokenizer, prompts, texts, candidates, settings)[0]
    assert list(merged["answer"]) == list(attached["answer"])
    answers = merged.set_index(["candidate", "prompt_id"])["answer"]
    assert [answers[("t0", p.prompt_id)] for p in prompts] != [answers[(BASE, p.prompt_id)] for p in prompts]

    from peft import PeftModel

    inputs = tokenizer(texts[:2], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        expected = PeftModel.from_pretrained(base(), adapters[0]).eval()(**inputs).logits
        got = merged_copy(base(), adapters[0])(**inputs).logits
    assert not any("lora" in name for name, _ in merged_copy(base(), adapters[0]).named_modules())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
