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
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import resource
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import torch
from transformers import PrinterCallback, TrainerCallback, set_seed

from trainable.evaluate import evaluate_base
from trainable.faults import ENV as FAULTS_ENV
from trainable.faults import Fault
from trainable.hardware import resolve_compute_dtype
from trainable.memory import estimate_trial_memory, fits
from trainable.model import build_lora_model, load_tokenizer, quiet_libraries
from trainable.outcome import SEED_KEY, TrialReport
from trainable.prepare import TrialSettings
from trainable.settings import HYPERPARAMETERS, Hyperparameters
from trainable.worker import (
    TrialStart,
    base_for_trial,
    end_worker_trial,
    kept_base_nbytes,
    room_to_keep_base,
    start_worker_trial,
)

# When this module's imports ended: a new worker process spends its start on Python, Ray and these imports.
# Taken here, after the last of the trial's code, and handed to start_worker_trial (trainable/worker.py).
IMPORTED_AT = time.time()

TRIAL_STATE = "trial_state.json"  # kept in each checkpoint: a TrialState
# transformers' key for the eval loss in evaluate()'s metrics: metric_key_prefix "eval" + the model's "loss".
TRAINER_EVAL_LOSS = "eval_loss"


@dataclasses.dataclass(frozen=True)
class TrialState:
    """What a restarted trial carries on with, kept in each checkpoint beside the trainer's own state."""

    retries: int  # restarts so far


# Where a trial's reports go: the metrics, and the checkpoint folder saved with them (None: no checkpoint).
# Tune's session in a sweep (train_trial), a list in this process (train_by_hand).
ReportSink = Callable[[dict[str, Any], "str | None"], None]


def describe_evaluation(trial_id: str, report: TrialReport, max_steps: int) -> str:
    """The one line a trial prints per evaluation."""
    return (
        f"trial {trial_id}: step {report.step}/{max_steps}, eval_loss {report.eval_loss:.4f} "
        f"(base {report.base_eval_loss:.4f}), train_loss {report.train_loss:.4f}, "
        f"{report.tokens_per_s:.0f} tokens/s"
    )


def trial_hparams(searched: dict[str, Any], defaults: Hyperparameters) -> Hyperparameters:
    """The trial's hyperparameters: the searched values over the configured defaults. A trial's config may
    hold other keys (a re-check's seed and the trial it re-checks); the config's space names only these."""
    return dataclasses.replace(defaults, **{k: v for k, v in searched.items() if k in HYPERPARAMETERS})


