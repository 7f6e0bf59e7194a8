"""The CUDA fast path computes what the textbook QLoRA recipe computes (run on a GPU host; skipped on CPU).

    python -m pytest -q tests/gpu

The textbook recipe: transformers + bitsandbytes NF4 (double quant, bf16 compute),
prepare_model_for_kbit_training, peft LoRA, padded batches, bf16 autocast. The project's path: the same
4-bit base and LoRA from trainable.model, trainable.fast.apply_fast_path, padding-free batches from trl's
collator. Same weights, same examples, same seed.
"""

from __future__ import annotations

import math
import random
import zlib
from pathlib import Path

import pytest
import torch

from bench.recipes import SHAPES, build_project_model, build_textbook_model, make_checkpoint
from bench.recipes import packed_batch as packed
from bench.recipes import padded_batch as padded

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The benchmarks' small Llama with random weights (bf16 safetensors), big enough for real GEMM shapes."""
    return make_checkpoint(tmp_path_factory.mktemp("small-llama"), SHAPES["small"], vocab_size=512)


def motif_examples(count: int, *, seed: int, vocab: int = 512) -> list[dict[str, list[int]]]:
    """Learnable data of varied lengths (log-normal, 16-400 tokens): every example walks one fixed cycle
    through 16 of the vocabulary's tokens from a random starting point; the first fifth is the prompt (no
    loss). A LoRA learns it within tens of steps (first which 16 tokens occur, then their order)."""
    cycle = random.Random(0).sample(range(vocab), 16)
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        length = max(16, min(400, int(rng.lognormvariate(math.log(120), 0.6))))
        start = rng.randrange(len(cycle))
        ids = [cycle[(start + i) % len(cycle)] for i in range(length)]
        prompt = length // 5
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return examples


def textbook(path: Path, *, r: int = 16, dropout: float = 0.0) -> torch.nn.Module:
    return init_lora(build_textbook_model(path, r=r, dropout=dropout))


def project(path: Path, *, r: int = 16, dropout: float = 0.0) -> torch.nn.Module:
    model, report = build_project_model(path, r=r, dropout=dropout)
    assert report.skipped is None and report.lora_layers == 28 and report.attention_layers == 4
    return init_lora(model)


def init_lora(model: torch.nn.Module, *, b_std: float = 0.0) -> torch.nn.Module:
    """The same LoRA weights in both recipes, by parameter name: A as peft draws it (uniform, bound
    1/sqrt(in)), B zero unless `b_std` (so that A gets gradients in a one-step comparison)."""
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        if "lora_A" in name:
            values = (torch.rand(p.shape, generator=g) * 2 - 1) / math.sqrt(p.shape[1])
        else:
            values = torch.randn(p.shape, generator=g) * b_std
        p.data.copy_(values.to(p.dtype))
    return model


def lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_varlen_attention_matches_causal_sdpa_per_example() -> None:
    from trainable.fast import attend

    torch.manual_seed(0)
    lengths = [37, 300, 1, 129, 64]
    total, heads, kv_heads, dim = sum(lengths), 8, 4, 64
    q = torch.randn(1, heads, total, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, kv_heads, total, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, kv_heads, total, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    out = attend(q, k, v, None, scaling=dim**-0.5, cu_seq_lens=cu, max_length=max(lengths))
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    fast = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref_parts, start = [], 0
    for n in lengths:
        s = slice(start, start + n)
        kk, vv = (t[:, :, s].repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
        ref_parts.append(torch.nn.functional.scaled_dot_product_attention(q[:, :, s], kk, vv, is_causal=True))
        start += n
    ref = torch.cat(ref_parts, dim=2).transpose(1, 2)
    (ref * grad).sum().backward()
    assert (out - ref).float().norm() / ref.float().norm() < 1e-2
    for got, t in zip(fast, (q, k, v), strict=True):
        assert (got - t.grad).float().norm() / t.grad.float().norm() < 2e-2


def test_one_step_matches_textbook(small_llama: Path) -> None:
    """Loss and every LoRA gradient of one step: padded textbook vs padding-free project path."""
    examples = motif_examples(8, seed=0)
    reference = init_lora(textbook(small_llama), b_std=0.02)
    ours = init_lora(project(small_llama), b_std=0.02)
    losses = []
    for model, batch in ((reference, padded(examples, "cuda")), (ours, packed(examples, "cuda"))):
        model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) / losses[0] < 5e-3, losses
    g_ref, g_ours = lora_grads(reference), lora_grads(ours)
    assert g_ref.keys() == g_ours.keys()
    errors = sorted(((g_ref[n] - g_ours[n]).norm() / g_ref[n].norm()).item() for n in g_ref)
    # bf16 operands (the project keeps the residual stream in bf16, the textbook in fp32): ~1e-2.
    assert errors[len(errors) // 2] < 3e-2 and errors[-1] < 8e-2, errors


def test_loss_curve_matches_textbook(small_llama: Path) -> None:
    """A short run of each (same data, order and seed): the loss curves agree within 2% (0.02 below a
    loss of 1) at every logged point (mean of 5 steps), and both learn."""
    import bitsandbytes as bnb

    batches = [motif_examples(8, seed=100 + i) for i in range(40)]
    curves = {}
    for name, build, collate in (("textbook", textbook, padded), ("project", project, packed)):
        torch.manual_seed(0)
        model = build(small_llama)
        model.train()
        optimizer = bnb.optim.PagedAdamW32bit([p for p in model.parameters() if p.requires_grad], lr=2e-3)
        losses = []
        for examples in batches:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(**collate(examples, "cuda")).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.3)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves[name] = [sum(losses[i : i + 5]) / 5 for i in range(0, len(losses), 5)]
        del model, optimizer
        torch.cuda.empty_cache()
    print("loss curves (mean of 5 steps):", curves)
    text, ours = curves["textbook"], curves["project"]
    assert text[-1] < 0.8 * text[0] and ours[-1] < 0.8 * ours[0]  # both learn the cycle
    # Tolerance: 2% of the loss, or 0.02 once the loss is below 1 (bf16 rounding is absolute down there).
    worst = max(abs(a - b) / max(a, 1.0) for a, b in zip(text, ours, strict=True))
    assert worst < 0.02, (worst, curves)


def test_quantized_cache_gives_the_same_model(small_llama: Path, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import bitsandbytes.functional as bnbf

    from trainable.model import load_base_model, quantized_cache_path
    from trainable.settings import ModelSettings

    monkeypatch.setenv("QLORA_SWEEPS_CACHE", str(tmp_path))
    settings = ModelSettings(name_or_path=str(small_llama))
    cached = quantized_cache_path(str(small_llama), settings)
    assert cached is not None and not cached.exists()
    first = load_base_model(str(small_llama), settings, device="cuda")  # quantizes and saves
    assert (cached / "config.json").exists()
    second = load_base_model(str(small_llama), settings, device="cuda")  # loads the 4-bit checkpoint
    layer_a = first.model.layers[1].mlp.down_proj
    layer_b = second.model.layers[1].mlp.down_proj
    assert type(layer_b).__name__ == "Linear4bit" and layer_b.weight.quant_state.nested
    a = bnbf.dequantize_4bit(layer_a.weight.data, layer_a.weight.quant_state)
    b = bnbf.dequantize_4bit(layer_b.weight.data, layer_b.weight.quant_state)
    assert torch.equal(a, b)
    assert torch.equal(first.lm_head.weight, second.lm_head.weight)


def test_a_copy_of_the_kept_base_computes_and_trains_as_the_loaded_one(
    small_llama: Path, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    # A reused worker's later trials train a copy, made on the card, of the 4-bit base it kept
    # (trainable.worker.base_for_trial): the copy must give the loaded model's logits and LoRA gradients
    # exactly, take the card memory it is counted for, and leave the kept base untouched when trained.
    import trainable.worker as worker
    from trainable.model import build_lora_model
    from trainable.prepare import TrialSettings
    from trainable.settings import Hyperparameters, ModelSettings

    monkeypatch.setenv("QLORA_SWEEPS_CACHE", str(tmp_path))
    monkeypatch.setattr(worker, "WORKER", worker.WorkerProcess(started_at=0.0))
    settings = TrialSettings(
        model_path=str(small_llama),
        model=ModelSettings(name_or_path=str(small_llama)),
        train=None,
        default_hparams=Hyperparameters(),
        train_data={},  # type: ignore[arg-type]
        eval_data={},
        reused_worker=True,
    )
    loaded, copied = worker.base_for_trial(settings, device="cuda", keep=True)
    assert not copied and worker.WORKER.base is not None
    weights = sum(t.numel() * t.element_size() for t in worker.WORKER.base.model.state_dict().values())
    assert (
        weights <= worker.WORKER.base.nbytes <= 1.25 * weights
    )  # the quantization state held twice, rounding
    copy, copied = worker.base_for_trial(settings, device="cuda", keep=True)
    assert copied and copy is not loaded

    ids = torch.randint(0, 512, (2, 64), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.equal(loaded(input_ids=ids).logits, copy(input_ids=ids).logits)

    def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        lora = init_lora(
            build_lora_model(
                model, Hyperparameters(r=8, target_modules="all-linear"), gradient_checkpointing=True
            ),
            b_std=0.02,
        )
        with torch.autocast("cuda", dtype=torch.bfloat16):
            lora(input_ids=ids, labels=ids).loss.backward()
        return lora_grads(lora)

    kept = {k: v.clone() for k, v in worker.WORKER.base.model.state_dict().items()}
    a, b = grads(loaded), grads(copy)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    after = worker.WORKER.base.model.state_dict()
    assert after.keys() == kept.keys() and all(torch.equal(after[k], kept[k]) for k in kept)
