"""Training-step benchmark: the textbook QLoRA recipe and this project's step, in the same run, same model.

    python bench/gpu/train_step.py --out results/            # all cases, Llama-2-7B shape (random weights)
    python bench/gpu/train_step.py --tiny --cases fixed       # a 2-layer model: checks the script in seconds

Textbook recipe (as in GPU.md's reference figures): transformers `from_pretrained` with bitsandbytes NF4 +
double quant + bf16 compute, `prepare_model_for_kbit_training` (reentrant gradient checkpointing), peft
LoRA (alpha 2r, dropout 0.05), bitsandbytes PagedAdamW32bit, plain loop under bf16 autocast, batches
padded to their longest example. Project: the same base and LoRA built by `trainable.model`, the CUDA
fast path (`trainable.fast.apply_fast_path`), LoRA weights in bf16 and trl's fused LM head as trl's
SFTTrainer sets them up, padding-free batches from trl's collator (what a trial's SFTTrainer runs).

Counted: tokens/s of real tokens (never padding), median step time (sync before and after each step) after
warm-up steps; peak memory = torch.cuda.max_memory_allocated from before the model load (bitsandbytes'
paged optimizer states live outside it, the same in both). MFU against 989 TFLOP/s dense bf16 with model
FLOPs per real token = 4 N (forward 2N + input-gradient backward 2N, N = all parameters; LoRA weight
gradients and recomputation not counted) + 12 L d s (attention, s = the token's own example length),
GPU.md's convention. Writes train_step.jsonl (one line per case) and profile.txt under --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere: the repo's packages

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QV = ["q_proj", "v_proj"]
PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    p.add_argument("--checkpoint", default="/tmp/llama7b-shape-32k", help="made here if missing")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model: checks the script quickly")
    p.add_argument("--cases", default="ladder,fixed,long,realistic,memory")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="a torch.profiler table of both recipes at 4x1024")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = make_checkpoint(Path(args.checkpoint), tiny=args.tiny)
    bench = Bench(args.checkpoint, cfg, out, steps=args.steps, warmup=args.warmup)
    cases = set(args.cases.split(","))
    seq = 128 if args.tiny else 1024
    if "ladder" in cases:  # each piece's share, 4 x 1024, all linear layers, r=16
        bench.run("textbook", ALL, 16, fixed(4, seq))
        bench.run("padding-free+bf16-residual", ALL, 16, fixed(4, seq), kernels=False, fuse_lora=False)
        bench.run("+fused-lora", ALL, 16, fixed(4, seq), kernels=False)
        bench.run("project", ALL, 16, fixed(4, seq))
    if "fixed" in cases:
        if "ladder" not in cases:
            bench.run("textbook", ALL, 16, fixed(4, seq))
            bench.run("project", ALL, 16, fixed(4, seq))
        bench.run("textbook", QV, 16, fixed(4, seq))
        bench.run("project", QV, 16, fixed(4, seq))
    if "long" in cases:
        steps = dict(steps=max(3, args.steps // 2), warmup=2)
        bench.run("textbook", ALL, 16, fixed(8, 2 * seq), **steps)
        bench.run("project", ALL, 16, fixed(8, 2 * seq), **steps)
        bench.run("textbook", QV, 16, fixed(8, 2 * seq), **steps)
        bench.run("project", QV, 16, fixed(8, 2 * seq), **steps)
    if "realistic" in cases:
        for batch in (8, 4):
            bench.run("textbook", ALL, 16, realistic(batch, tiny=args.tiny))
            bench.run("project", ALL, 16, realistic(batch, tiny=args.tiny))
    if "memory" in cases:
        # Activation memory vs recomputation at 4 x 1024: no checkpointing at all, then as many unchecked
        # layers as fit within the textbook recipe's peak.
        done = [r for r in bench.results if r["label"] == "project" and r["targets"] == "all"
                and r["shape"] == f"4x{seq}"]  # fmt: skip
        base = done[0] if done else bench.run("project", ALL, 16, fixed(4, seq))
        none = bench.run(
            "project", ALL, 16, fixed(4, seq), gradient_checkpointing=False, label="no-checkpointing"
        )
        textbook_peak = next((r["peak_gib"] for r in bench.results if r["recipe"] == "textbook"
                              and r["targets"] == "all" and r["shape"] == f"4x{seq}"), None)  # fmt: skip
        if textbook_peak is not None:
            per_layer = (none["peak_gib"] - base["peak_gib"]) / cfg.num_hidden_layers
            budget = max(0.0, textbook_peak - base["peak_gib"] - 0.25)  # GiB left under the textbook's peak
            bench.run("project", ALL, 16, fixed(4, seq), activation_memory_gib=budget, tokens_per_batch=4 * seq,
                      label=f"unchecked-within-textbook-peak ({per_layer:.2f} GiB/layer measured)")  # fmt: skip
    if args.profile:
        bench.profile("textbook", ALL, 16, fixed(4, seq))
        bench.profile("project", ALL, 16, fixed(4, seq))
    print_table(bench.results)


# ------------------------------------------------------------------------------------------- data


def fixed(batch: int, seq: int) -> dict[str, Any]:
    """Random tokens, every example `seq` long (no padding), every token a target."""
    return {"shape": f"{batch}x{seq}", "lengths": lambda rng: [seq] * batch, "prompt_fraction": 0.0}


def realistic(batch: int, *, tiny: bool) -> dict[str, Any]:
    """Example lengths like an instruction dataset's: log-normal, mean about 300 tokens, cut to 2048; the
    first 40% of each example is the prompt (no loss), as in chat fine-tuning."""
    mu, cap = math.log(300 / 8 if tiny else 300) - 0.5, 256 if tiny else 2048
    return {
        "shape": f"{batch}x~300 (log-normal)" if not tiny else f"{batch}x~38",
        "lengths": lambda rng: [max(8, min(cap, int(rng.lognormvariate(mu, 1.0)))) for _ in range(batch)],
        "prompt_fraction": 0.4,
    }


def make_examples(case: dict[str, Any], step: int, vocab: int) -> list[dict[str, list[int]]]:
    rng = random.Random(1000 + step)  # the same examples for both recipes at each step
    examples = []
    for length in case["lengths"](rng):
        ids = [rng.randrange(vocab) for _ in range(length)]
        prompt = int(length * case["prompt_fraction"])
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return examples


def padded_batch(examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """The textbook collation: right-padded to the longest example, pads masked out of attention and loss."""
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], mask[i, :n], labels[i, :n] = torch.tensor(e["input_ids"]), 1, torch.tensor(e["labels"])
    if bool(mask.all()):
        return {"input_ids": ids, "labels": labels}  # as the reference script: no mask when nothing is padded
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def packed_batch(examples: list[dict[str, list[int]]]) -> dict[str, Any]:
    """What a trial's SFTTrainer collates with padding_free=True."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)


