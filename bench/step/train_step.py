"""Training-step benchmark: this project's step against the textbook QLoRA recipe, same process, same model,
same batches, each case repeated, reported as the median and range over the repeats.

    python -m bench.step.train_step --out results/                        # fixed and realistic, 7B shape
    python -m bench.step.train_step --cases fixed,memory --repeats 5       # any cases, more repeats
    python -m bench.step.train_step --shape small --cases fixed --steps 3  # checks the script in a minute

Both recipes come from `bench.recipes`: the textbook (transformers + bitsandbytes NF4 with double quant and
bf16 compute, `prepare_model_for_kbit_training`, peft LoRA alpha 2r dropout 0.05, padded batches) and the
model a trial trains (`trainable.model` + `trainable.fast`, LoRA weights in bf16 and trl's fused LM head as
trl's SFTTrainer sets them up, padding-free batches from trl's collator). Both train with bitsandbytes'
PagedAdamW32bit under bf16 autocast in a plain loop.

Why repeats: the project's step is bound by the CPU launching kernels, so noise on a shared host moves it by
tens of percent between runs while the textbook's barely moves; one run's ratio says little. Every repeat
builds each recipe of a case afresh and trains it on the same batches (drawn from `--seed` and the step's
index), the textbook beside the project each time, in alternating order (odd repeats run the case's
variants in reverse) so that drift during the run favours neither side.

Counted per run: tokens/s of real tokens (never padding) over the measured steps; the median step time
(synchronized before and after each step) after the warm-up steps; peak memory =
`torch.cuda.max_memory_allocated` from before the model load (bitsandbytes' paged optimizer states live
outside it, the same for both); MFU against 989 TFLOP/s dense bf16 with model FLOPs per real token =
4 N + 12 L d s (forward 2N + input-gradient backward 2N over all N parameters, LoRA weight gradients and
recomputation not counted; attention with s = the token's own example length).

Written under --out: train_step.jsonl (one line per repeat of each recipe of each case),
train_step-summary.jsonl (per case and recipe: median, min and max over the repeats of the ratio to the
same repeat's textbook and of the step time, and the step time's spread = (max - min) / median), and with
--profile, profile.txt (a torch.profiler table of both recipes at the fixed shape).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from bench.recipes import (
    ALL_LINEAR,
    LLAMA2_VOCAB,
    QV,
    SHAPES,
    Batches,
    Example,
    LlamaShape,
    build_project_model,
    build_textbook_model,
    fixed_batches,
    make_checkpoint,
    packed_batch,
    padded_batch,
    prepare_like_sft_trainer,
    realistic_batches,
)
from bench.records import append_jsonl

PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16
MEMORY_MARGIN_GIB = 0.25  # left free under the textbook's peak when spending memory on unchecked layers
Recipe = Literal["textbook", "project"]


@dataclass(frozen=True)
class Variant:
    """One recipe of a case: the textbook, or the project with `options` for `build_project_model`.
    `within_textbook_peak` gives the project's fast path, as activation memory, what the case's textbook
    peak leaves above the project's own (measured in the same run)."""

    label: str
    recipe: Recipe
    options: dict[str, Any] = field(default_factory=dict)
    within_textbook_peak: bool = False


TEXTBOOK = Variant("textbook", "textbook")
PROJECT = Variant("project", "project")


@dataclass(frozen=True)
class Case:
    """What one repeat measures: every variant, trained on the same batches for the same steps."""

    name: str
    targets: tuple[str, ...]
    r: int
    batches: Batches
    steps: int
    warmup: int
    variants: tuple[Variant, ...]


