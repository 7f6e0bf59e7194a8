"""The report's generation on a CPU: the 4-bit base against the base dequantized once, in one process.

    python -m bench.generation.dequantized EXPERIMENT --repeats 3 \
        --out bench/generation/results/cpu-report-generation-DATE.jsonl

Runs analysis.report.generate_answers (every finalist and the base answering the report's prompts, as
`python -m analysis.report` does) on EXPERIMENT, alternately with the 4-bit layers as loaded and with
analysis.report.dequantized_for_generation, --repeats times each. One JSON line per run (seconds, new
tokens, per candidate), then a summary: the median and range of each mode's seconds, of the ratio of the
pairs, and whether every answer was the same in both modes.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any
from unittest import mock

from analysis import report
from bench.generation.cpu_case import load_case
from bench.records import append_jsonl, spread
from trainable.hardware import describe_cpu


def main(argv: list[str] | None = None) -> int:
    case = load_case(__doc__.split("\n\n")[0], argv)
    experiment, settings, candidates, prompts = case.experiment, case.settings, case.candidates, case.prompts
    runs: list[dict[str, Any]] = []
    answers: dict[bool, list[list[str]]] = {False: [], True: []}
    for repeat in range(case.repeats):
        for dequantize in (False, True):
            # The 4-bit run: the report's code with its dequantizing step left out.
            keep_4bit = mock.patch.object(
                report, "dequantized_for_generation", side_effect=lambda model, _: model
            )
            start = time.perf_counter()
            with contextlib.nullcontext() if dequantize else keep_4bit:
                generations, timing = report.generate_answers(
                    experiment, candidates, prompts, settings, device="cpu"
                )
            run = {
                "repeat": repeat,
                "dequantized": dequantize,
                "seconds": round(time.perf_counter() - start, 2),
                "generation_s": round(float(timing["seconds"].sum()), 2),
                "prompts": len(prompts),
                "per_candidate": timing.round(2).to_dict("records"),
                "cpu": describe_cpu(),
            }
            answers[dequantize].append(list(generations["answer"]))
            runs.append(run)
            print(json.dumps(run), flush=True)
    four_bit = [r["seconds"] for r in runs if not r["dequantized"]]
    dequantized = [r["seconds"] for r in runs if r["dequantized"]]
    summary = {
        "summary": True,
        "prompts": len(prompts),
        "candidates": len(candidates),
        "four_bit_s": spread(four_bit),
        "dequantized_s": spread(dequantized),
        "speedup": spread([a / b for a, b in zip(four_bit, dequantized, strict=True)]),
        "same_answers": all(a == answers[False][0] for a in answers[False] + answers[True]),
        "cpu": describe_cpu(),
    }
    print(json.dumps(summary), flush=True)
    append_jsonl(case.out, [*runs, summary])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
