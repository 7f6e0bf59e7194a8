"""Take the chosen adapter out of a sweep: a peft folder with a model card, optionally merged into the base.

    python -m analysis.export experiments/local-20261130-120000                 # the leaderboard's #1
    python -m analysis.export EXPERIMENT --trial 1110d3e8 --out exported/
    python -m analysis.export EXPERIMENT --merge          # + OUT/merged: full bf16 model, save_pretrained
    python -m analysis.export s3://bucket/experiments/NAME  # read through the local cache, written back there

The adapter folder loads with `PeftModel.from_pretrained(base, OUT)`. --merge dequantizes the 4-bit base
the adapter was trained against to bf16 (`--merge-into original` takes the checkpoint's own bf16 weights
instead), merges the adapter into it (merge_and_unload) and saves the model with its tokenizer.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from analysis.experiment import (
    LEADERBOARD,
    Experiment,
    ExperimentError,
    is_remote,
    load_experiment,
    publish_folder,
    resolve_base_model,
)
from analysis.rank import choose_candidates
from analysis.seeds import pool_seeds
from trainable.schema import ADAPTER_PATH, BASE_EVAL_LOSS, BEST_EVAL_LOSS, STATUS, STEP, TRIAL_ID
from trainable.settings import HYPERPARAMETERS

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
MergeBase = Literal["dequantized", "original"]


def choose_trial(experiment: Experiment, trial: str | None = None) -> tuple[dict[str, Any], str]:
    """(results row, why it was chosen): the given trial id (or a unique prefix of one), else the
    leaderboard's #1, else the best eval loss when no report has been made."""
    results = experiment.results
    if trial is not None:
        matches = results[results[TRIAL_ID].astype(str).str.startswith(trial)]
        if len(matches) != 1:
            known = ", ".join(results[TRIAL_ID].astype(str))
            raise ExperimentError(f"--trial {trial!r} matches {len(matches)} trials; the trials are: {known}")
        return matches.iloc[0].to_dict(), "chosen with --trial"
    board_path = experiment.path / LEADERBOARD
    if board_path.is_file():
        board = pd.read_parquet(board_path)
        ranked = board[board["rank"].notna()].sort_values("rank")
        if len(ranked):
            first = str(ranked.iloc[0]["candidate"])
            return results[results[TRIAL_ID].astype(str) == first].iloc[
                0
            ].to_dict(), "#1 of leaderboard.parquet"
    best_by_loss = choose_candidates(pool_seeds(results), top_k=1)  # re-checked: by the mean over seeds
    if best_by_loss.empty:
        raise ExperimentError(
            f"{experiment.path}: no trial has a usable adapter (statuses: {', '.join(results[STATUS])})"
        )
    best = best_by_loss.iloc[0]
    return (
        best.to_dict(),
        "best eval loss (no leaderboard.parquet: run python -m analysis.report first to rank by answers)",
    )


def _scores(experiment: Experiment, trial_id: str) -> dict[str, float]:
    board_path = experiment.path / LEADERBOARD
    if not board_path.is_file():
        return {}
    board = pd.read_parquet(board_path).set_index("candidate")
    scores = {}
    for candidate in (trial_id, "base"):
        if candidate in board.index:
            for column in ("exact_match", "chrf", "judge_strength"):
                value = board.loc[candidate].get(column)
                if value is not None and not pd.isna(value):
                    scores[f"{column} ({candidate})"] = float(value)
    return scores


def build_model_card(experiment: Experiment, row: dict[str, Any], why: str, *, merged: bool) -> str:
    """README.md of the export: base model, data, hyperparameters, losses and answer scores."""
    model = experiment.model_settings
    data = experiment.data_settings
    counts = experiment.summary.data
    hparams = "\n".join(f"| {h} | {row.get(h)} |" for h in HYPERPARAMETERS if h in row)
    scores = {
        "best eval loss": row.get(BEST_EVAL_LOSS),
        "base model eval loss": row.get(BASE_EVAL_LOSS),
        **_scores(experiment, str(row[TRIAL_ID])),
    }
    score_rows = "\n".join(
        f"| {k} | {v:.4g} |" for k, v in scores.items() if isinstance(v, float) and math.isfinite(v)
    )
    base_id = model.name_or_path + (f" (revision {model.revision})" if model.revision else "")
    merged_text = (
        "\n`merged/` holds the base with this adapter merged into its weights (bf16, `save_pretrained`): it "
        "loads with `AutoModelForCausalLM.from_pretrained` alone.\n"
        if merged
        else ""
    )
    return f"""---
library_name: peft
base_model: {model.name_or_path}
tags: [lora, qlora]
---
# LoRA adapter: trial {row[TRIAL_ID]} of sweep {experiment.name}

QLoRA adapter trained on `{base_id}` loaded in 4-bit ({model.quantization}, double quantization
{model.double_quant}, compute dtype {model.compute_dtype}). Chosen: {why}.

## Data
Source `{data.source}`: {counts.get("train_examples", "?")} training and {counts.get("eval_examples", "?")} evaluation
examples, cut at {data.max_length} tokens; chat template as recorded in the experiment's sweep.json.

## Hyperparameters
| name | value |
| --- | --- |
{hparams}
| steps | {row.get(STEP)} |

## Scores
| score | value |
| --- | --- |
{score_rows}

exact_match: accuracy on held-out prompts with a checkable answer; chrf: character F-score (0-100) against
the reference answers (see the experiment's report.html).

## Use
```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{model.name_or_path}")
model = PeftModel.from_pretrained(base, "path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```
{merged_text}"""


