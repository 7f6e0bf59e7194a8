"""A trial's peak GPU memory, predicted before the trial starts: a sum of named terms, in GiB.

    shape = load_model_shape(checkpoint_folder)          # config.json only: no weights are read
    estimate = estimate_memory(MemoryInputs(model=shape, r=16, target_modules=("q_proj", "v_proj"),
                                            batch_size=8, longest=512))
    estimate.allocated_gib   # what torch.cuda.max_memory_allocated will report for the trial
    estimate.total_gib       # what the process takes from the card (context, paged states, allocator slack)
    fits(estimate, card_gib=139.8, share=0.5)

What is modelled: the CUDA trial path as `trainable.train.build_trainer` runs it with the fast path
(`trainable/fast.py`): a 4-bit (or plain) base, LoRA weights in bf16 as trl's SFTTrainer casts them for a
quantized base, the residual stream in the compute dtype, gradient checkpointing per decoder layer (the
last layers left unchecked as `model.activation_memory_gib` allows), trl's fused LM head (logits in tiles,
never whole), and the configured optimizer. The coefficients that are not counted from tensor shapes are
fitted to the peaks measured on an H200 (`bench/step/results/train_step*-2026-11-30.jsonl`, the 7B shape) and
re-measured by `python -m bench.step.memory`, which records this estimate beside each measurement.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from trainable.fast import activation_bytes_per_token
from trainable.settings import Hyperparameters

GIB = 2**30
Quantization = Literal["nf4", "fp4", "none"]
ComputeDtype = Literal["bfloat16", "float16", "float32"]
Optimizer = Literal["paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch"]

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
LLAMA_PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS

_DTYPE_BYTES: dict[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4}
_BLOCKSIZE = 64  # bitsandbytes' 4-bit block: one absmax per 64 weights
_NESTED_BLOCKSIZE = 256  # double quantization: one fp32 scale per 256 absmax values
_PAGED_MIN_ELEMENTS = 100_000  # bitsandbytes pages a state only from this size on (smaller: torch.zeros_like)
_LM_HEAD_TOKEN_TILE = 4096  # trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE
_LM_HEAD_VOCAB_TILE = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE
# Fitted (7B shape, r=16, 4x1024 and 8x2048, all-linear and q+v): the gradients alive while one decoder
# layer runs its backward, per token, beyond what the layer saved: the gradient of the MLP's product
# (intermediate) and half a hidden vector's worth of attention-side buffers; see _layer_backward_bytes.
_BACKWARD_HIDDEN_FRACTION = 0.5
# cuBLAS/cuBLASLt workspaces and the other small buffers PyTorch allocates once per process (they are
# allocated through the caching allocator, so they count in max_memory_allocated).
_WORKSPACE_GIB = 0.0625
# Outside PyTorch's allocator, so not in max_memory_allocated but taken from the card all the same:
# the CUDA context with its lazily loaded kernels (about 0.5 GiB with CUDA 12 on Hopper), and the share of
# reserved-but-unallocated blocks the caching allocator keeps (fragmentation; reserved / allocated - 1).
_CUDA_CONTEXT_GIB = 0.5
_ALLOCATOR_SLACK = 0.10


@dataclass(frozen=True)
class ModelShape:
    """A Llama-family decoder's dimensions, as its config.json states them."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, config: dict[str, Any], *, source: str = "config") -> ModelShape:
        """From a config.json's fields (a text model's, or a multimodal model's `text_config`)."""
        config = config.get("text_config", config)
        required = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "vocab_size",
        )
        missing = [key for key in required if not isinstance(config.get(key), int)]
        if missing:
            raise ValueError(
                f"{source}: {', '.join(missing)} missing or not an integer; the memory estimate "
                f"needs a Llama-style decoder config with {', '.join(required)}"
            )
        heads = config["num_attention_heads"]
        return cls(
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            # Absent: every head has its own keys and values (no grouped-query attention).
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            vocab_size=config["vocab_size"],
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),  # Llama's default: untied
        )

    def projection_shape(self, name: str) -> tuple[int, int]:
        """(in_features, out_features) of a decoder layer's linear layer `name`."""
        d, ff = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        shapes = {
            "q_proj": (d, q),
            "k_proj": (d, kv),
            "v_proj": (d, kv),
            "o_proj": (q, d),
            "gate_proj": (d, ff),
            "up_proj": (d, ff),
            "down_proj": (ff, d),
        }
        if name not in shapes:
            raise ValueError(
                f"target module {name!r}: the memory estimate knows {', '.join(LLAMA_PROJECTIONS)}"
            )
        return shapes[name]

    def linear_parameters_per_layer(self) -> int:
        return sum(i * o for i, o in map(self.projection_shape, LLAMA_PROJECTIONS))


