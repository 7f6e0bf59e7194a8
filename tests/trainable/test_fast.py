"""The fast path's pieces that run anywhere: padding-free batches through the patched model give the padded
batch's loss and gradients, the fused LoRA function's gradients, the quantized cache's key. (The CUDA
kernels themselves are checked in tests/gpu.)"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from bench.recipes import packed_batch as packed
from bench.recipes import padded_batch as padded
from trainable.fast import LoraLinearFunction, apply_fast_path, attend
from trainable.model import ModelError, find_embedded_gguf, quantized_cache_path
from trainable.settings import ModelSettings

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_llama(dropout: float = 0.0) -> torch.nn.Module:
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=512,
    )
    model = get_peft_model(
        LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=dropout)
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(
                param, std=0.02
            )  # away from zero, so that every LoRA weight gets a gradient
    return model


def examples(lengths: list[int]) -> list[dict[str, list[int]]]:
    out = []
    for n in lengths:
        ids = torch.randint(0, 300, (n,)).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    return out


def test_padding_free_batch_gives_the_padded_batch_loss_and_gradients() -> None:
    plain = lora_llama()
    fast = copy.deepcopy(plain)
    report = apply_fast_path(fast)
    assert report.skipped is None and report.lora_layers == 14 and report.attention_layers == 2
    assert report.cast_to_compute_dtype == []  # an fp32 model stays fp32
    batch = examples([7, 19, 3, 12])
    reference = plain(**padded(batch))
    reference.loss.backward()
    out = fast(**packed(batch))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(reference.loss.item(), rel=1e-5)
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    for name, param in fast.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param.grad, grads[name], rtol=1e-4, atol=1e-6), name


def test_no_token_attends_across_an_example_boundary() -> None:
    """Changing the first example must not change the second example's logits in a packed batch."""
    model = lora_llama()
    apply_fast_path(model)
    model.eval()
    batch = examples([10, 15])
    with torch.no_grad():
        before = model(**packed(batch)).logits[0, 10:]
        batch[0]["input_ids"] = torch.randint(0, 300, (10,)).tolist()
        after = model(**packed(batch)).logits[0, 10:]
    assert torch.equal(before, after)


def test_fused_lora_function_gradients_match_autograd() -> None:
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, 16, dtype=torch.float64)
    a = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    keep = (torch.rand(2, 5, 16) > 0.3).double() / 0.7  # a fixed dropout mask

    def no_dropout(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return LoraLinearFunction.apply(x, None, lambda dtype: weight, a, b, 0.7)

    def dropout(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return LoraLinearFunction.apply(x, x * keep, lambda dtype: weight, a, b, 0.7)

    assert torch.autograd.gradcheck(no_dropout, (x, a, b))
    assert torch.autograd.gradcheck(dropout, (x, a, b))


def test_attention_with_padding_mask_matches_sdpa() -> None:
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    out = attend(q, k, v, mask, scaling=None)
    for row, n in enumerate((6, 4)):
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[row : row + 1, :, :n], k[row : row + 1, :, :n], v[row : row + 1, :, :n], is_causal=True
        )
        assert torch.allclose(out[row, :n], ref[0].transpose(0, 1), atol=1e-6)


def test_quantized_cache_key_follows_checkpoint_and_settings(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("QLORA_SWEEPS_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"x")
    nf4 = quantized_cache_path(str(model), ModelSettings())
    assert nf4 is not None and nf4.parent == tmp_path / "cache" / "quantized"
    assert quantized_cache_path(str(model), ModelSettings()) == nf4  # stable
    assert quantized_cache_path(str(model), ModelSettings(double_quant=False)) != nf4
    assert quantized_cache_path(str(model), ModelSettings(quantization="none")) is None
    (model / "model.safetensors").write_bytes(b"changed weights")
    assert quantized_cache_path(str(model), ModelSettings()) != nf4


def test_gguf_override_names_the_file(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("QLORA_SWEEPS_GGUF", str(gguf))
    assert find_embedded_gguf() == gguf
    monkeypatch.setenv("QLORA_SWEEPS_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelError, match="QLORA_SWEEPS_GGUF"):
        find_embedded_gguf()


def test_dequantizer_is_bitsandbytes_dequantize(tiny_llama: Path) -> None:
    import bitsandbytes.functional as bnbf

    from trainable.fast import _dequantizer
    from trainable.model import load_base_model

    model = load_base_model(str(tiny_llama), ModelSettings(), device="cpu")
    weight = model.model.layers[0].mlp.down_proj.weight
    assert weight.quant_state.nested  # double quantization: the cached scales are the part that differs
    expected = bnbf.dequantize_4bit(weight.data, weight.quant_state)
    assert torch.equal(_dequantizer(weight)(expected.dtype), expected)


def test_cached_4bit_checkpoint_loads_as_the_same_4bit_model(tiny_llama: Path, tmp_path: Path) -> None:
    from trainable.model import _from_pretrained, load_base_model, save_quantized

    settings = ModelSettings()
    model = load_base_model(str(tiny_llama), settings, device="cpu")
    save_quantized(model, tmp_path / "cached")
    again = _from_pretrained(str(tmp_path / "cached"), settings, device="cpu", quantize=False, revision=None)
    a, b = model.model.layers[1].self_attn.q_proj, again.model.layers[1].self_attn.q_proj
    assert type(b).__name__ == "Linear4bit" and b.weight.quant_state.quant_type == "nf4"
    assert torch.equal(a.weight.data, b.weight.data)
    assert torch.equal(a.weight.quant_state.absmax, b.weight.quant_state.absmax)
