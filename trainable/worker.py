"""This process as a trial worker: the record Tune's trials share when it runs one after another in the
same process (search.reuse_workers), the reset at each trial's start, the times of that start, and the
quantized base the worker keeps for its later trials.

WORKER is the one record of this process; it is read and written only through this module's functions,
so that every trial in the process sees the same one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from trainable.memory import MemoryEstimate
from trainable.model import load_base_model
from trainable.prepare import TrialSettings
from trainable.settings import ModelSettings


def process_started_at() -> float:
    """UNIX time this process started (Linux: /proc/self/stat's start time since boot); NaN elsewhere."""
    try:
        # The fields after the command name, which may hold spaces; the start time is the stat line's 22nd.
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        since_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return math.nan
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - since_boot)


@dataclasses.dataclass
class KeptBase:
    """The quantized base model a reused worker keeps between its trials, never trained or run: each later
    trial of the same model trains a copy of it (a copy on the device, instead of a load from the node's
    cache or a fresh quantization). Trials freeze the base, but LoRA, kbit preparation and the fast path
    change the model they are given, so the kept one is only ever copied."""

    key: tuple[str, ModelSettings, str]  # model path, model settings, device
    model: Any
    nbytes: int  # device memory it holds (CUDA), what a trial beside it must leave room for


@dataclasses.dataclass
class WorkerProcess:
    """This process as a trial worker. Tune may run trial after trial in it (search.reuse_workers)."""

    started_at: float  # UNIX time the process started
    trials: int = 0  # trials begun in this process (a skipped_oom trial begins none)
    last_trial_ended_at: float = math.nan
    base: KeptBase | None = None


WORKER = WorkerProcess(started_at=process_started_at())


@dataclasses.dataclass
class TrialStart:
    """UNIX times of a trial's start, in order, for the start_* fields of its reports."""

    worker_trial: int  # 1: this trial started the process
    since: float  # the process's start; a reused worker: the end of its previous trial
    imported: float  # the trial's code imported (a reused worker: `since`, nothing is imported again)
    began: float  # run_trial began
    model: float = math.nan  # the base model loaded (or copied from the one the worker kept)
    trainer: float = math.nan  # LoRA attached, trainer built
    first_step: float = math.nan  # the first optimizer step ended
    base_copied: bool = False  # the base was a copy of the one the worker kept, not loaded

    def mark(self, stage: str) -> None:
        """setup_trial's on_stage: the base model loaded (or copied) and the trainer built."""
        if stage in ("base_model_loaded", "base_model_copied"):
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the copy to the GPU is asynchronous
            self.model = time.time()
            self.base_copied = stage == "base_model_copied"
        elif stage == "trainer_built":
            self.trainer = time.time()

    def fields(self) -> dict[str, Any]:
        """The TrialReport fields."""
        return {
            "worker_pid": os.getpid(),
            "worker_trial": self.worker_trial,
            "start_imports_s": self.imported - self.since,
            "start_worker_s": self.began - self.imported,
            "start_model_s": self.model - self.began,
            "start_trainer_s": self.trainer - self.model,
            "start_step_s": self.first_step - self.trainer,
            "base_copied": self.base_copied,
        }


def end_quietly_on_sigterm() -> None:
    """Let SIGTERM end this trial worker without running any Python, once its trial has reported.

    At the end of a sweep Tune frees each trial's placement group while the trial's worker process still
    lives, and the raylet ends the process with SIGTERM, then SIGKILL. Ray's handler for SIGTERM raises
    SystemExit wherever the process's main thread is: mostly in Ray's own loop, which takes it quietly, but
    when that is a finalizer (a `__del__` or weakref callback of an object being freed, as an ended trial's
    are), Python prints "Exception ignored in ... SystemExit: 1" with a traceback, which Ray forwards to the
    driver's console after a successful sweep. With the default action the kernel ends the process at once,
    as the SIGKILL 0.2 s later would; a trial ended mid-way by SIGTERM (a node drained) is retried by Tune
    from its last checkpoint either way. Only the main thread may set a handler, and the trial runs in a
    thread of Tune's, so the handler is set by the worker's next call on its main thread (`__ray_call__`,
    run once the trial's first report returns control to it). Nothing outside a Ray actor (train_by_hand)."""
    if "ray" not in sys.modules:
        return
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return
    ray.get_runtime_context().current_actor.__ray_call__.remote(_default_sigterm)