def load_model_shape(path: str | Path) -> ModelShape:
    """The shape of the checkpoint in folder `path`, read from its config.json."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{config_file}: no such file; the memory estimate reads the model's config.json")
    return ModelShape.from_config(json.loads(config_file.read_text()), source=str(config_file))


@dataclass(frozen=True)
class MemoryInputs:
    """One trial's configuration, as far as its memory depends on it."""

    model: ModelShape
    r: int
    target_modules: tuple[str, ...]  # resolved leaf names (trainable.model.resolve_target_modules)
    batch_size: int
    longest: int  # tokens of the longest (cut) training example
    # Padding-free batches: the real tokens of the largest batch the trial will see (at most batch_size x
    # longest). None: batch_size x longest, what a padded batch holds.
    largest_batch_tokens: int | None = None
    lora_dropout: float = 0.05
    quantization: Quantization = "nf4"
    double_quant: bool = True
    compute_dtype: ComputeDtype = "bfloat16"
    gradient_checkpointing: bool = True
    activation_memory_gib: float = 0.0
    optimizer: Optimizer = "paged_adamw_32bit"
    use_dora: bool = False

    @property
    def tokens(self) -> int:
        padded = self.batch_size * self.longest
        return padded if self.largest_batch_tokens is None else self.largest_batch_tokens


@dataclass(frozen=True)
class MemoryEstimate:
    """The estimate's terms in GiB. The first group is inside PyTorch's caching allocator (their sum is what
    torch.cuda.max_memory_allocated reports); the last three are outside it."""

    base_weights: float
    dequant_scales: float
    embeddings: float
    lora: float
    optimizer_states: float
    checkpointed_inputs: float
    unchecked_layers: float
    backward: float  # the backward's peak over its phases, from the four terms below (see estimate_memory)
    recomputed_layer: float  # a checkpointed layer's activations, recomputed for its backward
    layer_gradients: float  # the gradients alive while one decoder layer runs its backward
    lm_head: float  # the fused LM head's backward (a logits tile and the hidden states' gradient)
    workspace: float
    paged_optimizer_states: float
    cuda_context: float
    allocator_slack: float
    unchecked_layer_count: int

    @property
    def allocated_gib(self) -> float:
        return (
            self.base_weights
            + self.dequant_scales
            + self.embeddings
            + self.lora
            + self.optimizer_states
            + self.checkpointed_inputs
            + self.backward
            + self.workspace
        )

    @property
    def total_gib(self) -> float:
        return self.allocated_gib + self.paged_optimizer_states + self.cuda_context + self.allocator_slack

    def as_dict(self) -> dict[str, float]:
        """The terms with the two sums, rounded to MiB, for results tables and reports."""
        terms: dict[str, float] = {k: round(v, 3) for k, v in asdict(self).items()}
        return {**terms, "allocated_gib": round(self.allocated_gib, 3), "total_gib": round(self.total_gib, 3)}


