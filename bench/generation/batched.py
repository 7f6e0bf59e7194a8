"""The report's batched generation against one prompt at a time, on the same 4-bit model and LoRA adapter.

    python -m bench.generation.batched --adapter EXPERIMENT/.../checkpoint_000002 --out results/

Both go through `analysis.generate.generate_batched` (left-padded batches of `--batch-size` prompts, the
report's default; the one-at-a-time run is the same function with batch size 1, i.e. plain HF generate per
prompt), greedy, on two prompt sets rendered with the model's chat template: the report's default set
(16 held-out prompts and the default user prompt) and `--prompts` held-out prompts of the bundled set.
Counted: answer tokens (up to and including the stop token) per second of wall time. Writes
generation.jsonl under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import torch


def main() -> None:
    from analysis.generate import build_prompts, render_prompts
    from analysis.settings import GenerationSettings, ReportSettings
    from trainable.data import choose_chat_template, load_splits
    from trainable.model import load_base_model, load_tokenizer, resolve_model
    from trainable.settings import DataSettings, ModelSettings

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder; default: a fresh random LoRA")
    p.add_argument("--prompts", type=int, default=64, help="held-out prompts of the larger prompt set")
    p.add_argument("--batch-size", type=int, default=GenerationSettings().batch_size)
    p.add_argument("--max-new-tokens", type=int, default=GenerationSettings().max_new_tokens)
    p.add_argument("--device", default="cuda", help="cpu: a quick check of the script, not a measurement")
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    args = p.parse_args()

    path = resolve_model(args.model)
    settings = ModelSettings(name_or_path=args.model)
    tokenizer = load_tokenizer(path, settings)
    model = attach_adapter(load_base_model(path, settings, device=args.device), args.adapter)
    model.eval()
    splits = load_splits(DataSettings(max_eval_examples=None))
    template = choose_chat_template(tokenizer, "auto")
    report = ReportSettings()
    prompt_sets = {  # the report's default prompt set, and a larger one
        "report default": build_prompts(splits.eval, report.prompts, count=report.eval_prompts),
        f"{args.prompts} held-out": build_prompts(splits.eval + splits.test, [], count=args.prompts),
    }
    for name, prompts in prompt_sets.items():
        texts = render_prompts(prompts, tokenizer, template)
        runs = [measure(model, tokenizer, texts, args.max_new_tokens, size) for size in (args.batch_size, 1)]
        batched, single = runs
        record = {
            "model": args.model,
            "adapter": args.adapter or "random LoRA (r=16, all linear)",
            "quantization": "nf4 double quant, bf16 compute",
            "prompt_set": name,
            "prompts": len(texts),
            "generation": dataclasses.asdict(
                GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
            ),
            "runs": [{k: v for k, v in run.items() if k != "answers"} for run in runs],
            "batched_over_single": round(batched["tokens_per_s"] / single["tokens_per_s"], 2),
            # Greedy either way; padding changes bf16 rounding, so a few answers may differ.
            "same_answers": sum(a == b for a, b in zip(batched["answers"], single["answers"], strict=True)),
            "answers_sample": batched["answers"][:3],
            "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        }
        print(json.dumps(record), flush=True)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "generation.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def measure(
    model: torch.nn.Module, tokenizer: object, texts: list[str], max_new_tokens: int, batch_size: int
) -> dict[str, Any]:
    from analysis.generate import generate_batched
    from analysis.settings import GenerationSettings

    gen = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size)
    generate_batched(model, tokenizer, texts[: 2 * batch_size], gen)  # warm-up: kernels, allocator
    sync()
    start = time.perf_counter()
    answers = generate_batched(model, tokenizer, texts, gen)
    sync()
    seconds = time.perf_counter() - start
    tokens = sum(n for _, n in answers)
    return {
        "batch_size": batch_size,
        "answer_tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "answers": [a for a, _ in answers],
    }


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def attach_adapter(model: torch.nn.Module, adapter: str | None) -> torch.nn.Module:
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter is not None:
        return PeftModel.from_pretrained(model, adapter)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.01)  # an adapter that changes the answers a little
    return peft_model


if __name__ == "__main__":
    main()