def build_cases(
    shape_name: str, *, steps: int, warmup: int, realistic_steps: int, seed: int
) -> dict[str, Case]:
    """The benchmark's cases; on the small shape, the same cases with an eighth of the lengths."""
    seq, mean, cap = (1024, 300, 2048) if shape_name == "7b" else (128, 38, 256)
    fixed, long = fixed_batches(4, seq, seed=seed), fixed_batches(8, 2 * seq, seed=seed)
    ladder = (
        TEXTBOOK,
        Variant("padding-free+bf16-residual", "project", {"kernels": False, "fuse_lora": False}),
        Variant("+fused-lora", "project", {"kernels": False}),
        PROJECT,
    )
    memory = (
        TEXTBOOK,
        PROJECT,
        Variant("no-checkpointing", "project", {"gradient_checkpointing": False}),
        Variant("unchecked-within-textbook-peak", "project", within_textbook_peak=True),
    )
    both = (TEXTBOOK, PROJECT)
    realistic8 = realistic_batches(8, mean=mean, cap=cap, seed=seed)
    realistic4 = realistic_batches(4, mean=mean, cap=cap, seed=seed)
    cases = [
        Case("fixed", ALL_LINEAR, 16, fixed, steps, warmup, both),
        Case("fixed-qv", QV, 16, fixed, steps, warmup, both),
        Case("ladder", ALL_LINEAR, 16, fixed, steps, warmup, ladder),
        Case("memory", ALL_LINEAR, 16, fixed, steps, warmup, memory),
        Case("long", ALL_LINEAR, 16, long, max(3, steps // 2), 2, both),  # 2-2.5 s a textbook step
        Case("realistic", ALL_LINEAR, 16, realistic8, realistic_steps, warmup, both),
        Case("realistic-4", ALL_LINEAR, 16, realistic4, realistic_steps, warmup, both),
    ]
    return {case.name: case for case in cases}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    p.add_argument("--shape", choices=["7b", "small"], default="7b", help="small: checks the script quickly")
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="random-weight checkpoint of the shape, made there if missing (default /tmp/qlora-bench-SHAPE)",
    )
    p.add_argument(
        "--cases",
        default="fixed,realistic",
        help="comma-separated, of: fixed, fixed-qv, ladder, memory, long, realistic, realistic-4",
    )
    p.add_argument("--repeats", type=int, default=3, help="runs of each case in this process (at least 3)")
    p.add_argument("--steps", type=int, default=8, help="measured steps at fixed lengths")
    p.add_argument("--realistic-steps", type=int, default=40, help="measured steps at realistic lengths")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--seed", type=int, default=0, help="draws the batches: the same for every recipe and repeat"
    )
    p.add_argument(
        "--profile", action="store_true", help="a torch.profiler table of both recipes, fixed case"
    )
    args = p.parse_args(argv)
    all_cases = build_cases(
        args.shape, steps=args.steps, warmup=args.warmup, realistic_steps=args.realistic_steps, seed=args.seed
    )
    names = [n for n in args.cases.split(",") if n]
    unknown = [n for n in names if n not in all_cases]
    if unknown or not names:
        p.error(
            f"--cases {args.cases!r}: unknown {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(all_cases)}"
        )
    if args.repeats < 3:
        p.error(f"--repeats {args.repeats}: at least 3, a median and a range need three runs")
    if args.realistic_steps < 40 and any(all_cases[n].batches.kind == "realistic" for n in names):
        p.error(
            f"--realistic-steps {args.realistic_steps}: at least 40, or the ratio depends on which "
            "few uneven batches were drawn"
        )
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (bitsandbytes' 4-bit GPU kernels and the project's CUDA fast path)")

    args.out.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[args.shape]
    checkpoint = make_checkpoint(
        args.checkpoint or Path(f"/tmp/qlora-bench-{args.shape}"),
        shape,
        vocab_size=LLAMA2_VOCAB,
        device="cuda",
    )
    bench = Bench(checkpoint, shape, LLAMA2_VOCAB)
    records: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for name in names:
            case = all_cases[name]
            # Alternate the order so that drift during the run (clocks, other tenants) favours neither side.
            variants = case.variants if repeat % 2 == 0 else tuple(reversed(case.variants))
            for variant in variants:
                record = bench.run(case, variant, repeat=repeat, peaks=peaks_of(records, case.name))
                print(json.dumps(record), flush=True)
                append_jsonl(args.out / "train_step.jsonl", [record])
                records.append(record)
    summary = summarize(records)
    append_jsonl(args.out / "train_step-summary.jsonl", summary)
    print(format_summary(summary), flush=True)
    if args.profile:
        bench.profile(all_cases["fixed"], TEXTBOOK, args.out)
        bench.profile(all_cases["fixed"], PROJECT, args.out)


# ------------------------------------------------------------------------------------------- runner


