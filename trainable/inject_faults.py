"""The faults of trainable/faults.py done in a trial: the trainer callback a trial adds only when faults
match its hyperparameters. Apart from trainable/faults.py, which the driver imports to parse them, so that
the driver imports no training library for it.
"""

from __future__ import annotations

import os
import signal

import torch
from transformers import TrainerCallback

from trainable.faults import ENV as FAULTS_ENV
from trainable.faults import Fault


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
            if fault.action == "halt" and self.retries == 0:
                # The driver's group holds the Ray processes it started; this worker is in a group of its own.
                os.killpg(os.getpgid(fault.driver_pid), signal.SIGKILL)
                os.kill(os.getpid(), signal.SIGKILL)
            if fault.action == "oom":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. (injected by " + FAULTS_ENV + ")")
            if fault.action == "nan" and model is not None:
                with torch.no_grad():
                    for name, param in model.named_parameters():
                        if "lora_" in name:
                            param.fill_(float("nan"))
