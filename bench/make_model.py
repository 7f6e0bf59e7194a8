"""A Llama checkpoint of one of `bench.recipes.SHAPES` with random weights and a real tokenizer, saved as a
hub download leaves one (bf16 safetensors). Kept if the folder already holds one.

    python -m bench.make_model --shape 7b --tokenizer smollm2 --out /tmp/llama7b-shape

`--tokenizer` is a local folder, a hub id, or `smollm2` (the embedded default model's, converted from its
GGUF file); the checkpoint takes its vocabulary size.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.recipes import SHAPES, make_checkpoint
from trainable.model import resolve_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--tokenizer", required=True, help="a folder, a hub id, or smollm2")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    make_checkpoint(args.out, SHAPES[args.shape], tokenizer_path=resolve_model(args.tokenizer), device=device)


if __name__ == "__main__":
    main()
