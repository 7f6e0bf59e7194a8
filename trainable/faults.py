"""Fault injection for testing the sweep's fault handling with real faults, through the real code path.

    QLORA_SWEEPS_FAULTS="kill@4:r=8; oom@2:lora_alpha=16; nan@3"

Each entry is `action@step[:key=value,...]`: at that optimizer step, a trial whose hyperparameters match
every key=value (all trials when none are given) gets the fault. `kill` ends the trial's process with
SIGKILL on its first attempt only (as a lost node would), `oom` raises torch.cuda.OutOfMemoryError, `nan`
writes NaN into the LoRA weights so the loss turns NaN. Unset (always, outside tests), it does nothing.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import TrainerCallback

ENV = "QLORA_SWEEPS_FAULTS"


@dataclass(frozen=True)
class Fault:
    action: Literal["kill", "oom", "nan"]
    step: int
    match: dict[str, str]


def parse_faults(text: str) -> list[Fault]:
    faults = []
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        head, _, conditions = entry.partition(":")
        action, _, step = head.partition("@")
        if action not in ("kill", "oom", "nan") or not step.isdigit():
            raise ValueError(f"{ENV}: bad entry {entry!r}; expected action@step[:key=value,...]")
        match = dict(c.split("=", 1) for c in conditions.split(",") if "=" in c)
        faults.append(Fault(action, int(step), match))  # type: ignore[arg-type]
    return faults


def faults_for(hparams: dict[str, Any]) -> list[Fault]:
    faults = parse_faults(os.environ.get(ENV, ""))
    return [f for f in faults if all(str(hparams.get(k)) == v for k, v in f.match.items())]


class InjectFaults(TrainerCallback):
    def __init__(self, faults: list[Fault], *, retries: int) -> None:
        self.faults = faults
        self.retries = retries

    def on_step_end(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        for fault in self.faults:
            if state.global_step != fault.step:
                continue
            if fault.action == "kill" and self.retries == 0:
                os.kill(os.getpid(), signal.SIGKILL)
            if fault.action == "oom":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. (injected by " + ENV + ")")
            if fault.action == "nan" and model is not None:
                with torch.no_grad():
                    for name, param in model.named_parameters():
                        if "lora_" in name:
                            param.fill_(float("nan"))
