"""A trial's inputs, prepared once: the model resolved, the data loaded, rendered with the chat template,
tokenized and cut to data.max_length, all packed into the TrialSettings every trial of a sweep receives.

    trial = prepare_trial(model=ModelSettings(name_or_path="smollm2"), data=DataSettings(max_length=256))
    train_by_hand({"r": 8}, trial.settings, output_dir="my-trial")   # trainable.train

The driver (sweeps.plan), the benchmarks and the tests all prepare trials through prepare_trial.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainable.data import (
    KEPT_WHOLE,
    DataError,
    choose_chat_template,
    describe_cuts,
    describe_lengths,
    find_placeholders,
    load_splits,
    percentile,
    tokenize_examples,
)
from trainable.faults import Fault
from trainable.memory import TrialMemory
from trainable.model import load_tokenizer, resolve_model
from trainable.settings import DataSettings, Hyperparameters, ModelSettings, TrainSettings

# Fewer training examples than this cannot fill a single batch of the default size (train.batch_size: 8).
MIN_TRAIN_EXAMPLES = 8


@dataclass(frozen=True)
class TrialSettings:
    """Everything a trial needs besides its hyperparameters, resolved by the driver (absolute paths,
    tokenized data) so that trials on any node of a cluster see the same inputs."""

    model_path: str
    model: ModelSettings
    train: TrainSettings
    default_hparams: Hyperparameters  # values of the hyperparameters the sweep does not search
    train_data: dict[str, list[list[int]]]  # input_ids and labels, tokenized once by the driver
    eval_data: dict[str, list[list[int]]]
    cpus: int = 1
    gpu_share: float = 0.0  # GPUs this trial holds (1 / search.trials_per_gpu), 0 for CPU trials
    # Tune may run further trials in this trial's worker process (search.reuse_workers): the worker then
    # keeps an untouched copy of the quantized base for them where it fits (KeptBase).
    reused_worker: bool = False
    memory: TrialMemory | None = None  # set: estimate the trial's peak first and skip it if it cannot fit
    # The plain quantized base model's loss on eval_data (no adapter), measured once per sweep by the driver
    # (evaluate_base) and reported by every trial as the bar to clear; None: not measured.
    base_eval_loss: float | None = None
    # Tests of the fault handling only (trainable/faults.py); empty in every real sweep.
    faults: tuple[Fault, ...] = ()


@dataclass(frozen=True)
class PreparedTrial:
    settings: TrialSettings
    chat_template: str  # the template the data was rendered with
    # Counts (examples, tokens, truncated, dropped), tokens per example, and the `warning:` lines the driver
    # prints with its plan: examples cut by max_length, template placeholders left in the text.
    data: dict[str, Any] = field(default_factory=dict)


def prepare_trial(
    *,
    model: ModelSettings | None = None,
    data: DataSettings | None = None,
    train: TrainSettings | None = None,
    default_hparams: Hyperparameters | None = None,
    cpus: int = 1,
    faults: tuple[Fault, ...] = (),
) -> PreparedTrial:
    """Resolve the model (the embedded default is converted once), load the splits, render and tokenize
    the train and eval examples. Raises DataError naming the file, line or key; nothing is trained here."""
    model = model or ModelSettings()
    data = data or DataSettings()
    model_path = resolve_model(model.name_or_path)
    tokenizer = load_tokenizer(model_path, model)
    template = choose_chat_template(tokenizer, data.chat_template)
    splits = load_splits(data)
    max_length = data.max_length
    train_set = tokenize_examples(splits.train, tokenizer, template=template, max_length=max_length)
    eval_set = tokenize_examples(splits.eval, tokenizer, template=template, max_length=max_length)
    if len(train_set.input_ids) < MIN_TRAIN_EXAMPLES or not eval_set.input_ids:
        whole = max(percentile(s.lengths, KEPT_WHOLE) for s in (train_set, eval_set) if s.lengths)
        raise DataError(
            f"data: after cutting to data.max_length={max_length}, {len(train_set.input_ids)} training and "
            f"{len(eval_set.input_ids)} eval examples keep a trained token; raise data.max_length "
            f"({whole} would keep {KEPT_WHOLE:.0%} of each split whole)"
        )
    settings = TrialSettings(
        model_path=model_path,
        model=model,
        train=train or TrainSettings(),
        default_hparams=default_hparams or Hyperparameters(),
        train_data=train_set.as_columns(),
        eval_data=eval_set.as_columns(),
        cpus=cpus,
        faults=faults,
    )
    counts = {
        "train_examples": len(train_set.input_ids),
        "eval_examples": len(eval_set.input_ids),
        "test_examples": len(splits.test),
        "train_tokens": train_set.tokens,
        "truncated": {"train": train_set.truncated, "eval": eval_set.truncated},
        "dropped": {"train": train_set.dropped, "eval": eval_set.dropped},
        "lengths": {"train": describe_lengths(train_set.lengths), "eval": describe_lengths(eval_set.lengths)},
        "warnings": [
            warning
            for warning in (
                describe_cuts({"train": train_set.lengths, "eval": eval_set.lengths}, max_length=max_length),
                find_placeholders(splits.train + splits.eval + splits.test),
            )
            if warning
        ],
    }
    return PreparedTrial(settings=settings, chat_template=template, data=counts)