# ------------------------------------------------------------------------------------------- models


def make_checkpoint(path: Path, *, tiny: bool) -> Any:
    """A Llama-2-7B-shaped checkpoint with random weights (bf16 safetensors, as a hub download leaves it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)  # fmt: skip
    else:
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)  # fmt: skip
    if not (path / "config.json").exists():
        t = time.perf_counter()
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(path)
        del model
        torch.cuda.empty_cache()
        print(f"made {path} in {time.perf_counter() - t:.1f} s", flush=True)
    return cfg


def textbook_model(ckpt: str, targets: list[str], r: int, *, gradient_checkpointing: bool = True) -> Any:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": 0})  # fmt: skip
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.05, bias="none",
                      task_type="CAUSAL_LM")  # fmt: skip
    return get_peft_model(model, lora)


def project_model(ckpt: str, targets: list[str], r: int, *, gradient_checkpointing: bool = True,
                  **fast: Any) -> tuple[Any, Any]:  # fmt: skip
    """The model a trial trains: trainable.model's 4-bit base and LoRA, the fast path, then what trl's
    SFTTrainer does to a quantized PEFT model (LoRA weights to bf16, its fused LM head)."""
    from trl.trainer.utils import add_fused_lm_head

    from trainable.fast import apply_fast_path
    from trainable.model import build_lora_model, load_base_model
    from trainable.settings import LoraSettings, ModelSettings

    settings = ModelSettings(
        name_or_path=ckpt, gradient_checkpointing=gradient_checkpointing, cache_quantized=False
    )
    lora = LoraSettings(r=r, lora_alpha=2 * r, target_modules=",".join(targets), lora_dropout=0.05)
    model = build_lora_model(load_base_model(ckpt, settings, device="cuda"), lora,
                             gradient_checkpointing=gradient_checkpointing)  # fmt: skip
    report = apply_fast_path(model, **fast)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
    return model, report


# ------------------------------------------------------------------------------------------- runner


class Bench:
    def __init__(self, ckpt: str, cfg: Any, out: Path, *, steps: int, warmup: int) -> None:
        self.ckpt, self.cfg, self.out, self.steps, self.warmup = ckpt, cfg, out, steps, warmup
        self.n_params = count_params(cfg)
        self.results: list[dict[str, Any]] = []

    def build(self, recipe: str, targets: list[str], r: int, **kw: Any) -> tuple[Any, Any]:
        if recipe == "textbook":
            return textbook_model(self.ckpt, targets, r, **kw), None
        return project_model(self.ckpt, targets, r, **kw)

    def step_fn(self, recipe: str, model: Any, optimizer: Any) -> Any:
        def step(examples: list[dict[str, list[int]]]) -> float:
            batch = padded_batch(examples) if recipe == "textbook" else packed_batch(examples)
            batch = {k: v.cuda(non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            with torch.autocast("cuda", dtype=torch.bfloat16):
                if recipe == "textbook":
                    loss = model(**batch).loss
                else:
                    loss = model(**batch, fused_lm_head=True, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        return step

    def run(self, recipe: str, targets: list[str], r: int, case: dict[str, Any], *, steps: int | None = None,
            warmup: int | None = None, label: str | None = None, **kw: Any) -> dict[str, Any]:  # fmt: skip
        import bitsandbytes as bnb

        steps, warmup = steps or self.steps, warmup if warmup is not None else self.warmup
        cleanup()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        model, report = self.build(recipe, targets, r, **kw)
        build_s = time.perf_counter() - t
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = bnb.optim.PagedAdamW32bit(params, lr=2e-4)
        model.train()
        step = self.step_fn(recipe, model, optimizer)
        times, tokens, flops, losses = [], [], [], []
        for i in range(warmup + steps):
            examples = make_examples(case, i, self.cfg.vocab_size)
            torch.cuda.synchronize()
            t = time.perf_counter()
            loss = step(examples)
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t)
                lengths = [len(e["input_ids"]) for e in examples]
                tokens.append(sum(lengths))
                flops.append(sum(n * self.flops_per_token(n) for n in lengths))
                losses.append(float(loss))
        seconds = sum(times)
        result = {
            "recipe": recipe,
            "label": label or recipe,
            "targets": "all" if targets == ALL else "+".join(t.split("_")[0] for t in targets),
            "r": r,
            "shape": case["shape"],
            "tokens_per_s": round(sum(tokens) / seconds, 1),
            "step_s_median": round(statistics.median(times), 4),
            "mfu": round(sum(flops) / seconds / (PEAK_TFLOPS * 1e12), 4),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "loss_last": round(losses[-1], 4),
            "build_s": round(build_s, 1),
            "steps": steps,
            "real_tokens_per_step": round(sum(tokens) / len(tokens)),
            "fast_path": None if report is None else fast_path_summary(report),
            "options": {k: v for k, v in kw.items()},
            "device": torch.cuda.get_device_name(),
        }
        print(json.dumps(result), flush=True)
        with open(self.out / "train_step.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")
        self.results.append(result)
        del model, optimizer, step
        cleanup()
        return result

    def profile(self, recipe: str, targets: list[str], r: int, case: dict[str, Any]) -> None:
        import bitsandbytes as bnb
        from torch.profiler import ProfilerActivity, profile

        cleanup()
        model, _ = self.build(recipe, targets, r)
        optimizer = bnb.optim.PagedAdamW32bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
        model.train()
        step = self.step_fn(recipe, model, optimizer)
        for i in range(2):
            step(make_examples(case, i, self.cfg.vocab_size))
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(2):
                step(make_examples(case, 10 + i, self.cfg.vocab_size))
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60)
        kernels = kernel_breakdown(prof)
        text = f"{recipe} {case['shape']} ({torch.cuda.get_device_name()}), 2 steps\n\n{kernels}\n\n{table}\n"
        with open(self.out / "profile.txt", "a") as f:
            f.write(text + "\n" + "=" * 100 + "\n")
        print(text[:6000], flush=True)
        del model, optimizer, step, prof
        cleanup()

    def flops_per_token(self, length: int) -> float:
        c = self.cfg
        return 4 * self.n_params + 12 * c.num_hidden_layers * c.hidden_size * length


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


def fast_path_summary(report: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(report).items() if k != "cast_to_compute_dtype"}


def count_params(cfg: Any) -> int:
    d, ff, layers, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = d * cfg.num_key_value_heads // cfg.num_attention_heads
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * ff + 2 * d
    return layers * per_layer + 2 * vocab * d + d


def cleanup() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"\n{'case':58s} {'tok/s':>8s} {'ratio':>6s} {'MFU':>6s} {'peak GiB':>8s}")
    textbook: dict[tuple[str, str], float] = {}
    for r in results:
        key = (r["targets"], r["shape"])
        if r["recipe"] == "textbook":
            textbook[key] = r["tokens_per_s"]
        ratio = r["tokens_per_s"] / textbook[key] if key in textbook else float("nan")
        name = f"{r['label']} {r['targets']} r{r['r']} {r['shape']}"
        print(f"{name[:58]:58s} {r['tokens_per_s']:8.0f} {ratio:6.2f} {r['mfu']:6.1%} {r['peak_gib']:8.2f}")


if __name__ == "__main__":
    main()