def export_trial(
    path: str | Path,
    *,
    trial: str | None = None,
    out: str | Path | None = None,
    merge: bool = False,
    merge_into: MergeBase = "dequantized",
) -> str:
    """Write the adapter (and, with `merge`, OUT/merged) to `out` (default EXPERIMENT/export/TRIAL_ID), a
    folder or a storage URI; returns where it went. An export into remote storage is built in the local
    cache first."""
    experiment = load_experiment(path)
    row, why = choose_trial(experiment, trial)
    adapter = row.get(ADAPTER_PATH)
    if not adapter or not Path(adapter).is_dir():
        raise ExperimentError(f"trial {row[TRIAL_ID]}: its adapter folder is missing ({adapter})")
    home = experiment.uri if experiment.uri is not None else str(experiment.path)
    destination = str(out) if out is not None else f"{home}/export/{row[TRIAL_ID]}"
    if is_remote(destination):
        # The local copy of the experiment lives in the cache; the export is built beside it.
        target = experiment.path / "export" / str(row[TRIAL_ID])
    else:
        target = Path(destination).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed into place: a failed export leaves no half-written folder.
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        for name in ADAPTER_FILES:
            if (Path(adapter) / name).is_file():
                shutil.copy2(Path(adapter) / name, staging / name)
        from trainable.model import load_tokenizer

        model_path = resolve_base_model(experiment)
        tokenizer = load_tokenizer(model_path, experiment.model_settings)
        if experiment.summary.chat_template:
            tokenizer.chat_template = (
                experiment.summary.chat_template
            )  # the template the adapter was trained with
        tokenizer.save_pretrained(staging)
        if merge:
            merge_adapter(
                model_path, experiment, adapter, staging / "merged", tokenizer=tokenizer, into=merge_into
            )
        (staging / "README.md").write_text(
            build_model_card(experiment, row, why, merged=merge), encoding="utf-8"
        )
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if is_remote(destination):
        publish_folder(target, destination)
        return destination
    return str(target)


def load_merge_base(model_path: str, experiment: Experiment, *, into: MergeBase) -> Any:
    """The base in bf16: the 4-bit weights dequantized (what the adapter saw in training), or the
    checkpoint's own weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainable.model import load_base_model

    settings = experiment.model_settings
    if into == "dequantized" and settings.quantization != "none":
        model = load_base_model(model_path, settings, device="cpu")
        return model.dequantize().to(torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(
        model_path,
        revision=settings.revision,
        dtype=torch.bfloat16,
        trust_remote_code=settings.trust_remote_code,
    )


def merge_adapter(
    model_path: str, experiment: Experiment, adapter: str, out: Path, *, tokenizer: Any, into: MergeBase
) -> None:
    from peft import PeftModel

    base = load_merge_base(model_path, experiment, into=into)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "merge.json").write_text(
        json.dumps({"adapter": Path(adapter).name, "merged_into": into}, indent=2)
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m analysis.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", help="the experiment folder, its results.parquet, or a storage URI")
    parser.add_argument("--trial", help="a trial id (or a unique prefix); default: the leaderboard's #1")
    parser.add_argument("--out", help="output folder or storage URI (default: EXPERIMENT/export/TRIAL_ID)")
    parser.add_argument(
        "--merge", action="store_true", help="also write OUT/merged: the adapter merged into a bf16 base"
    )
    parser.add_argument(
        "--merge-into",
        choices=("dequantized", "original"),
        default="dequantized",
        help="bf16 weights to merge into: the dequantized 4-bit base (as trained) or the checkpoint's",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = export_trial(
            args.experiment, trial=args.trial, out=args.out, merge=args.merge, merge_into=args.merge_into
        )
    except ExperimentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
