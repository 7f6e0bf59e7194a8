"""Answers from every candidate (the base model and the top adapters) to one fixed prompt set.

The base model is loaded once, 4-bit as in training (the adapters were trained against those weights).
It answers first, bare; then each adapter answers, read from disk once. On a GPU each is attached to the
4-bit base with peft and removed again. Where the base's layers are plain (on a CPU the report dequantizes
the 4-bit base once: analysis.report.dequantized_for_generation), each adapter is instead merged into a
copy of the base for its turn (`merge_adapters`): the same answers up to rounding, at the base's speed,
where peft's separate LoRA matmuls on every layer made generation several times slower (docs/report.md has
the figures). Prompts are generated in batches, left-padded, so one forward pass extends every answer of a
batch by a token.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd

from analysis.settings import GenerationSettings
from trainable.data import Example, prompt_text

BASE = "base"  # the candidate name of the base model without adapter


@dataclass(frozen=True)
class Prompt:
    """One prompt of the report's set: held out (from the test split, or the eval split when the data has no
    test split; with a reference) or given by the user."""

    prompt_id: str
    source: str  # "test", "eval" or "user"
    question: str  # the last user turn, for display
    example: Example  # the conversation up to the answer (plus the reference answer for held-out prompts)

    @property
    def reference(self) -> str | None:
        return self.example.reference if self.source != "user" else None


@dataclass(frozen=True)
class Candidate:
    """Something that answers: the base model (adapter_path None) or a trial's adapter on it."""

    name: str  # BASE or the trial id
    adapter_path: str | None = None


def spread_over_tasks(tasks: Sequence[str | None], count: int) -> list[int]:
    """Positions of `count` items taken round robin over their tasks (in order of first appearance, so a
    small count still covers every task), returned in their original order."""
    by_task: dict[str | None, list[int]] = {}
    for index, task in enumerate(tasks):
        by_task.setdefault(task, []).append(index)
    chosen: list[int] = []
    queues = list(by_task.values())
    while len(chosen) < min(count, len(tasks)):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop(0))
    return sorted(chosen)


