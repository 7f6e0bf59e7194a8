"""Fault injection for testing the sweep's fault handling with real faults, through the real code path.

    QLORA_SWEEPS_FAULTS="kill@4:r=8; oom@2:lora_alpha=16; nan@3" python -m sweeps.run ...

The driver reads the specification once from its own environment (parse_faults; a bad one stops it before
Ray starts) and hands the faults to every trial in its TrialSettings, so trials on any node get them. A
trial adds the InjectFaults callback (trainable.inject_faults) only when faults match its hyperparameters;
with none (always, outside tests) no fault code runs in a trial. This module only parses and matches, so
the driver imports no training library for it.

Each entry is `action@step[:key=value,...]`: at that optimizer step, a trial whose hyperparameters match
every key=value (all trials when none are given) gets the fault. `kill` ends the trial's process with
SIGKILL on its first attempt only (as a lost node would); `halt`, also on the first attempt only, ends
the driver's process group (the driver and the Ray it started) and then the trial with SIGKILL, as a
machine losing power would, right after the checkpoints the trial had saved by then; `oom` raises
torch.cuda.OutOfMemoryError, `nan` writes NaN into the LoRA weights so the loss turns NaN.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

ENV = "QLORA_SWEEPS_FAULTS"
Action = Literal["kill", "halt", "oom", "nan"]
ACTIONS: tuple[Action, ...] = ("kill", "halt", "oom", "nan")


@dataclass(frozen=True)
class Fault:
    action: Action
    step: int
    match: tuple[tuple[str, str], ...] = ()  # (hyperparameter, value as text) pairs a trial must all have
    driver_pid: int = 0  # halt: the process that parsed the specification, the driver

    def applies_to(self, hparams: dict[str, Any]) -> bool:
        return all(str(hparams.get(key)) == value for key, value in self.match)


def parse_faults(text: str) -> tuple[Fault, ...]:
    """The faults of a specification such as "kill@4:r=8; nan@3"; ValueError naming a bad entry."""
    faults = []
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        head, _, conditions = entry.partition(":")
        action, _, step = head.strip().partition("@")
        pairs = [c.split("=", 1) for c in conditions.split(",") if c.strip()]
        if action not in ACTIONS or not step.strip().isdigit() or any(len(p) != 2 for p in pairs):
            raise ValueError(
                f"{ENV}: bad entry {entry!r}; expected action@step[:key=value,...] with action one of "
                f"{', '.join(ACTIONS)}"
            )
        match = tuple((key.strip(), value.strip()) for key, value in pairs)
        driver_pid = os.getpid() if action == "halt" else 0  # the driver parses the faults (sweeps.plan)
        faults.append(Fault(action, int(step), match, driver_pid))  # type: ignore[arg-type]
    return tuple(faults)
