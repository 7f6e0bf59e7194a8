"""One trial: quantized base + LoRA with the trial's hyperparameters, trained with trl, reported to Tune.

A plain function trainable rather than a Ray Train TorchTrainer: a trial is one process on one GPU, so
the extra worker actor, its placement group and its process group would buy nothing; Tune's function API
gives the same report/checkpoint/restore calls. A trial that must span GPUs later can wrap this function
in a TorchTrainer without changing it.

`train_trial` is what Tune runs; `train_by_hand` runs the same trial in this process without Ray:

    from trainable.prepare import prepare_trial
    from trainable.train import train_by_hand
    trial = prepare_trial(train=TrainSettings(max_steps=20, eval_every=10))   # the bundled data, smollm2
    reports = train_by_hand({"r": 8, "learning_rate": 1e-3}, trial.settings, output_dir="my-trial")

A trial here is set up, its trainer built, run, and its evaluations reported. Beside it: the process it runs
in, which Tune may reuse (trainable/worker.py), the callback that reports to Tune (trainable/reporter.py),
the checkpoint folder and what a restarted trial resumes from (trainable/checkpoint.py), and
the faults a test may inject (trainable/inject_faults.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, set_seed

from trainable.checkpoint import (
    catch_up_with_storage,
    checkpoint_step,
    keep_adapter_dtypes_on_resume,
    load_trial_state,
)
from trainable.evaluate import evaluate_base
from trainable.hardware import resolve_compute_dtype
from trainable.inject_faults import InjectFaults
from trainable.memory import estimate_trial_memory, fits
from trainable.model import build_lora_model, load_tokenizer, quiet_libraries
from trainable.outcome import SEED_KEY, TrialReport
from trainable.prepare import TrialSettings
from trainable.reporter import ReportSink, TuneReporter, describe_evaluation
from trainable.settings import HYPERPARAMETERS, Hyperparameters
from trainable.worker import base_for_trial, end_worker_trial, room_to_keep_base, start_worker_trial

# When this module's imports ended: a new worker process spends its start on Python, Ray and these imports.
# Taken here, after the last of the trial's code, and handed to start_worker_trial (trainable/worker.py).
IMPORTED_AT = time.time()


def trial_hparams(searched: dict[str, Any], defaults: Hyperparameters) -> Hyperparameters:
    """The trial's hyperparameters: the searched values over the configured defaults. A trial's config may
    hold other keys (a re-check's seed and the trial it re-checks); the config's space names only these."""
    return dataclasses.replace(defaults, **{k: v for k, v in searched.items() if k in HYPERPARAMETERS})


def build_trainer(
    model: Any,
    tokenizer: Any,
    hparams: Hyperparameters,
    *,
    trial: TrialSettings,
    output_dir: str,
    device: str,
    callbacks: list[Any],
) -> Any:
    """trl's SFTTrainer for `model` (base + LoRA) with the trial's hyperparameters and settings."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    train = trial.train
    compute_dtype = resolve_compute_dtype(trial.model.compute_dtype, device)
    optimizer = train.optimizer
    if optimizer == "auto":
        # Paged optimizer states move to CPU RAM under memory pressure instead of failing (QLoRA).
        optimizer = "paged_adamw_32bit" if device == "cuda" else "adamw_torch"
    # --- speed (trainable/fast.py, docs/speed.md): the CUDA fast path. CPU trials train padding-free too:
    # transformers' attention keeps packed examples apart by their position_ids (masking_utils), so the
    # same examples cost their own tokens instead of the longest one's times the batch (a quarter less on
    # the default local sweep).
    padding_free = device == "cpu" and train.padding_free
    if device == "cuda" and trial.model.fused_kernels:
        from trainable.fast import apply_fast_path

        longest = max(len(ids) for ids in trial.train_data["input_ids"])
        fast = apply_fast_path(
            model,
            activation_memory_gib=trial.model.activation_memory_gib,
            tokens_per_batch=train.batch_size * longest,
        )
        padding_free = fast.skipped is None and train.padding_free
    # --- end speed
    args = SFTConfig(
        output_dir=output_dir,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum_steps,
        learning_rate=hparams.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        # Not a mix-up: transformers 5 dropped warmup_ratio and reads a warmup_steps below 1 as a fraction
        # of the training steps (TrainingArguments.get_warmup_steps: ceil(num_training_steps * warmup_steps)).
        warmup_steps=train.warmup_ratio,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        optim=optimizer,
        seed=train.seed,
        data_seed=train.seed,
        bf16=compute_dtype == "bfloat16",
        fp16=compute_dtype == "float16",
        use_cpu=device == "cpu",
        eval_strategy="steps",
        eval_steps=train.eval_every,
        save_strategy="steps",
        save_steps=train.eval_every,
        save_total_limit=1,  # Tune has copied each checkpoint to storage by the time the next is saved
        # Train loss every 10 steps (or each eval, if sooner): often enough to see NaN early, rare enough
        # that logging costs nothing.
        logging_steps=max(1, min(10, train.eval_every)),
        include_num_input_tokens_seen="all" if padding_free else "non_padding",  # padding-free: all are real
        padding_free=padding_free,
        prediction_loss_only=True,  # eval_loss is all we need; gathering logits costs most of an eval pass
        # Already set up by build_lora_model, with the right kwargs. (transformers 5.20 renamed it
        # activation_checkpointing; the old name, which 5.17 knows too, only warns, and trials hide that.)
        gradient_checkpointing=False,
        max_length=None,  # the driver already cut examples to data.max_length and counted the cuts
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    loraplus = build_loraplus_optimizer(model, args, ratio=hparams.loraplus_lr_ratio)
    trainer_class = SFTTrainer
    if device == "cpu":  # the same loss from the labelled tokens only (trainable/compact.py says why)
        from trainable.compact import CompactLossTrainer

        trainer_class = CompactLossTrainer
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict(trial.train_data),
        eval_dataset=Dataset.from_dict(trial.eval_data),
        processing_class=tokenizer,
        callbacks=callbacks,
        optimizers=(loraplus, None),  # None: the trainer builds its own (and always the LR schedule)
    )
    # The trainer prints every log dict; a sweep prints one line per evaluation instead (train_trial).
    trainer.remove_callback(PrinterCallback)
    return trainer


def build_loraplus_optimizer(model: Any, args: Any, *, ratio: float) -> torch.optim.Optimizer | None:
    """LoRA+ (Hayou et al. 2024): the B matrices learn `ratio` times faster than A (args.learning_rate),
    with the optimizer class and settings the trainer would build from `args.optim` (paged AdamW from
    bitsandbytes on CUDA, torch AdamW on CPU). None for ratio 1: plain LoRA, the trainer's own optimizer."""
    if ratio == 1:
        return None
    from peft.optimizers import create_loraplus_optimizer
    from transformers import Trainer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
    return create_loraplus_optimizer(
        model,
        optimizer_cls,
        lr=args.learning_rate,
        loraplus_lr_ratio=ratio,
        loraplus_weight_decay=args.weight_decay,
        **kwargs,
    )


def setup_trial(
    hparams: Hyperparameters,
    settings: TrialSettings,
    *,
    output_dir: str,
    device: str,
    callbacks: list[Any],
    on_stage: Callable[[str], None] | None = None,
    keep_base: bool = False,
) -> Any:
    """A trial's setup, everything before its first step: tokenizer, quantized base model, LoRA, trainer.
    Returns the trainer. `keep_base`: keep an untouched copy of the base in this process for later trials
    (base_for_trial). `on_stage` is called after each part (tokenizer, base_model_loaded or
    base_model_copied, lora_attached, trainer_built) for the trial's start times and the setup benchmark
    (bench/start/trial_setup.py)."""
    stage = on_stage or (lambda name: None)
    tokenizer = load_tokenizer(settings.model_path, settings.model)
    stage("tokenizer")
    model, copied = base_for_trial(settings, device=device, keep=keep_base)
    stage("base_model_copied" if copied else "base_model_loaded")
    model = build_lora_model(model, hparams, gradient_checkpointing=settings.model.gradient_checkpointing)
    stage("lora_attached")
    trainer = build_trainer(
        model, tokenizer, hparams, trial=settings, output_dir=output_dir, device=device, callbacks=callbacks
    )
    stage("trainer_built")
    return trainer


def run_trial(
    searched: dict[str, Any], settings: TrialSettings, *, send: ReportSink, resume_from: str | None = None
) -> None:
    """Train one adapter with the `searched` hyperparameters over settings.default_hparams, sending each
    evaluation and its checkpoint to `send`; `resume_from` is a checkpoint folder it reported earlier.

    Two failures are final and reported instead of raised: CUDA out of memory (status 'oom'; the same
    config would run out again) and a NaN/inf loss (status 'failed'). Anything else raises. With
    settings.memory, a trial whose estimated peak exceeds its share of the card loads nothing and reports
    skipped_oom.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hparams = trial_hparams(searched, settings.default_hparams)
    estimated = math.nan
    estimate = None
    if settings.memory is not None:
        estimate = estimate_trial_memory(settings.memory, hparams)
        estimated = estimate.total_gib
        if not fits(estimate, card_gib=settings.memory.card_gib, share=settings.memory.share):
            # An infinite loss, not NaN: OptunaSearch tells NaN as a failed trial, which TPE ignores; an
            # infinite loss ranks worst, so TPE samples less in this region.
            skipped = TrialReport(
                eval_loss=math.inf,
                skipped_oom=True,
                estimated_memory_gib=estimated,
                gpu_share=settings.gpu_share,
            )
            send(skipped.to_tune(), None)
            return
    start = start_worker_trial(settings, device=device, imported_at=IMPORTED_AT)
    if SEED_KEY in searched:  # a seed re-check: its own LoRA init, data order and dropout masks
        settings = dataclasses.replace(
            settings, train=dataclasses.replace(settings.train, seed=int(searched[SEED_KEY]))
        )
    set_seed(settings.train.seed)
    output_dir = tempfile.mkdtemp(prefix="trial-")
    reporter = TuneReporter(
        send=send,
        device=device,
        base_eval_loss=settings.base_eval_loss,
        retries=0,
        restored_from_step=0,
        start=start,
        estimated_memory_gib=estimated,
        gpu_share=settings.gpu_share,
    )
    try:
        resume_step = None
        if resume_from is not None:  # a retried or resumed trial continues where its last report left it
            step = checkpoint_step(Path(resume_from))
            resume_step = str(Path(output_dir) / f"checkpoint-{step}")  # the layout the trainer expects
            shutil.copytree(resume_from, resume_step)
            reporter.retries = load_trial_state(Path(resume_step)).retries + 1
            reporter.restored_from_step = step
            if step >= settings.train.max_steps:
                # It had finished, and Tune holds its last report and checkpoint, but the driver was killed
                # before it saved the trial as ended. Resuming, the trainer would take a step past max_steps.
                return
        callbacks: list[Any] = [reporter]
        faults = tuple(f for f in settings.faults if f.applies_to(searched))
        if faults:
            callbacks.append(InjectFaults(faults, retries=reporter.retries))
        keep_base = room_to_keep_base(settings, estimate, device=device)
        trainer = setup_trial(
            hparams,
            settings,
            output_dir=output_dir,
            device=device,
            callbacks=callbacks,
            on_stage=start.mark,
            keep_base=keep_base,
        )
        if resume_step is not None:
            keep_adapter_dtypes_on_resume(trainer.model)
        trainer.train(resume_from_checkpoint=resume_step)
        if reporter.diverged:
            send(reporter.report(trainer.state, eval_loss=math.nan).to_tune(), None)
    except torch.cuda.OutOfMemoryError:
        oom = TrialReport(
            oom=True, retries=reporter.retries, estimated_memory_gib=estimated, gpu_share=settings.gpu_share
        )
        send(oom.to_tune(), None)
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
        end_worker_trial()


def train_trial(hparams: dict[str, Any], *, settings: TrialSettings) -> None:
    """Tune's trainable: run_trial reporting to Tune, resumed from the newest complete checkpoint this
    trial saved (trainable/checkpoint.py), which may be newer than the one Tune restores.

    A crash (the process dies, an exception) is retried by Tune from its checkpoint; out of memory and
    NaN loss are reported, not raised, so that Tune does not retry them.
    """
    from ray import tune

    quiet_libraries()
    # Before a reused worker (search.reuse_workers) takes the next trial, Tune waits this long for a stopped
    # trial's thread to unwind (its checkpoint folder removed) and fails the next trial if it has not: 2 s
    # by default, little on a loaded node. Read by Tune in this process.
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "60")
    trial_id = tune.get_context().get_trial_id()

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if checkpoint_dir:  # an evaluation (a failure is told by the driver's summary)
            # Before tune.report, flushed: after a trial's last report (or a scheduler's stop) Tune may end
            # this process, and a line still in its stdout buffer, or not yet printed, never reaches Ray's log.
            line = describe_evaluation(trial_id, TrialReport.from_tune(metrics), settings.train.max_steps)
            print(line, flush=True)
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)

    checkpoint = catch_up_with_storage(trial_id)
    with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext(None) as resume_from:
        run_trial(hparams, settings, send=report, resume_from=resume_from)


def train_by_hand(
    hparams: dict[str, Any], settings: TrialSettings, *, output_dir: str | Path
) -> list[dict[str, Any]]:
    """One trial in this process, without Ray: returns its reports in order (the metrics Tune would get),
    each with `checkpoint`, its adapter and trainer state copied under `output_dir`, when one was saved.
    Measures the base model's eval loss first (evaluate_base) unless `settings` carry it."""
    reports: list[dict[str, Any]] = []
    if settings.base_eval_loss is None:
        settings = dataclasses.replace(settings, base_eval_loss=evaluate_base(settings))

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        kept = None
        if checkpoint_dir is not None:
            kept = shutil.copytree(checkpoint_dir, Path(output_dir) / Path(checkpoint_dir).name)
        reports.append({**metrics, "checkpoint": str(kept) if kept else None})

    run_trial(hparams, settings, send=report)
    return reports
