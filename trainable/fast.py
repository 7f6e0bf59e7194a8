"""The CUDA fast path of a trial: the same model and the same loss, computed with less work.

    model = build_lora_model(load_base_model(...), lora, gradient_checkpointing=True)
    report = apply_fast_path(model)  # CUDA only; CPU trials keep the plain transformers/peft path

What changes (measured in bench/step/train_step.py, written up in docs/speed.md):
- LoRA on a 4-bit (or plain) linear layer is one autograd function: the base weight is dequantized and
  multiplied once, the low-rank product is added into the same output buffer (no `result.clone()`, no
  casts of the input per adapter), and the backward computes the input gradient the same way.
- The residual stream stays in the compute dtype (bf16): `prepare_model_for_kbit_training` upcasts the
  frozen embeddings, norms and LM head to fp32, which doubles every activation the layers pass on and
  adds a cast in front of every matmul. Their values are bf16 numbers either way (exact in both).
- Padding-free batches: the collator concatenates a batch's examples into one row with per-example
  position ids and sequence boundaries (`cu_seq_lens_q`); attention runs per example with PyTorch's
  varlen FlashAttention (`torch.nn.attention.varlen`), so no token attends across an example boundary
  and no compute is spent on padding. Without boundaries (or without the kernel) it falls back to SDPA.
- RMSNorm, RoPE and SwiGLU run as Liger Kernel's Triton kernels when the package is installed.

What does not change: the examples in each batch, the loss (the mean over the same target tokens), LoRA
dropout (applied as configured), the optimizer, gradient checkpointing (per layer, as configured).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
import types
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Model families whose decoder layers are Llama's (pre-norm RMSNorm, rotate-half RoPE, SwiGLU MLP).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
ATTENTION_NAME = "qlora_varlen"  # our attention function, registered with transformers' AttentionInterface
_MIN_FUSED_TOKENS = 64  # below this (generation), bitsandbytes' own 4-bit GEMV kernels are faster


@dataclass
class FastPathReport:
    """What apply_fast_path changed, for the trial's log and the benchmark's record."""

    lora_layers: int = 0
    # DoRA layers (Hyperparameters.use_dora) keep peft's own forward: DoRA rescales W + s B A by a learned
    # magnitude over its column norms, which the fused LoRA function does not compute.
    dora_layers: int = 0
    attention_layers: int = 0
    norms: int = 0
    mlps: int = 0
    kernels: str = "torch"  # "liger" when Liger Kernel's Triton kernels are used
    varlen_attention: bool = False
    unchecked_layers: int = 0  # decoder layers whose activations are kept instead of recomputed
    cast_to_compute_dtype: list[str] = field(default_factory=list)
    skipped: str | None = None  # why nothing was applied


def fast_path_supported(model: nn.Module) -> str | None:
    """None when apply_fast_path can handle `model`, else the reason it cannot."""
    config: Any = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} is not silu"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    if getattr(config, "attention_dropout", 0.0):
        return "attention dropout"
    return None


def apply_fast_path(
    model: Any,
    *,
    kernels: bool = True,
    fuse_lora: bool = True,
    activation_memory_gib: float = 0.0,
    tokens_per_batch: int = 0,
) -> FastPathReport:
    """Switch a LoRA model (peft) over to the fast path, in place, module by module (no global patches:
    other models in the same process are untouched).

    `kernels=False` keeps PyTorch's own RMSNorm, RoPE and SwiGLU; `fuse_lora=False` keeps peft's LoRA
    forward (both for measuring each piece's share). `activation_memory_gib` > 0 lets the last layers keep
    their activations instead of recomputing them (see `uncheckpoint_layers`)."""
    base: Any = model.get_base_model() if hasattr(model, "get_base_model") else model
    reason = fast_path_supported(base)
    if reason is not None:
        return FastPathReport(skipped=reason)
    report = FastPathReport()
    liger = _liger() if kernels else None
    report.kernels = "liger" if liger is not None else "torch"
    report.varlen_attention = _varlen() is not None and torch.cuda.is_available()

    compute_dtype = _compute_dtype(base)
    for name, param in base.named_parameters():
        # Frozen, non-quantized floats upcast by prepare_model_for_kbit_training (embeddings, norms, head).
        if not param.requires_grad and param.dtype == torch.float32 and compute_dtype != torch.float32:
            param.data = param.data.to(compute_dtype)
            report.cast_to_compute_dtype.append(name)

    register_attention()
    base.config._attn_implementation = ATTENTION_NAME
    for module in base.modules():
        kind = type(module).__name__
        if _is_lora_linear(module):
            if not fuse_lora:
                continue
            if any(getattr(module, "use_dora", {}).values()):
                report.dora_layers += 1
                continue
            _patch(module, _lora_forward)
            report.lora_layers += 1
        elif kind.endswith("Attention") and hasattr(module, "q_proj") and hasattr(module, "o_proj"):
            _patch(module, functools.partial(_attention_forward, liger=liger))
            report.attention_layers += 1
        elif kind.endswith("RMSNorm") and liger is not None:
            _patch(module, functools.partial(_rms_norm_forward, liger=liger))
            report.norms += 1
        elif kind.endswith("MLP") and hasattr(module, "gate_proj") and liger is not None:
            _patch(module, functools.partial(_mlp_forward, liger=liger))
            report.mlps += 1
    if activation_memory_gib > 0 and tokens_per_batch > 0:
        report.unchecked_layers = uncheckpoint_layers(
            base, budget_gib=activation_memory_gib, tokens_per_batch=tokens_per_batch
        )
    return report


def activation_bytes_per_token(config: Any, *, dropout: bool) -> int:
    """What one decoder layer keeps for its backward, per token, on the fast path when it is not
    checkpointed (bf16): the norm outputs and attention inputs/outputs (8 x hidden), gate, up and their
    product (3 x intermediate), plus LoRA dropout's outputs (6 x hidden + intermediate) when dropout is on.
    Counted from the saved tensors; bench/step/train_step.py measures it."""
    hidden, intermediate = config.hidden_size, config.intermediate_size
    elements = 8 * hidden + 3 * intermediate + ((6 * hidden + intermediate) if dropout else 0)
    return 2 * elements


def uncheckpoint_layers(base: Any, *, budget_gib: float, tokens_per_batch: int) -> int:
    """Leave the last decoder layers unchecked (their forward is kept, not recomputed in the backward) as
    far as their activations at `tokens_per_batch` fit into `budget_gib`; returns how many."""
    layers = [
        m
        for m in base.modules()
        if getattr(m, "gradient_checkpointing", False) and type(m).__name__.endswith("DecoderLayer")
    ]
    dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for m in base.modules())
    per_layer = activation_bytes_per_token(base.config, dropout=dropout) * tokens_per_batch
    count = min(len(layers), int(budget_gib * 2**30 // max(1, per_layer)))
    for layer in layers[len(layers) - count :]:
        layer.gradient_checkpointing = False
    return count


def _patch(module: nn.Module, forward: Any) -> None:
    """Bind `forward(module, original_forward, *args, **kwargs)` as the module's own forward."""
    original = module.forward
    module.forward = types.MethodType(lambda self, *a, **k: forward(self, original, *a, **k), module)


def _compute_dtype(base: nn.Module) -> torch.dtype:
    quantization = getattr(base.config, "quantization_config", None)
    if isinstance(quantization, dict):
        dtype = quantization.get("bnb_4bit_compute_dtype")
    else:
        dtype = getattr(quantization, "bnb_4bit_compute_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if isinstance(dtype, torch.dtype):
        return dtype
    # Not quantized: the dtype the linear layers were loaded in.
    for module in base.modules():
        if isinstance(module, nn.Linear) and module.weight.dtype.is_floating_point:
            return module.weight.dtype
    return torch.float32


# ------------------------------------------------------------------------------------------ kernels


@functools.cache
def _liger() -> types.SimpleNamespace | None:
    """Liger Kernel's autograd functions, or None where it (or a GPU for its Triton kernels) is missing."""
    if not torch.cuda.is_available():
        return None
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except ImportError:
        return None
    return types.SimpleNamespace(
        rms_norm=LigerRMSNormFunction, silu_mul=LigerSiLUMulFunction, rope=liger_rotary_pos_emb
    )


@functools.cache
def _varlen() -> tuple[Any, dict[str, Any], bool, bool] | None:
    """PyTorch's varlen FlashAttention (torch >= 2.10) and how this version asks for causal attention:
    (function, causal kwargs, takes enable_gqa, takes scale); None where it does not exist."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:  # torch >= 2.11
        causal: dict[str, Any] = {"window_size": (-1, 0)}
    elif "is_causal" in params:  # torch 2.10
        causal = {"is_causal": True}
    else:
        return None
    return varlen_attn, causal, "enable_gqa" in params, "scale" in params


def register_attention() -> None:
    """Make ATTENTION_NAME a valid `config._attn_implementation`. transformers builds no mask for an
    implementation it does not know, so a packed batch is never expanded into a (tokens x tokens) mask."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, attention_interface)


def attention_interface(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: (batch, heads, tokens, head_dim) in, (batch, tokens,
    heads, head_dim) out."""
    if dropout:
        raise ValueError("the fast path does not implement attention dropout")
    out = attend(
        query,
        key,
        value,
        attention_mask,
        scaling=scaling,
        cu_seq_lens=kwargs.get("cu_seq_lens_q"),
        max_length=kwargs.get("max_length_q"),
    )
    return out, None


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    scaling: float | None,
    cu_seq_lens: torch.Tensor | None = None,
    max_length: int | None = None,
) -> torch.Tensor:
    """Causal attention; with `cu_seq_lens` (a packed batch of one row), within each example only.
    Shapes: query (batch, heads, tokens, head_dim), key/value (batch, kv_heads, tokens, head_dim);
    returns (batch, tokens, heads, head_dim)."""
    batch, heads, tokens, head_dim = query.shape
    n_rep = heads // key.shape[1]
    if cu_seq_lens is not None and batch == 1 and attention_mask is None and key.shape[2] == tokens:
        varlen = _varlen() if query.is_cuda else None
        if varlen is not None:
            function, causal, takes_gqa, takes_scale = varlen
            q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, head_dim)
            if q.dtype not in (torch.float16, torch.bfloat16):
                # The kernel takes half precision only, and DoRA layers (peft's own forward) hand it float32;
                # SDPA under autocast would run in the autocast dtype too.
                half = (
                    torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
                )
                q, k, v = q.to(half), k.to(half), v.to(half)
            extra: dict[str, Any] = dict(causal)
            if n_rep > 1:
                if takes_gqa:
                    extra["enable_gqa"] = True
                else:
                    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
            if takes_scale:
                extra["scale"] = scaling
            elif scaling is not None and not math.isclose(scaling, head_dim**-0.5):
                raise ValueError("this torch's varlen attention has no scale argument")
            cu = cu_seq_lens.to(device=query.device, dtype=torch.int32)
            longest = int(max_length) if max_length is not None else int((cu[1:] - cu[:-1]).max())
            out = function(q, k, v, cu, cu, longest, longest, **extra)
            return out.to(query.dtype).unsqueeze(0)
        # No varlen kernel: one causal SDPA call per example (slower, the same result).
        bounds = cu_seq_lens.tolist()
        parts = [
            attend(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None, scaling=scaling)
            for s, e in itertools.pairwise(bounds)
        ]
        return torch.cat(parts, dim=1)
    if n_rep > 1:
        key, value = key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)
    if attention_mask is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=tokens > 1, scale=scaling)
    else:
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=_sdpa_mask(attention_mask, tokens, key.shape[2]), scale=scaling
        )
    return out.transpose(1, 2)


def _sdpa_mask(attention_mask: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
    """A boolean (batch, 1, q_len, kv_len) mask: causal (queries are the last q_len positions) and no
    padded keys. A 4D mask prepared by transformers is used as it is."""
    if attention_mask.dim() == 4:
        return attention_mask
    keys = attention_mask.to(torch.bool)[:, None, None, :kv_len]
    q_pos = torch.arange(kv_len - q_len, kv_len, device=attention_mask.device)[:, None]
    causal = q_pos >= torch.arange(kv_len, device=attention_mask.device)[None, :]
    mask = keys & causal[None, None]
    # A fully padded query row would give NaN in SDPA: let every query see itself. Rows of real tokens
    # already do, so only padded rows (whose outputs nothing reads) change.
    return mask | _diagonal(q_len, kv_len, mask.device)


def _diagonal(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    eye = torch.zeros(q_len, kv_len, dtype=torch.bool, device=device)
    eye[torch.arange(q_len), torch.arange(kv_len - q_len, kv_len)] = True
    return eye[None, None]


# --------------------------------------------------------------------------------------- module forwards


def _attention_forward(
    self: Any,
    original: Any,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    liger: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Llama attention with RoPE from Liger (when present) and `attend` (varlen for packed batches)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None or position_embeddings is None:
        return original(
            hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask, **kwargs
        )
    batch, tokens, _ = hidden_states.shape
    head_dim = self.head_dim
    query = self.q_proj(hidden_states).view(batch, tokens, -1, head_dim).transpose(1, 2)
    key = self.k_proj(hidden_states).view(batch, tokens, -1, head_dim).transpose(1, 2)
    value = self.v_proj(hidden_states).view(batch, tokens, -1, head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    if liger is not None:
        query, key = liger.rope(query, key, cos, sin)
    else:
        query, key = _rope(query, key, cos, sin)
    out = attend(
        query,
        key,
        value,
        attention_mask,
        scaling=self.scaling,
        cu_seq_lens=kwargs.get("cu_seq_lens_q"),
        max_length=kwargs.get("max_length_q"),
    )
    return self.o_proj(out.reshape(batch, tokens, -1)), None


def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _rms_norm_forward(self: Any, original: Any, hidden_states: torch.Tensor, *, liger: Any) -> torch.Tensor:
    if hidden_states.dtype != self.weight.dtype or not hidden_states.is_cuda:
        return original(hidden_states)
    # casting_mode "llama": normalize in fp32, cast back, then scale (as LlamaRMSNorm does).
    return liger.rms_norm.apply(hidden_states, self.weight, self.variance_epsilon, 0.0, "llama", False)


def _mlp_forward(self: Any, original: Any, x: torch.Tensor, *, liger: Any) -> torch.Tensor:
    if not x.is_cuda:
        return original(x)
    return self.down_proj(liger.silu_mul.apply(self.gate_proj(x), self.up_proj(x)))


# ------------------------------------------------------------------------------------------ fused LoRA


def _is_lora_linear(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer) or not hasattr(module, "lora_A"):
        return False
    base = module.get_base_layer()
    return isinstance(base, nn.Linear) or _is_4bit(base)


def _is_4bit(layer: nn.Module) -> bool:
    return getattr(getattr(layer, "weight", None), "quant_state", None) is not None


@dataclass
class _LoraPlan:
    """Everything a LoRA layer's fused forward needs, looked up once (per-call lookups cost CPU time, and a
    QLoRA step is launch-bound on the CPU before it is bound by the GPU)."""

    adapter: str
    weight: Any  # callable: dtype -> the base weight (out, in), dequantized if 4-bit
    compute_dtype: torch.dtype
    dropout: float
    scaling: float


def _lora_plan(module: Any) -> _LoraPlan | None:
    """The plan for a LoRA layer in the common case (one plain LoRA adapter, no LoRA bias); None otherwise."""
    if len(module.active_adapters) != 1:
        return None
    name = module.active_adapters[0]
    if (
        name not in module.lora_A
        or getattr(module, "use_dora", {}).get(name)
        or name in getattr(module, "lora_variant", {})
        or module.lora_B[name].bias is not None
    ):
        return None
    base = module.get_base_layer()
    if _is_4bit(base):
        weight, compute_dtype = _dequantizer(base.weight), base.weight.quant_state.dtype
    else:
        dense = base.weight
        weight, compute_dtype = (lambda dtype: dense.to(dtype)), dense.dtype
    dropout = module.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    return _LoraPlan(name, weight, compute_dtype, p, float(module.scaling[name]))


def _dequantizer(packed: Any) -> Any:
    """dtype -> the 4-bit weight dequantized, with double quantization's fp32 block scales computed once
    (bitsandbytes recomputes them, in three more kernels, on every call; the weights are frozen). The
    result is bit for bit bitsandbytes' own dequantize_4bit."""
    state = packed.quant_state
    if state.nested:
        import bitsandbytes.functional as bnbf

        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2)
        absmax += state.offset
        absmax = absmax.float()
    else:
        absmax = state.absmax
    op = torch.ops.bitsandbytes.dequantize_4bit.default
    shape, blocksize, quant_type, dtype = state.shape, state.blocksize, state.quant_type, state.dtype

    def weight(want: torch.dtype) -> torch.Tensor:
        out = op(packed, absmax, blocksize, quant_type, shape, dtype)
        return out if out.dtype == want else out.to(want)

    return weight


def _lora_forward(self: Any, original: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's LoRA forward for the common case (one active, unmerged, plain LoRA adapter), fused."""
    plan: _LoraPlan | None = self.__dict__.get("_fast_plan")
    if plan is None:
        plan = _lora_plan(self)
        if plan is None:
            return original(x, *args, **kwargs)
        self.__dict__["_fast_plan"] = plan
    if (
        args
        or kwargs
        or self.disable_adapters
        or self.merged
        or self.active_adapters != [plan.adapter]
        or x.numel() < _MIN_FUSED_TOKENS * x.shape[-1]
    ):
        return original(x, *args, **kwargs)
    dtype = plan.compute_dtype
    if dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    if x.dtype != dtype:
        x = x.to(dtype)
    x_drop = F.dropout(x, plan.dropout, True) if plan.dropout and self.training else None
    name = plan.adapter
    out = LoraLinearFunction.apply(
        x, x_drop, plan.weight, self.lora_A[name].weight, self.lora_B[name].weight, plan.scaling
    )
    bias = self.base_layer.bias
    return out if bias is None else out + bias.to(out.dtype)


class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + s (d(x) A^T) B^T for a frozen W (4-bit or dense), LoRA A (r x in), B (out x r).

    `weight(dtype)` gives W; the forward takes it once and adds the low-rank term into the GEMM's output in
    place; the backward takes W again (nothing of W's size is kept between the passes) and adds the
    low-rank input gradient into dx in place. Everything runs in x's dtype; A and B's gradients are
    returned in their own. d(x) is x_drop (LoRA dropout's output) when given, else x itself.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        x_drop: torch.Tensor | None,
        weight: Any,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        d2 = x2 if x_drop is None else x_drop.reshape(-1, x.shape[-1])
        a = lora_a if lora_a.dtype == dtype else lora_a.to(dtype)
        b = lora_b if lora_b.dtype == dtype else lora_b.to(dtype)
        y = x2 @ weight(dtype).t()
        t_scaled = (d2 @ a.t()).mul_(scaling)  # (tokens, r): small
        y.addmm_(t_scaled, b.t())
        ctx.save_for_backward(d2, t_scaled, a, b)
        ctx.weight, ctx.scaling, ctx.dropout = weight, scaling, x_drop is not None
        ctx.dtypes = (lora_a.dtype, lora_b.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        d2, t_scaled, a, b = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1])
        if dy2.dtype != d2.dtype:
            dy2 = dy2.to(d2.dtype)
        dt = (dy2 @ b).mul_(ctx.scaling)  # (tokens, r)
        grad_a = (dt.t() @ d2).to(ctx.dtypes[0]) if needs[3] else None
        grad_b = (dy2.t() @ t_scaled).to(ctx.dtypes[1]) if needs[4] else None
        dx = dx_drop = None
        if needs[0]:
            dx = dy2 @ ctx.weight(d2.dtype)
            if not ctx.dropout:
                dx.addmm_(dt, a)
        if ctx.dropout and needs[1]:
            dx_drop = dt @ a
        shape = (*dy.shape[:-1], a.shape[1])
        return (
            None if dx is None else dx.view(shape),
            None if dx_drop is None else dx_drop.view(shape),
            None,
            grad_a,
            grad_b,
            None,
        )