def peak_memory_gib(device: str) -> float:
    """The trial's peak: on CUDA the memory it allocated at most, less the base its worker keeps for later
    trials (KeptBase), so that it compares with the trial's estimate; on CPU the process's peak RSS."""
    if device == "cuda":
        return (torch.cuda.max_memory_allocated() - kept_base_nbytes()) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class TuneReporter(TrainerCallback):
    """Reports each evaluation to Tune with the checkpoint saved right after it (adapter + optimizer)."""

    def __init__(
        self,
        *,
        send: ReportSink,
        device: str,
        base_eval_loss: float | None,
        retries: int,
        restored_from_step: int,
        start: TrialStart,
        estimated_memory_gib: float = math.nan,
        gpu_share: float = 0.0,
    ) -> None:
        self.send = send  # where each report goes, with its checkpoint
        self.start = start
        self.device = device
        self.base_eval_loss = base_eval_loss
        self.retries = retries  # how often this trial was restarted from a checkpoint
        self.restored_from_step = restored_from_step
        self.estimated_memory_gib = estimated_memory_gib
        self.gpu_share = gpu_share
        self.diverged = False  # a NaN or infinite loss was seen
        self.evaluations = 0  # eval passes in this process: one per report (the base is not evaluated here)
        # Where the trial ran, to check Tune's placement: the Ray node and the GPUs it was given.
        in_ray = ray.is_initialized()  # not when trained by hand
        self.node_id = ray.get_runtime_context().get_node_id() if in_ray else ""
        self.gpu_ids = ",".join(str(g) for g in ray.get_gpu_ids()) if in_ray else ""
        self.train_losses: list[float] = []
        self.last_eval: dict[str, float] = {}
        self.train_seconds = 0.0
        self._step_start = 0.0
        self._tokens_at_start: int | None = None

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self._step_start = time.perf_counter()
        if self._tokens_at_start is None:
            self._tokens_at_start = state.num_input_tokens_seen  # non-zero when resumed

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if math.isnan(self.start.first_step):
            if self.device == "cuda":
                torch.cuda.synchronize()  # the step's kernels run after the Python call returns
            self.start.first_step = time.time()
        self.train_seconds += time.perf_counter() - self._step_start

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        if logs and "loss" in logs:
            self.train_losses.append(float(logs["loss"]))
            self.last_grad_norm = float(logs.get("grad_norm", math.nan))
            if not math.isfinite(self.train_losses[-1]):
                self.diverged = True
                control.should_training_stop = True  # further steps only spread NaN

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):  # type: ignore[no-untyped-def]
        self.evaluations += 1
        self.last_eval = dict(metrics or {})
        if not math.isfinite(self.last_eval.get(TRAINER_EVAL_LOSS, 0.0)):
            self.diverged = True
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.diverged:
            return  # no checkpoint of NaN weights; run_trial reports the failure
        checkpoint_dir = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        state_now = TrialState(retries=self.retries)
        (checkpoint_dir / TRIAL_STATE).write_text(json.dumps(dataclasses.asdict(state_now)))
        self.send(self.report(state).to_tune(), str(checkpoint_dir))

    def report(self, state: Any, *, eval_loss: float | None = None) -> TrialReport:
        tokens = state.num_input_tokens_seen - (self._tokens_at_start or 0)
        last_eval_loss = float(self.last_eval.get(TRAINER_EVAL_LOSS, math.nan))
        report = TrialReport(
            eval_loss=last_eval_loss if eval_loss is None else eval_loss,
            train_loss=sum(self.train_losses) / len(self.train_losses) if self.train_losses else math.nan,
            grad_norm=getattr(self, "last_grad_norm", math.nan),
            step=state.global_step,
            tokens=int(state.num_input_tokens_seen),
            tokens_per_s=tokens / self.train_seconds if self.train_seconds else 0.0,
            peak_memory_gib=peak_memory_gib(self.device),
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            visible_gpus=torch.cuda.device_count(),
            base_eval_loss=self.base_eval_loss if self.base_eval_loss is not None else math.nan,
            retries=self.retries,
            restored_from_step=self.restored_from_step,
            evaluations=self.evaluations,
            diverged=self.diverged,
            node_id=self.node_id,
            gpu_ids=self.gpu_ids,
            started_at=self.start.began,
            estimated_memory_gib=self.estimated_memory_gib,
            gpu_share=self.gpu_share,
            **self.start.fields(),
        )
        self.train_losses = []
        return report


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
    (bench/gpu/trial_setup.py)."""
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
            skipped = TrialReport(eval_loss=math.inf, skipped_oom=True, estimated_memory_gib=estimated,
                                  gpu_share=settings.gpu_share)  # fmt: skip
            send(skipped.to_tune(), None)
            return
    start = start_worker_trial(settings, device=device, imported_at=IMPORTED_AT)
    if SEED_KEY in searched:  # a seed re-check: its own LoRA init, data order and dropout masks
        settings = dataclasses.replace(
            settings, train=dataclasses.replace(settings.train, seed=int(searched[SEED_KEY]))
        )
    set_seed(settings.train.seed)
    output_dir = tempfile.mkdtemp(prefix="trial-")
    reporter = TuneReporter(send=send, device=device, base_eval_loss=settings.base_eval_loss, retries=0,
                            restored_from_step=0, start=start, estimated_memory_gib=estimated,
                            gpu_share=settings.gpu_share)  # fmt: skip
    try:
        resume_step = None
        if resume_from is not None:  # a retried or resumed trial continues where its last report left it
            step = json.loads((Path(resume_from) / "trainer_state.json").read_text())["global_step"]
            resume_step = str(Path(output_dir) / f"checkpoint-{step}")  # the layout the trainer expects
            shutil.copytree(resume_from, resume_step)
            previous = TrialState(**json.loads((Path(resume_step) / TRIAL_STATE).read_text()))
            reporter.retries = previous.retries + 1
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
        trainer = setup_trial(hparams, settings, output_dir=output_dir, device=device, callbacks=callbacks,
                              on_stage=start.mark, keep_base=keep_base)  # fmt: skip
        trainer.train(resume_from_checkpoint=resume_step)
        if reporter.diverged:
            send(reporter.report(trainer.state, eval_loss=math.nan).to_tune(), None)
    except torch.cuda.OutOfMemoryError:
        oom = TrialReport(oom=True, retries=reporter.retries, estimated_memory_gib=estimated,
                          gpu_share=settings.gpu_share)  # fmt: skip
        send(oom.to_tune(), None)
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
        end_worker_trial()


class InjectFaults(TrainerCallback):
    """The faults of trainable/faults.py, done at their optimizer steps."""

    def __init__(self, faults: tuple[Fault, ...], *, retries: int) -> None:
        self.faults = faults
        self.retries = retries

    def on_step_end(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        for fault in self.faults:
            if state.global_step != fault.step:
                continue
            if fault.action == "kill" and self.retries == 0:
                os.kill(os.getpid(), signal.SIGKILL)
            if fault.action == "oom":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. (injected by " + FAULTS_ENV + ")")
            if fault.action == "nan" and model is not None:
                with torch.no_grad():
                    for name, param in model.named_parameters():
                        if "lora_" in name:
                            param.fill_(float("nan"))


def train_trial(hparams: dict[str, Any], *, settings: TrialSettings) -> None:
    """Tune's trainable: run_trial reporting to Tune, resumed from Tune's last checkpoint of this trial.

    A crash (the process dies, an exception) is retried by Tune from that checkpoint; out of memory and
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

    checkpoint = tune.get_checkpoint()
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