class Bench:
    """Builds a case's recipes on one checkpoint and times their steps."""

    def __init__(self, checkpoint: Path, shape: LlamaShape, vocab_size: int) -> None:
        self.checkpoint, self.shape, self.vocab_size = checkpoint, shape, vocab_size
        self.parameters = shape.parameters(vocab_size=vocab_size)

    def build(self, case: Case, variant: Variant, peaks: dict[str, float]) -> tuple[Any, dict[str, Any], Any]:
        """(model, the options it was built with, the fast path's report or None)."""
        if variant.recipe == "textbook":
            model = build_textbook_model(self.checkpoint, targets=case.targets, r=case.r, **variant.options)
            return model, dict(variant.options), None
        options = dict(variant.options)
        if variant.within_textbook_peak:
            options["activation_memory_gib"] = memory_left_under_textbook(peaks, case=case.name)
            options["tokens_per_batch"] = case.batches.batch_size * case.batches.length
        model, report = build_project_model(self.checkpoint, targets=case.targets, r=case.r, **options)
        prepare_like_sft_trainer(model)
        return model, options, report

    def step_fn(self, recipe: Recipe, model: Any, optimizer: Any) -> Callable[[list[Example]], torch.Tensor]:
        def step(examples: list[Example]) -> torch.Tensor:
            if recipe == "textbook":
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(**padded_batch(examples, "cuda")).loss
            else:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(**packed_batch(examples, "cuda"), fused_lm_head=True, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        return step

    def run(self, case: Case, variant: Variant, *, repeat: int, peaks: dict[str, float]) -> dict[str, Any]:
        import bitsandbytes as bnb

        cleanup()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        model, options, report = self.build(case, variant, peaks)
        build_s = time.perf_counter() - start
        optimizer = bnb.optim.PagedAdamW32bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
        model.train()
        step = self.step_fn(variant.recipe, model, optimizer)
        times, tokens, padded_tokens, flops, losses = [], [], [], [], []
        for i in range(case.warmup + case.steps):
            examples = case.batches.examples(i, vocab_size=self.vocab_size)
            torch.cuda.synchronize()
            t = time.perf_counter()
            loss = step(examples)
            torch.cuda.synchronize()
            if i >= case.warmup:
                times.append(time.perf_counter() - t)
                lengths = [len(e["input_ids"]) for e in examples]
                tokens.append(sum(lengths))
                padded_tokens.append(len(lengths) * max(lengths))
                flops.append(sum(n * self.flops_per_token(n) for n in lengths))
                losses.append(float(loss))
        seconds = sum(times)
        record = {
            "case": case.name,
            "repeat": repeat,
            "label": variant.label,
            "recipe": variant.recipe,
            "targets": "all"
            if case.targets == ALL_LINEAR
            else "+".join(t.split("_")[0] for t in case.targets),
            "r": case.r,
            "batches": case.batches.label,
            "seed": case.batches.seed,
            "steps": case.steps,
            "warmup": case.warmup,
            "tokens_per_s": round(sum(tokens) / seconds, 1),
            "step_s_median": round(statistics.median(times), 4),
            "step_s": [round(s, 4) for s in times],
            "mfu": round(sum(flops) / seconds / (PEAK_TFLOPS * 1e12), 4),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "loss_first": round(losses[0], 4),
            "loss_last": round(losses[-1], 4),
            "build_s": round(build_s, 1),
            "real_tokens_per_step": round(sum(tokens) / len(tokens)),
            "padded_tokens_per_step": round(sum(padded_tokens) / len(padded_tokens)),
            "fast_path": fast_path_summary(report),
            "options": options,
            "device": torch.cuda.get_device_name(),
        }
        del model, optimizer, step
        cleanup()
        return record

    def profile(self, case: Case, variant: Variant, out: Path) -> None:
        """Two steps under torch.profiler after two warm-up steps; appends the tables to profile.txt."""
        import bitsandbytes as bnb
        from torch.profiler import ProfilerActivity, profile

        cleanup()
        model, _, _ = self.build(case, variant, {})
        optimizer = bnb.optim.PagedAdamW32bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
        model.train()
        step = self.step_fn(variant.recipe, model, optimizer)
        for i in range(2):
            step(case.batches.examples(i, vocab_size=self.vocab_size))
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(2, 4):
                step(case.batches.examples(i, vocab_size=self.vocab_size))
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60)
        text = (
            f"{variant.label} {case.batches.label} ({torch.cuda.get_device_name()}), 2 steps\n\n"
            f"{kernel_breakdown(prof)}\n\n{table}\n"
        )
        with open(out / "profile.txt", "a") as f:
            f.write(text + "\n" + "=" * 100 + "\n")
        print(text[:6000], flush=True)
        del model, optimizer, step, prof
        cleanup()

    def flops_per_token(self, length: int) -> float:
        return 4 * self.parameters + 12 * self.shape.num_hidden_layers * self.shape.hidden_size * length


def fast_path_summary(report: Any) -> dict[str, Any] | None:
    """What the fast path changed (None for the textbook), without the long list of cast module names."""
    if report is None:
        return None
    return {k: v for k, v in vars(report).items() if k != "cast_to_compute_dtype"}