def estimate_memory(inputs: MemoryInputs) -> MemoryEstimate:
    """The trial's peak GPU memory: persistent terms (weights, LoRA, optimizer, checkpointed layers' inputs)
    plus the backward's peak."""
    m, tokens = inputs.model, inputs.tokens
    if inputs.r < 1 or inputs.batch_size < 1 or inputs.longest < 1 or tokens < 1:
        raise ValueError(
            f"r, batch_size, longest and the batch's tokens must be positive, got r={inputs.r}, "
            f"batch_size={inputs.batch_size}, longest={inputs.longest}, tokens={tokens}"
        )
    targets = tuple(dict.fromkeys(inputs.target_modules))
    if not targets:
        raise ValueError("target_modules: no names; LoRA needs at least one projection to adapt")
    for name in targets:
        m.projection_shape(name)  # an unknown name is an error that lists the known ones
    act = _DTYPE_BYTES[inputs.compute_dtype]  # the residual stream and activations (fast path: compute dtype)
    layers = m.num_hidden_layers
    linear = layers * m.linear_parameters_per_layer()
    targeted = layers * sum(i * o for i, o in map(m.projection_shape, targets))

    # Decoder linears: 4 bits a weight plus one absmax per 64-weight block, itself 8-bit with fp32 scales per
    # 256 blocks under double quantization, fp32 without. Unquantized: the compute dtype.
    base: float
    if inputs.quantization == "none":
        base = linear * act
    elif inputs.double_quant:
        base = linear * (0.5 + 1 / _BLOCKSIZE + 4 / (_BLOCKSIZE * _NESTED_BLOCKSIZE))
    else:
        base = linear * (0.5 + 4 / _BLOCKSIZE)
    # The fast path keeps each LoRA layer's double-quantized absmax dequantized to fp32 (computed once
    # instead of in three kernels per call: fast._dequantizer); without double quantization it is fp32 already.
    scales = targeted * 4 / _BLOCKSIZE if inputs.quantization != "none" and inputs.double_quant else 0.0
    # Embeddings and LM head stay unquantized; prepare_model_for_kbit_training upcasts them to fp32 and the
    # fast path casts them back to the compute dtype. Tied: one matrix. Norms: two per layer and a final one.
    matrices = 1 if m.tie_word_embeddings else 2
    embeddings = (matrices * m.vocab_size * m.hidden_size + (2 * layers + 1) * m.hidden_size) * act

    # LoRA: A (r x in) and B (out x r) per target. trl casts them to bf16 on a quantized base (QLoRA's
    # recipe); on a plain base peft keeps them fp32. Gradients are the parameters' dtype, kept until the step.
    lora_bytes = 2 if inputs.quantization != "none" else 4
    tensors = [n for name in targets for n in _lora_tensor_sizes(m, name, inputs.r)] * layers
    if inputs.use_dora:  # a trained magnitude per output of each adapted layer
        tensors += [m.projection_shape(name)[1] for name in targets] * layers
    lora_parameters = sum(tensors)
    lora = lora_parameters * 2 * lora_bytes
    # Adam's two moments per trainable parameter: fp32 (8 bytes) for 32-bit states, 8-bit blockwise (2
    # bytes) for paged_adamw_8bit (tensors under 4096 elements stay 32-bit), the parameter's dtype for torch's
    # AdamW. bitsandbytes' paged optimizers put each state of 100k elements or more in CUDA unified memory,
    # outside PyTorch's allocator; smaller ones are ordinary tensors.
    in_allocator, paged = 0.0, 0.0
    for n in tensors:
        if inputs.optimizer == "adamw_torch":
            in_allocator += n * 2 * lora_bytes
            continue
        state = n * (2 if inputs.optimizer == "paged_adamw_8bit" and n >= 4096 else 8)
        if n >= _PAGED_MIN_ELEMENTS:
            paged += state
        else:
            in_allocator += state

    # Activations. A checkpointed layer keeps only its input (tokens x hidden); an unchecked one keeps what
    # its backward reads (fast.activation_bytes_per_token), plus every LoRA layer's dropout output.
    dropout = inputs.lora_dropout > 0
    per_token = activation_bytes_per_token(m, dropout=False) + (
        _dropout_bytes_per_token(m, targets, act) if dropout else 0
    )
    unchecked = layers if not inputs.gradient_checkpointing else _unchecked_layer_count(inputs, dropout)
    checkpointed = layers - unchecked
    checkpointed_inputs = checkpointed * tokens * m.hidden_size * act
    unchecked_layers = unchecked * tokens * per_token
    # One layer's backward: a checkpointed layer's forward is recomputed (its activations live again), and
    # its gradients are alive: the MLP's product's (intermediate), the dropout branches' of LoRA'd MLP
    # layers (each its input's width), and attention-side buffers (fitted: half a hidden vector).
    recomputed_layer = tokens * per_token if checkpointed else 0
    layer_gradients = tokens * _layer_backward_bytes(m, targets, act, dropout=dropout)
    # trl's fused LM head (SFTTrainer adds it): its backward holds one (token tile x vocab tile) logits tile
    # in the compute dtype and the hidden states' gradient in fp32 (4 bytes) beside their copy (the
    # labelled positions; every position is an upper bound).
    logits_tile = min(tokens, _LM_HEAD_TOKEN_TILE) * min(m.vocab_size, _LM_HEAD_VOCAB_TILE) * act
    lm_head = logits_tile + tokens * m.hidden_size * (4 + act)
    # The backward runs from the head to the first layer. The unchecked (last) layers' activations are
    # alive during the head's backward and their own, and freed before the checkpointed layers are
    # recomputed one at a time: the peak is the larger of the two phases (2 unchecked 7B layers at 4 x 1024
    # measured 7.24 GiB, where keeping them through the whole backward would be 7.9).
    # DoRA (peft) computes each adapted layer's weight norm from the dequantized weight plus the LoRA product
    # at every forward, recomputation included: three fp32 matrices of the largest adapted layer at once.
    # Modelled from peft's code, not yet measured against a peak.
    dora = 3 * max(i * o for i, o in map(m.projection_shape, targets)) * 4 if inputs.use_dora else 0
    backward = max(
        unchecked_layers + max(lm_head, layer_gradients), recomputed_layer + layer_gradients + dora
    )

    allocated = (base + scales + embeddings + lora + in_allocator + checkpointed_inputs + backward) / GIB
    allocated += _WORKSPACE_GIB
    return MemoryEstimate(
        base_weights=base / GIB,
        dequant_scales=scales / GIB,
        embeddings=embeddings / GIB,
        lora=lora / GIB,
        optimizer_states=in_allocator / GIB,
        checkpointed_inputs=checkpointed_inputs / GIB,
        unchecked_layers=unchecked_layers / GIB,
        backward=backward / GIB,
        recomputed_layer=recomputed_layer / GIB,
        layer_gradients=layer_gradients / GIB,
        lm_head=lm_head / GIB,
        workspace=_WORKSPACE_GIB,
        paged_optimizer_states=paged / GIB,
        cuda_context=_CUDA_CONTEXT_GIB,
        allocator_slack=allocated * _ALLOCATOR_SLACK,
        unchecked_layer_count=unchecked,
    )


