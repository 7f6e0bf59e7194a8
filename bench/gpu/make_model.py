"""A Llama checkpoint with random weights and a real tokenizer, saved like a hub download (bf16 safetensors).

    python bench/gpu/make_model.py --shape 7b --tokenizer DIR --out /tmp/llama7b-shape

`7b` is Llama-2-7B's shape (hidden 4096, intermediate 11008, 32 layers, 32 heads) with the tokenizer's
vocabulary size (no 7B weights can be downloaded on the GPU host); `tiny` is 2 layers of hidden 64.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512),
}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    if (out / "config.json").exists():
        print(f"{out} exists", flush=True)
        return
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **SHAPES[args.shape])  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    print(f"made {out}: {params / 1e9:.2f} B parameters, {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
