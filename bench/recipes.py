"""What the GPU benchmarks and the GPU tests both build: the textbook QLoRA recipe and this project's, the
Llama shapes they run on, and the batches they are fed.

    from bench.recipes import SHAPES, build_project_model, build_textbook_model, realistic_batches

Why this module lives in `bench/` (a package at the repository root) and not in the installed packages:
the textbook recipe is a reference that no trial ever runs, so it does not belong in what users install,
yet the benchmark that times the project against it (`python -m bench.step.train_step`) and the test that
checks the project computes what it computes (`python -m pytest tests/gpu`) must build the very same two
models. Both are run from the repository root, which puts the root on `sys.path`, and both reach the
project through its installed packages (`trainable`): the project's side is built only by the functions a
trial calls, so a benchmark cannot time a path the product no longer takes.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

Example = dict[str, list[int]]

ALL_LINEAR: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QV: tuple[str, ...] = ("q_proj", "v_proj")
LLAMA2_VOCAB = 32000  # Llama-2's tokenizer: with it the 7B shape has Llama-2-7B's 6.74 B parameters


# ------------------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class LlamaShape:
    """A Llama decoder's dimensions, without the vocabulary (that comes from the tokenizer, if any)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int

    def config(self, *, vocab_size: int, **extra: Any) -> Any:  # transformers.LlamaConfig
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=vocab_size, **dataclasses.asdict(self), **extra)

    def parameters(self, *, vocab_size: int) -> int:
        """All parameters, untied embeddings and LM head (what the 7B shape's 6.74 B counts)."""
        d, ff = self.hidden_size, self.intermediate_size
        kv = d * self.num_key_value_heads // self.num_attention_heads
        per_layer = 2 * d * d + 2 * d * kv + 3 * d * ff + 2 * d  # q,o + k,v + gate,up,down + two norms
        return self.num_hidden_layers * per_layer + 2 * vocab_size * d + d


ShapeName = Literal["7b", "1b", "small", "tiny"]
SHAPES: dict[ShapeName, LlamaShape] = {
    # Llama-2-7B. No 7B weights can be downloaded where the benchmarks run; random ones train as fast.
    "7b": LlamaShape(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
    ),
    # TinyLlama-1.1B (Llama-2's architecture and tokenizer size): a 1B-class model for the packing bench.
    "1b": LlamaShape(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    ),
    # Large enough for real GEMM shapes and grouped-query attention, small enough to train 40 steps in
    # seconds: the GPU tests' model, and the benchmark's quick check of itself.
    "small": LlamaShape(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
    ),
    # The tests' tiny model: the whole GPU path of a sweep in a minute.
    "tiny": LlamaShape(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    ),
}


def make_checkpoint(
    path: Path,
    shape: LlamaShape,
    *,
    vocab_size: int | None = None,
    tokenizer_path: str | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> Path:
    """A Llama checkpoint with random weights saved as a hub download leaves one (bf16 safetensors), with
    the tokenizer at `tokenizer_path` (its vocabulary size) or none (`vocab_size`). Kept if it exists."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    if (vocab_size is None) == (tokenizer_path is None):
        raise ValueError("make_checkpoint: give exactly one of vocab_size or tokenizer_path")
    if (path / "config.json").exists():
        return path
    tokenizer, extra = None, {}
    if tokenizer_path is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        vocab_size = len(tokenizer)
        extra = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    assert vocab_size is not None
    config = shape.config(vocab_size=vocab_size, **extra)
    start = time.perf_counter()
    torch.manual_seed(seed)
    with torch.device(device):  # a 7B model initializes in seconds on a GPU, minutes on a CPU
        model: Any = LlamaForCausalLM(config)
        model = model.to(torch.bfloat16)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    params = sum(p.numel() for p in model.parameters())
    print(f"made {path}: {params / 1e9:.2f} B parameters in {time.perf_counter() - start:.1f} s", flush=True)
    return path


# ------------------------------------------------------------------------------------------- recipes


def build_textbook_model(
    path: str | Path,
    *,
    targets: tuple[str, ...] = ALL_LINEAR,
    r: int = 16,
    dropout: float = 0.05,
    gradient_checkpointing: bool = True,
) -> Any:  # peft.PeftModel
    """QLoRA as the tutorials write it, on GPU 0: transformers' `from_pretrained` with bitsandbytes NF4,
    double quantization and bf16 compute; `prepare_model_for_kbit_training` (fp32 norms, embeddings and
    head; reentrant gradient checkpointing); peft LoRA with alpha 2r on `targets`."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(path), quantization_config=quant, dtype=torch.bfloat16, device_map={"": 0}
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    lora = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=list(targets),
        lora_dropout=dropout,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def build_project_model(
    path: str | Path,
    *,
    targets: tuple[str, ...] = ALL_LINEAR,
    r: int = 16,
    dropout: float = 0.05,
    gradient_checkpointing: bool = True,
    kernels: bool = True,
    fuse_lora: bool = True,
    activation_memory_gib: float = 0.0,
    tokens_per_batch: int = 0,
) -> tuple[Any, Any]:  # (peft.PeftModel, trainable.fast.FastPathReport)
    """The model a CUDA trial trains, built by the trial's own functions: `trainable.model`'s 4-bit base
    (no quantized cache: every build quantizes, as the textbook's does) and LoRA (alpha 2r, as the
    textbook), then `trainable.fast.apply_fast_path` (the keywords after `gradient_checkpointing` are its
    options, for measuring each piece's share)."""
    from trainable.fast import apply_fast_path
    from trainable.model import build_lora_model, load_base_model
    from trainable.settings import Hyperparameters, ModelSettings

    settings = ModelSettings(
        name_or_path=str(path), gradient_checkpointing=gradient_checkpointing, cache_quantized=False
    )
    hparams = Hyperparameters(r=r, lora_alpha=2 * r, target_modules=",".join(targets), lora_dropout=dropout)
    base = load_base_model(str(path), settings, device="cuda")
    model = build_lora_model(base, hparams, gradient_checkpointing=gradient_checkpointing)
    report = apply_fast_path(
        model,
        kernels=kernels,
        fuse_lora=fuse_lora,
        activation_memory_gib=activation_memory_gib,
        tokens_per_batch=tokens_per_batch,
    )
    return model, report


def prepare_like_sft_trainer(model: Any) -> None:
    """What trl's SFTTrainer does to a quantized peft model before a trial's first step, so that a plain
    loop times the trial's step: LoRA weights to bf16, and trl's fused LM head (the loss in chunks, without
    the full logits; call the model with `fused_lm_head=True`)."""
    from trl.trainer.utils import add_fused_lm_head

    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))