def cleanup() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def kernel_breakdown(prof: Any) -> str:
    """GPU time of the profiled steps by kind of kernel (from kernel names), largest first."""
    kernels = [(k.name, k.duration) for event in prof.events() for k in getattr(event, "kernels", [])]
    if not kernels:  # newer profilers list kernels as device-side events instead
        kernels = [(e.name, e.device_time) for e in prof.events() if e.device_type.name == "CUDA"]
    groups: dict[str, float] = {}
    for raw, us in kernels:
        name = raw.lower()
        if "flash" in name or "fmha" in name or "attention" in name:
            kind = "attention"
        elif "dequant" in name:
            kind = "bnb dequantize"
        elif any(k in name for k in ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul")):
            kind = "matmul (GEMM)"
        elif "optimizer" in name or "adam" in name:
            kind = "optimizer"
        elif "memcpy" in name or "memset" in name:
            kind = "copy/memset"
        elif "at::native" in name or "at_cuda_detail" in name:
            kind = "elementwise/reduction (PyTorch)"
        else:
            kind = "other (Triton: Liger, trl LM head)"
        groups[kind] = groups.get(kind, 0.0) + us
    total = sum(groups.values()) or 1.0
    lines = [f"{'kind':36s} {'ms':>9s} {'share':>6s}"]
    for kind, us in sorted(groups.items(), key=lambda kv: -kv[1]):
        lines.append(f"{kind:36s} {us / 1000:9.1f} {us / total:6.1%}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class Spread:
    """The median of a few runs and their range; `relative` = (high - low) / median."""

    median: float
    low: float
    high: float

    @property
    def relative(self) -> float:
        return (self.high - self.low) / self.median

    def as_dict(self, digits: int = 4) -> dict[str, float]:
        return {
            "median": round(self.median, digits),
            "min": round(self.low, digits),
            "max": round(self.high, digits),
            "spread": round(self.relative, 4),
        }


def spread(values: Sequence[float]) -> Spread:
    if not values:
        raise ValueError("spread of no values")
    return Spread(statistics.median(values), min(values), max(values))


def memory_left_under_textbook(peaks: dict[str, float], *, case: str) -> float:
    """GiB the project may spend on unchecked layers and still peak under the textbook (less a margin)."""
    if "textbook" not in peaks or "project" not in peaks:
        raise ValueError(f"case {case}: the textbook's and the project's peaks are needed first, got {peaks}")
    return round(max(0.0, peaks["textbook"] - peaks["project"] - MEMORY_MARGIN_GIB), 2)


def peaks_of(records: Iterable[dict[str, Any]], case: str) -> dict[str, float]:
    """The peak memory of each label of `case` measured so far (memory does not vary between repeats)."""
    return {r["label"]: r["peak_gib"] for r in records if r["case"] == case}


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per case and label, over the repeats: the ratio of its tokens/s to the textbook's of the same case
    and repeat, its tokens/s, and its median step time, each as median, min, max and spread."""
    textbook = {(r["case"], r["repeat"]): r["tokens_per_s"] for r in records if r["recipe"] == "textbook"}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["case"], r["label"]), []).append(r)
    summary = []
    for (case, label), runs in groups.items():
        ratios = [
            r["tokens_per_s"] / textbook[case, r["repeat"]] for r in runs if (case, r["repeat"]) in textbook
        ]
        summary.append(
            {
                "case": case,
                "label": label,
                "targets": runs[0]["targets"],
                "batches": runs[0]["batches"],
                "repeats": len(runs),
                "steps": runs[0]["steps"],
                "ratio": spread(ratios).as_dict(3) if ratios else None,
                "tokens_per_s": spread([r["tokens_per_s"] for r in runs]).as_dict(1),
                "step_s": spread([r["step_s_median"] for r in runs]).as_dict(4),
                "peak_gib": max(r["peak_gib"] for r in runs),
                "mfu_median": round(statistics.median(r["mfu"] for r in runs), 4),
            }
        )
    return summary


def format_summary(summary: Sequence[dict[str, Any]]) -> str:
    lines = [
        f"{'case':12s} {'label':32s} {'n':>2s} {'ratio median [min-max]':>24s} "
        f"{'tok/s median':>12s} {'step spread':>11s} {'peak GiB':>8s}"
    ]
    for s in summary:
        ratio = s["ratio"]
        text = f"{ratio['median']:.2f} [{ratio['min']:.2f}-{ratio['max']:.2f}]" if ratio else "-"
        lines.append(
            f"{s['case']:12s} {s['label'][:32]:32s} {s['repeats']:2d} {text:>24s} "
            f"{s['tokens_per_s']['median']:12.0f} {s['step_s']['spread']:11.1%} {s['peak_gib']:8.2f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
