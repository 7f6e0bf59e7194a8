"""The report's generation on a CPU: each adapter attached with peft against merged into a copy of the base.

    python -m bench.generation.adapter_merge EXPERIMENT --repeats 3 --out bench/generation/results/cpu-adapter-merge-DATE.jsonl

Runs analysis.report.generate_answers (the base and every finalist answering the report's prompts, on the
dequantized base, as `python -m analysis.report` does on a CPU) on EXPERIMENT, alternately with the
adapters attached (merge_adapters=False, the report's way before) and merged (True), --repeats times each,
after one untimed warm-up. One JSON line per run (seconds, and per candidate seconds, new tokens,
tokens/s, forward passes and ms per pass); then the same work for each model (one batch, every answer
held to max_new_tokens), base, attached and merged in turn; then a summary: the median and range of each
mode's seconds, of the adapters' and the base's tokens/s and ms per forward pass, the ratio of the pairs,
the adapters' exact match in each mode, how many answers differ between the modes, and the fixed-length
ms per forward pass of each model.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pandas as pd

from analysis import report
from analysis.generate import BASE, Candidate, Prompt
from analysis.score import score_generations
from analysis.settings import GenerationSettings
from bench.generation.cpu_case import load_case
from bench.records import append_jsonl, spread
from trainable.hardware import describe_cpu


def main(argv: list[str] | None = None) -> int:
    case = load_case(__doc__.split("\n\n")[0], argv)
    experiment, settings, candidates, prompts = case.experiment, case.settings, case.candidates, case.prompts
    # Untimed: the first load of the model and libraries in this process, which would count against one mode.
    report.generate_answers(experiment, candidates, prompts[:1], settings, device="cpu", merge_adapters=True)
    runs: list[dict[str, Any]] = []
    answers: dict[bool, list[list[str]]] = {False: [], True: []}
    for repeat in range(case.repeats):
        for merge in (False, True):
            start = time.perf_counter()
            generations, timing = report.generate_answers(
                experiment, candidates, prompts, settings, device="cpu", merge_adapters=merge
            )
            adapters = timing[timing["candidate"] != BASE]
            steps = decoding_steps(generations, settings.generation.batch_size)
            timing["steps"] = timing["candidate"].map(steps)
            timing["ms_per_step"] = 1000 * timing["seconds"] / timing["steps"]
            scored = score_generations(generations)
            run = {
                "repeat": repeat,
                "merged": merge,
                "seconds": round(time.perf_counter() - start, 2),
                "generation_s": round(float(timing["seconds"].sum()), 2),
                "prompts": len(prompts),
                "adapter_tokens_per_s": round(
                    float(adapters["new_tokens"].sum() / adapters["seconds"].sum()), 2
                ),
                "adapter_exact_match": round(
                    float(scored.loc[scored["candidate"] != BASE, "exact_match"].mean()), 4
                ),
                "per_candidate": timing.round(2).to_dict("records"),
                "cpu": describe_cpu(),
            }
            answers[merge].append(list(generations["answer"]))
            runs.append(run)
            print(json.dumps(run), flush=True)

    def figures(merged: bool, key: str) -> list[float]:
        return [r[key] for r in runs if r["merged"] == merged]

    def base_speed(merged: bool) -> list[float]:
        return [
            c["tokens_per_s"]
            for r in runs
            if r["merged"] == merged
            for c in r["per_candidate"]
            if c["candidate"] == BASE
        ]

    def step_ms(merged: bool, base: bool) -> list[float]:
        return [
            c["ms_per_step"]
            for r in runs
            if r["merged"] == merged
            for c in r["per_candidate"]
            if (c["candidate"] == BASE) == base
        ]

    attached_s, merged_s = figures(False, "seconds"), figures(True, "seconds")
    reference = answers[False][0]
    summary = {
        "summary": True,
        "prompts": len(prompts),
        "candidates": len(candidates),
        "attached_s": spread(attached_s),
        "merged_s": spread(merged_s),
        "speedup": spread([a / b for a, b in zip(attached_s, merged_s, strict=True)]),
        "attached_adapter_tokens_per_s": spread(figures(False, "adapter_tokens_per_s")),
        "merged_adapter_tokens_per_s": spread(figures(True, "adapter_tokens_per_s")),
        "base_tokens_per_s": spread(base_speed(False) + base_speed(True)),
        "attached_adapter_ms_per_step": spread(step_ms(False, base=False)),
        "merged_adapter_ms_per_step": spread(step_ms(True, base=False)),
        "base_ms_per_step": spread(step_ms(False, base=True) + step_ms(True, base=True)),
        "attached_adapter_exact_match": spread(figures(False, "adapter_exact_match"), digits=4),
        "merged_adapter_exact_match": spread(figures(True, "adapter_exact_match"), digits=4),
        "answers_differing": max(
            sum(a != b for a, b in zip(run, reference, strict=True)) for run in answers[False] + answers[True]
        ),
        "answers": len(reference),
        "cpu": describe_cpu(),
    }
    fixed = fixed_length_runs(experiment, candidates, prompts, settings.generation, repeats=case.repeats)
    for name in ("base", "attached", "merged"):
        summary[f"fixed_length_{name}_ms_per_step"] = spread(
            [r["ms_per_step"] for r in fixed if r["model"] == name]
        )
    print(json.dumps(summary), flush=True)
    append_jsonl(case.out, [*runs, *fixed, summary])
    return 0


def fixed_length_runs(
    experiment: Any,
    candidates: list[Candidate],
    prompts: list[Prompt],
    generation: GenerationSettings,
    *,
    repeats: int,
) -> list[dict[str, Any]]:
    """The same work for each model: the report's first batch of prompts, every answer held to
    max_new_tokens (min_new_tokens), through the dequantized base, the first adapter attached to a copy of
    it and the adapter merged into one (analysis.generate.merged_copy); ms per forward pass, alternating."""
    import copy

    import torch
    from peft import PeftModel

    from analysis.experiment import resolve_base_model
    from analysis.generate import merged_copy, render_prompts
    from trainable.data import choose_chat_template
    from trainable.model import load_base_model, load_tokenizer

    path, model_settings = resolve_base_model(experiment), experiment.model_settings
    tokenizer = load_tokenizer(path, model_settings)
    template = experiment.summary.chat_template or choose_chat_template(
        tokenizer, experiment.data_settings.chat_template
    )
    texts = sorted(render_prompts(prompts, tokenizer, template), key=len)[: generation.batch_size]
    tokenizer.padding_side = "left"
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    base = report.dequantized_for_generation(
        load_base_model(path, model_settings, device="cpu"), model_settings
    )
    adapter = next(c.adapter_path for c in candidates if c.adapter_path)
    models = {
        "base": base,
        "attached": PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval(),
        "merged": merged_copy(base, adapter),
    }
    steps = generation.max_new_tokens
    rows = []
    for repeat in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            with torch.inference_mode():
                model.generate(
                    **inputs,
                    max_new_tokens=steps,
                    min_new_tokens=steps,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "fixed_length": True,
                    "repeat": repeat,
                    "model": name,
                    "prompts": len(texts),
                    "steps": steps,
                    "seconds": round(seconds, 2),
                    "ms_per_step": round(1000 * seconds / steps, 2),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def decoding_steps(generations: pd.DataFrame, batch_size: int) -> dict[str, int]:
    """Forward passes each candidate's generation made: generate_batched's batches (prompts sorted by
    length, `batch_size` at a time), each running until its longest answer ends. Tokens/s alone favours
    long answers: a batch of short ones still waits for its longest."""
    steps = {}
    for candidate, rows in generations.groupby("candidate", sort=False):
        lengths = [
            n
            for _, n in sorted(
                zip(rows["prompt"].str.len(), rows["new_tokens"], strict=True), key=lambda pair: pair[0]
            )
        ]
        steps[str(candidate)] = sum(
            max(lengths[i : i + batch_size]) for i in range(0, len(lengths), batch_size)
        )
    return steps


if __name__ == "__main__":
    raise SystemExit(main())