# ------------------------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class Batches:
    """Each step's examples, drawn from `seed` and the step's index alone, so both recipes and every
    repeat of a benchmark train on exactly the same batches.

    Lengths are `length` tokens each (`kind="fixed"`), or log-normal with mean `length` and sigma 1 cut to
    [8, `cap`] (`kind="realistic"`: an instruction dataset's spread, most examples short, a few long).
    The first `prompt_fraction` of each example is prompt, without loss; tokens are uniform over the
    vocabulary (random weights learn nothing from real text either)."""

    kind: Literal["fixed", "realistic"]
    batch_size: int
    length: int
    cap: int
    prompt_fraction: float
    seed: int = 0

    @property
    def label(self) -> str:
        if self.kind == "fixed":
            return f"{self.batch_size}x{self.length}"
        return f"{self.batch_size}x~{self.length} (log-normal, cap {self.cap})"

    def examples(self, step: int, *, vocab_size: int) -> list[Example]:
        # Seed 0 draws what this benchmark drew before it had a seed (Random(1000 + step)).
        rng = random.Random(1_000_003 * self.seed + 1000 + step)
        if self.kind == "fixed":
            lengths = [self.length] * self.batch_size
        else:
            # mu = ln(mean) - sigma^2 / 2 makes the log-normal's mean `length` (before the cut).
            mu = math.log(self.length) - 0.5
            lengths = [
                max(8, min(self.cap, int(rng.lognormvariate(mu, 1.0)))) for _ in range(self.batch_size)
            ]
        examples = []
        for n in lengths:
            ids = [rng.randrange(vocab_size) for _ in range(n)]
            prompt = int(n * self.prompt_fraction)
            examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
        return examples


def fixed_batches(batch_size: int, length: int, *, seed: int = 0) -> Batches:
    """`batch_size` examples of `length` tokens, every token a target: no padding on either side."""
    return Batches("fixed", batch_size, length, cap=length, prompt_fraction=0.0, seed=seed)


def realistic_batches(batch_size: int, *, mean: int = 300, cap: int = 2048, seed: int = 0) -> Batches:
    """Lengths like a chat fine-tuning set's (mean about `mean` tokens, median about 60% of it, cut to
    `cap`), the first 40% of each example the prompt."""
    return Batches("realistic", batch_size, mean, cap=cap, prompt_fraction=0.4, seed=seed)


def padded_batch(examples: list[Example], device: str = "cpu") -> dict[str, torch.Tensor]:
    """The textbook collation: right-padded to the longest example, pads masked out of attention and loss.
    With nothing padded there is no mask, as the textbook script passes none."""
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), longest, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], mask[i, :n], labels[i, :n] = torch.tensor(e["input_ids"]), 1, torch.tensor(e["labels"])
    batch = {"input_ids": ids, "labels": labels}
    if not bool(mask.all()):
        batch["attention_mask"] = mask
    return {k: v.to(device) for k, v in batch.items()}


def packed_batch(examples: list[Example], device: str = "cpu") -> dict[str, Any]:
    """What a trial's SFTTrainer collates with `padding_free=True`: one row, per-example position ids and
    boundaries, the first token of each example without a label."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
