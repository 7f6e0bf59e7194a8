"""What the driver prints, besides Tune's own progress table: the plan, the resources, where its start went,
the re-checks. (The results table it prints at the end is sweeps.results.format_results.)"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from sweeps.config import SearchSettings
from sweeps.plan import SweepPlan
from sweeps.resources import TrialResources


@dataclasses.dataclass
class StartClock:
    """Where the driver's time goes before Tune starts the first trial: each part from the previous mark,
    printed once as `driver ready in 45 s: imports 6.1 s, plan 3.0 s, ...` (docs/cost.md#the-drivers-start)."""

    last: float = dataclasses.field(default_factory=time.perf_counter)
    parts: list[tuple[str, float]] = dataclasses.field(default_factory=list)

    def mark(self, part: str) -> None:
        now = time.perf_counter()
        self.parts.append((part, now - self.last))
        self.last = now

    def describe(self) -> str:
        total = sum(seconds for _, seconds in self.parts)
        spent = ", ".join(f"{part} {seconds:.1f} s" for part, seconds in self.parts)
        return f"driver ready in {total:.0f} s: {spent}"


def describe_plan(plan: SweepPlan) -> str:
    data = plan.summary.data
    dropped = data["dropped"]["train"] + data["dropped"]["eval"]
    return (
        f"experiment {plan.experiment_uri}\n"
        f"model {plan.summary.model_path}\n"
        f"data: {data['train_examples']} train / {data['eval_examples']} eval examples, "
        f"{data['truncated']['train']} train and {data['truncated']['eval']} eval cut at "
        f"data.max_length={plan.config.data.max_length}, {dropped} dropped (nothing left to learn after the cut)"
        + "".join(f"\n{warning}" for warning in data["warnings"])
    )


def describe_resources(resources: TrialResources) -> str:
    memory = resources.memory
    where = f"{resources.trials_per_gpu} trial(s) per GPU" if resources.gpus else "CPU trials"
    check = (
        f"memory check: each trial's estimate against {memory.card_gib * memory.share:.3g} GiB "
        f"(1/{resources.trials_per_gpu} of {memory.card_gib:.3g} GiB)"
        if memory
        else "memory check: off"
    )
    workers = (
        "workers reused between trials"
        if resources.reuse_workers
        else f"a new worker process per trial ({resources.no_reuse_reason or 'search.reuse_workers is off'})"
    )
    line = f"resources: {where}, {resources.concurrency} at once; {check}; {workers}"
    if resources.gpus and resources.trials_per_gpu > 1 and resources.mps is not None:
        line += (
            "; CUDA MPS on: the trials sharing a card run side by side"
            if resources.mps
            else "\nnote: no CUDA MPS on the GPU worker asked, so the trials sharing a card take turns on it, each "
            "less than half as fast as alone; start `nvidia-cuda-mps-control -d` on each GPU node first "
            "(docs/cost.md#mps)"
        )
    return line


def describe_rechecks(points: list[dict[str, Any]], search: SearchSettings) -> str:
    configurations = len(points) // search.recheck_seeds
    return (
        f"rechecks: {len(points)} trial(s), {search.recheck_seeds} new seed(s) for each of the best "
        f"{configurations} configuration(s)"
    )