def fits(estimate: MemoryEstimate, *, card_gib: float, share: float = 1.0) -> bool:
    """Whether a trial fits in `share` (0-1] of a card of `card_gib`: several trials sharing a GPU each
    bring their own CUDA context, paged states and allocator slack, so the whole estimate is compared."""
    if not 0 < share <= 1 or card_gib <= 0:
        raise ValueError(
            f"fits: share must be in (0, 1] and card_gib positive, got share={share}, card_gib={card_gib}"
        )
    return estimate.total_gib <= card_gib * share


def largest_batch_tokens(lengths: Sequence[int], batch_size: int) -> int:
    """The most real tokens a padding-free batch of `batch_size` examples can hold: the longest examples'
    sum (an upper bound for any shuffle)."""
    if batch_size < 1 or not lengths:
        raise ValueError(
            f"largest_batch_tokens: need examples and batch_size >= 1, got {len(lengths)} "
            f"examples and batch_size={batch_size}"
        )
    return sum(sorted(lengths, reverse=True)[:batch_size])


def _lora_tensor_sizes(m: ModelShape, name: str, r: int) -> tuple[int, int]:
    in_features, out_features = m.projection_shape(name)
    return r * in_features, out_features * r


def _dropout_bytes_per_token(m: ModelShape, targets: Sequence[str], act: int) -> int:
    """LoRA dropout's outputs, kept for the backward: one per LoRA layer, as wide as its input (q, k and v
    each drop their shared input separately)."""
    return act * sum(m.projection_shape(name)[0] for name in targets)


def _layer_backward_bytes(m: ModelShape, targets: Sequence[str], act: int, *, dropout: bool) -> float:
    mlp_dropout = sum(m.projection_shape(n)[0] for n in targets if n in MLP_PROJECTIONS) if dropout else 0
    return act * (m.intermediate_size + mlp_dropout + _BACKWARD_HIDDEN_FRACTION * m.hidden_size)


def _unchecked_layer_count(inputs: MemoryInputs, dropout: bool) -> int:
    """As many last layers as trainable.fast.uncheckpoint_layers leaves unchecked: it sizes them with
    fast.activation_bytes_per_token at batch_size x longest tokens (trainable.train.build_trainer)."""
    if inputs.activation_memory_gib <= 0:
        return 0
    per_layer = activation_bytes_per_token(inputs.model, dropout=dropout) * inputs.batch_size * inputs.longest
    return min(inputs.model.num_hidden_layers, int(inputs.activation_memory_gib * GIB // max(1, per_layer)))


@dataclass(frozen=True)
class TrialMemory:
    """What a sweep's trials share for their memory estimate, resolved by the driver from its plan, and the
    part of a card each trial may take; the trial adds its own r, target_modules and lora_dropout."""

    model: ModelShape
    linear_modules: tuple[str, ...]  # the model's linear layers, to resolve target_modules presets
    batch_size: int
    longest: int
    largest_batch_tokens: int | None
    quantization: Quantization
    double_quant: bool
    compute_dtype: ComputeDtype
    gradient_checkpointing: bool
    activation_memory_gib: float
    optimizer: Optimizer
    card_gib: float  # the GPU's memory
    share: float  # the part of the card one trial may use: 1 / trials per GPU


def estimate_trial_memory(memory: TrialMemory, hparams: Hyperparameters) -> MemoryEstimate:
    """The peak of one trial with `hparams` under `memory`: the hyperparameters that cost memory (declared
    with each in trainable.settings.Hyperparameters) are r, target_modules, lora_dropout and use_dora."""
    from trainable.model import resolve_target_modules

    targets = resolve_target_modules(hparams.target_modules, set(memory.linear_modules))
    return estimate_memory(
        MemoryInputs(
            model=memory.model,
            r=hparams.r,
            target_modules=tuple(targets),
            batch_size=memory.batch_size,
            longest=memory.longest,
            largest_batch_tokens=memory.largest_batch_tokens,
            lora_dropout=hparams.lora_dropout,
            quantization=memory.quantization,
            double_quant=memory.double_quant,
            compute_dtype=memory.compute_dtype,
            gradient_checkpointing=memory.gradient_checkpointing,
            activation_memory_gib=memory.activation_memory_gib,
            optimizer=memory.optimizer,
            use_dora=hparams.use_dora,
        )
    )
