"""The base model's eval loss (evaluate_base), apart from the trials' code: this module imports what
loading and running the quantized base needs (torch, transformers, bitsandbytes when it loads), not the
training libraries (peft, trl), so the driver and the worker that measures it start sooner.
"""

from __future__ import annotations

import contextlib

import torch

from trainable.hardware import resolve_compute_dtype
from trainable.model import load_base_model
from trainable.prepare import TrialSettings


def evaluate_base(settings: TrialSettings) -> float:
    """The plain quantized base model's loss on the trials' eval data, without any adapter: the bar every
    adapter of the sweep has to clear, measured once per sweep (the driver runs this as a Ray task;
    train_by_hand in its own process).

    Computed the way the trainer computes a trial's eval_loss, so that the two compare: batches of
    train.batch_size examples in order, right-padded, each batch's mean loss over its answer tokens, the
    batches averaged weighted by their number of examples, under the trial's compute dtype.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(settings.cpus)
    model = load_base_model(settings.model_path, settings.model, device=device).eval()
    dtype = resolve_compute_dtype(settings.model.compute_dtype, device)
    autocast = (
        torch.autocast(device, dtype=getattr(torch, dtype))
        if dtype != "float32"
        else contextlib.nullcontext()
    )
    ids, labels = settings.eval_data["input_ids"], settings.eval_data["labels"]
    size = settings.train.batch_size
    total = 0.0
    with torch.no_grad(), autocast:
        for start in range(0, len(ids), size):
            batch_ids, batch_labels = ids[start : start + size], labels[start : start + size]
            longest = max(len(x) for x in batch_ids)
            # Padding is masked out of attention and loss, so its token id does not matter.
            loss = model(
                input_ids=torch.tensor([x + [0] * (longest - len(x)) for x in batch_ids], device=device),
                attention_mask=torch.tensor(
                    [[1] * len(x) + [0] * (longest - len(x)) for x in batch_ids], device=device
                ),
                labels=torch.tensor([y + [-100] * (longest - len(y)) for y in batch_labels], device=device),
                use_cache=False,
            ).loss
            total += float(loss) * len(batch_ids)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return total / len(ids)