def build_prompts(
    held_out: Sequence[Example],
    user_prompts: Sequence[str],
    *,
    count: int,
    source: str = "test",
    system_prompt: str | None = None,
) -> list[Prompt]:
    """Up to `count` held-out examples (all of them when there are fewer; else spread over the tasks), then
    the user's prompts."""
    usable = [e for e in held_out if any(m["role"] == "assistant" for m in e.messages)]
    prompts = []
    for index in spread_over_tasks([e.task for e in usable], count):
        example = usable[index]
        last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
        question = next((m["content"] for m in reversed(example.messages[:last]) if m["role"] == "user"), "")
        prompts.append(Prompt(f"{source}-{index:04d}", source, question, example))
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for number, text in enumerate(user_prompts, start=1):
        messages = [*system, {"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        prompts.append(Prompt(f"user-{number:02d}", "user", text, Example(messages=messages, check=None)))
    return prompts


def render_prompts(prompts: Sequence[Prompt], tokenizer: Any, template: str) -> list[str]:
    """Each prompt rendered with the sweep's chat template, ending where the assistant's answer starts."""
    return [prompt_text(p.example, tokenizer, template) for p in prompts]


def build_generation_config(settings: GenerationSettings, tokenizer: Any, model: Any) -> Any:
    from transformers import GenerationConfig

    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos_ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
    sample = settings.temperature > 0
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=sample,
        # Sampling knobs only when sampling: transformers warns about them under greedy or beam search.
        temperature=settings.temperature if sample else None,
        top_p=settings.top_p if sample else None,
        top_k=settings.top_k if sample else None,
        num_beams=settings.num_beams,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=sorted(eos_ids),
    )


def generate_batched(
    model: Any, tokenizer: Any, texts: Sequence[str], settings: GenerationSettings
) -> list[tuple[str, int]]:
    """(answer, new tokens) for each text, `settings.batch_size` texts per generate() call."""
    import torch

    config = build_generation_config(settings, tokenizer, model)
    stops = set(config.eos_token_id) | {tokenizer.pad_token_id}
    tokenizer.padding_side = "left"  # new tokens follow every prompt's last token directly
    # Similar lengths share a batch: less padding to compute on; answers go back in the given order.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    answers: dict[int, tuple[str, int]] = {}
    torch.manual_seed(settings.seed)
    for start in range(0, len(order), settings.batch_size):
        batch = order[start : start + settings.batch_size]
        # The templates write their special tokens themselves, as in training.
        encoded = tokenizer(
            [texts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False
        )
        encoded = encoded.to(model.device)
        with torch.inference_mode():
            output = model.generate(**encoded, generation_config=config)
        for i, row in zip(batch, output[:, encoded["input_ids"].shape[1] :].tolist(), strict=True):
            length = next((n + 1 for n, token in enumerate(row) if token in stops), len(row))
            answers[i] = (tokenizer.decode(row[:length], skip_special_tokens=True).strip(), length)
    return [answers[i] for i in range(len(texts))]


def generate_for_candidates(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    texts: Sequence[str],
    candidates: Sequence[Candidate],
    settings: GenerationSettings,
    *,
    merge_adapters: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Generations (one row per prompt x candidate) and per-candidate timing.

    `model` is the bare base model; the base candidate (if any) answers first. Adapters are attached to it
    in place, one at a time; with `merge_adapters` (a base of plain, not quantized, layers) each is merged
    into a copy of it instead (merged_copy), and `model` stays as it is.
    """
    from peft import PeftModel

    rows: list[dict[str, Any]] = []
    timing: list[dict[str, Any]] = []
    ordered = sorted(candidates, key=lambda c: c.adapter_path is not None)  # the bare base first
    peft_model: Any = None
    previous: str | None = None
    runner: Any = None
    for number, candidate in enumerate(ordered):
        if candidate.adapter_path is None:
            runner = model
        elif merge_adapters:
            runner = None  # the previous candidate's copy goes before the next is made
            runner = merged_copy(model, candidate.adapter_path)
        else:
            adapter = f"candidate_{number}"
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, candidate.adapter_path, adapter_name=adapter)
            else:
                peft_model.load_adapter(candidate.adapter_path, adapter_name=adapter)
                peft_model.set_adapter(adapter)
                if previous is not None:
                    peft_model.delete_adapter(previous)  # one adapter in memory at a time
            previous = adapter
            peft_model.eval()
            runner = peft_model
        start = time.perf_counter()
        answers = generate_batched(runner, tokenizer, texts, settings)
        seconds = time.perf_counter() - start
        new_tokens = sum(n for _, n in answers)
        timing.append(
            {
                "candidate": candidate.name,
                "seconds": seconds,
                "new_tokens": new_tokens,
                "tokens_per_s": new_tokens / seconds if seconds else float("nan"),
            }
        )
        for prompt, text, (answer, tokens) in zip(prompts, texts, answers, strict=True):
            rows.append(
                {
                    "prompt_id": prompt.prompt_id,
                    "source": prompt.source,
                    "task": prompt.example.task,
                    "check": prompt.example.check,
                    "question": prompt.question,
                    "prompt": text,
                    "reference": prompt.reference,
                    "candidate": candidate.name,
                    "adapter_path": candidate.adapter_path,
                    "answer": answer,
                    "new_tokens": tokens,
                    **{f"gen_{k}": v for k, v in asdict(settings).items()},
                }
            )
    return pd.DataFrame(rows), pd.DataFrame(timing)


def merged_copy(model: Any, adapter_path: str) -> Any:
    """A copy of `model` (a base of plain layers) with the adapter merged into its weights: peft's
    merge_and_unload, which adds each layer's scaled B @ A (DoRA's magnitude too) to its weight, in the
    weight's dtype. The base is left untouched, so every adapter merges into the same weights."""
    import copy

    from peft import PeftModel

    merged = PeftModel.from_pretrained(copy.deepcopy(model), adapter_path).merge_and_unload()
    merged.eval()
    return merged