def _default_sigterm(_actor: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def start_worker_trial(settings: TrialSettings, *, device: str, imported_at: float) -> TrialStart:
    """Set this process up for a trial, also when Tune reuses it after other trials (search.reuse_workers):
    every process-wide setting a trial depends on is set each time, what an earlier trial left is freed,
    and the peak-memory count starts afresh. The random seeds are set by run_trial, the rest lives in the
    trial's own objects. `imported_at`: when the trial's code finished importing in this process (the
    first trial's start_imports_s ends there)."""
    began = time.time()
    WORKER.trials += 1
    if WORKER.trials == 1:
        # What the process holds before its first trial (the half million objects of torch, transformers,
        # peft, Ray ...) lives as long as the process: leave it out of every later collection. A full one
        # then takes milliseconds instead of about 0.3 s on a fast CPU, and a reused trial's start makes two
        # (below, and transformers' Trainer.train through accelerate's free_memory). Objects made from here
        # on, the trials' models among them, are collected as before.
        gc.freeze()
        end_quietly_on_sigterm()
    else:
        # The previous trial's model, trainer and optimizer hang in reference cycles until a collection.
        gc.collect()
    if device == "cpu":
        torch.set_num_threads(settings.cpus)
        with contextlib.suppress(OSError):  # elsewhere than Linux the peak stays the process's
            Path("/proc/self/clear_refs").write_text("5")  # restarts the peak RSS that getrusage reports
    else:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        # Trials sharing a card: this one's allocator may take only its share, so a trial that outgrows its
        # plan runs out of memory itself (status oom) instead of starving its neighbours.
        share = settings.gpu_share if 0 < settings.gpu_share < 1 else 1.0
        torch.cuda.set_per_process_memory_fraction(share)
    if WORKER.trials == 1:
        return TrialStart(worker_trial=1, since=WORKER.started_at, imported=imported_at, began=began)
    since = WORKER.last_trial_ended_at
    return TrialStart(worker_trial=WORKER.trials, since=since, imported=since, began=began)


def end_worker_trial() -> None:
    """Note the end of this process's trial: a later trial's start counts from here."""
    WORKER.last_trial_ended_at = time.time()


def kept_base_nbytes() -> int:
    """Device memory held by the base this worker keeps (KeptBase), 0 without one."""
    return WORKER.base.nbytes if WORKER.base is not None else 0


def base_for_trial(settings: TrialSettings, *, device: str, keep: bool) -> tuple[Any, bool]:
    """The trial's quantized base model, and whether it is a copy of the one this worker kept (KeptBase).

    A worker that kept the same model's base gives the trial a copy of it. If the trial may not keep one
    (`keep` false: no further trials here, or no room beside this trial), a kept base is handed over as
    the trial's own, or dropped if it is another model's. Otherwise the base is loaded and, with `keep`,
    a copy of it kept for later trials."""
    key = (settings.model_path, settings.model, device)
    kept = WORKER.base
    if kept is not None and kept.key == key:
        if keep:
            return copy.deepcopy(kept.model), True
        WORKER.base = None  # no room beside this trial: it trains the kept one itself
        return kept.model, True
    WORKER.base = None
    model = load_base_model(settings.model_path, settings.model, device=device)
    if keep:
        before = torch.cuda.memory_allocated() if device == "cuda" else 0
        kept_model = copy.deepcopy(model)
        nbytes = torch.cuda.memory_allocated() - before if device == "cuda" else 0
        WORKER.base = KeptBase(key=key, model=kept_model, nbytes=nbytes)
    return model, False


def room_to_keep_base(settings: TrialSettings, estimate: MemoryEstimate | None, *, device: str) -> bool:
    """Whether this trial's worker keeps a copy of the base beside the trial (KeptBase): only where Tune
    may reuse the worker, and on a GPU only where the trial's estimate plus the copy (the estimate's weight
    terms) still fits the trial's share of the card. A GPU trial without an estimate keeps none: whether it
    has room is not known. On CPU the copy takes host memory, which no estimate covers."""
    if not settings.reused_worker:
        return False
    if device == "cpu":
        return True
    if estimate is None or settings.memory is None:
        return False
    copy_gib = estimate.base_weights + estimate.dequant_scales + estimate.embeddings
    return estimate.total_gib + copy_gib <= settings.memory.card_gib * settings.memory.share
