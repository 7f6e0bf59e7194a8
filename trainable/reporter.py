"""A trial's reports: TuneReporter, the trainer callback that turns each evaluation into a TrialReport and
sends it with the checkpoint saved right after it, with the TrialState a restarted trial finds in that
checkpoint (trainable/checkpoint.py).
"""

from __future__ import annotations

import math
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import torch
from transformers import TrainerCallback

from trainable.checkpoint import save_trial_state
from trainable.outcome import TrialReport
from trainable.worker import TrialStart, kept_base_nbytes

# transformers' key for the eval loss in evaluate()'s metrics: metric_key_prefix "eval" + the model's "loss".
TRAINER_EVAL_LOSS = "eval_loss"


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
        metrics = self.report(state).to_tune()
        save_trial_state(checkpoint_dir, retries=self.retries, report=metrics)
        self.send(metrics, str(checkpoint_dir))

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
