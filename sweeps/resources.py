"""How a sweep's trials use the cluster: GPUs per trial, how many trials share a card, trials at once, and
the memory plan every trial checks before it loads anything.

    resources = plan_resources(plan, ray.cluster_resources())     # after ray.init, before the Tuner
    resources.gpu_share, resources.concurrency, resources.memory

The card's memory is `search.gpu_memory_gib` when set, else asked of a GPU worker by one short Ray task
holding a GPU (the same code on a laptop and on a cluster whose head node has no GPU; the driver itself
never touches CUDA, so it holds no memory on a card its trials share). A worker without CUDA (Ray's fake
GPUs in tests) answers nothing: no estimate, one trial per GPU unless `search.trials_per_gpu` says more.
The same worker says whether CUDA MPS serves its node, which decides how fast trials sharing a card run.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from sweeps.config import SweepConfig
from sweeps.plan import SweepPlan
from trainable.memory import (
    GIB,
    MemoryEstimate,
    TrialMemory,
    estimate_trial_memory,
    largest_batch_tokens,
    load_model_shape,
)
from trainable.search_space import parse_space
from trainable.settings import MEMORY_COSTS

# auto packs trials into 90% of the card: the estimate is calibrated to within 10% of measured peaks.
SAFETY_MARGIN = 0.9
# Ray keeps fractional resources to 4 decimals; a share rounded down lets N trials of 1/N fill a card.
_SHARE_DECIMALS = 4
CARD_QUERY_TIMEOUT_S = 120  # a cluster may have to start a GPU node first


@dataclass(frozen=True)
class TrialResources:
    gpus: int  # 1 when trials run on GPUs, 0 for CPU trials
    trials_per_gpu: int
    concurrency: int  # trials at once
    memory: TrialMemory | None  # None: no estimate (CPU trials, unknown card or a shape the estimate lacks)
    reuse_workers: bool = False  # Tune runs the next trial in an ended trial's worker process
    no_reuse_reason: str = ""  # why not, when search.reuse_workers asked for it
    mps: bool | None = None  # CUDA MPS serves the GPU worker asked (Card.mps); None: not asked

    @property
    def gpu_share(self) -> float:
        """GPUs one trial asks Ray for."""
        share = self.gpus / self.trials_per_gpu
        return math.floor(share * 10**_SHARE_DECIMALS) / 10**_SHARE_DECIMALS


def trial_gpus(config: SweepConfig, resources: dict[str, float]) -> int:
    """GPUs per trial: `search.gpus_per_trial`, where "auto" means 1 if the cluster has GPUs."""
    gpus = config.search.gpus_per_trial
    if gpus == "auto":
        return 1 if resources.get("GPU", 0) >= 1 else 0
    return gpus


def plan_resources(plan: SweepPlan, resources: dict[str, float]) -> TrialResources:
    """Trials per GPU (search.trials_per_gpu, auto from the largest configuration's estimate), the memory
    plan each trial checks, and as many trials at once as the cluster holds now (an autoscaling cluster
    should set search.max_concurrent_trials itself: with a searcher, Tune keeps only one trial pending, so
    without a cap trials would run one by one)."""
    search = plan.config.search
    gpus = trial_gpus(plan.config, resources)
    card = ask_card() if gpus and not search.gpu_memory_gib else None
    card_gib = search.gpu_memory_gib or (card.memory_gib if card else None)
    memory = trial_memory(plan, card_gib) if card_gib else None
    per_gpu = search.trials_per_gpu
    if per_gpu == "auto":
        per_gpu = auto_trials_per_gpu(plan.config, memory) if memory else 1
    if memory is not None:
        memory = dataclasses.replace(memory, share=1 / per_gpu)
    reason = worker_reuse_problem(plan.config, gpus=gpus, memory=memory) if search.reuse_workers else ""
    capacity = (
        int(resources.get("GPU", 0)) * per_gpu
        if gpus
        else int(resources.get("CPU", 1)) // search.cpus_per_trial
    )
    return TrialResources(
        gpus=gpus,
        trials_per_gpu=per_gpu,
        concurrency=search.max_concurrent_trials or max(1, capacity),
        memory=memory,
        reuse_workers=search.reuse_workers and not reason,
        no_reuse_reason=reason,
        mps=card.mps if card else None,
    )


def worker_reuse_problem(config: SweepConfig, *, gpus: int, memory: TrialMemory | None) -> str:
    """Why trials may not reuse each other's worker processes, or "" where they may.

    A trial sets everything process-wide it depends on afresh and frees what the trial before it left
    (trainable.worker.start_worker_trial), and Tune reuses a process only for a trial of the same resources.
    What it cannot free: bitsandbytes' paged optimizers put each state of 100k elements or more in CUDA
    unified memory, which bitsandbytes never releases (there is no call for it), so a reused process would
    keep every earlier trial's states. Reuse is off for GPU trials whose largest configuration pages any
    state, or where the estimate that tells is off."""
    if not gpus or config.train.optimizer == "adamw_torch":  # CPU trials page nothing
        return ""
    if memory is None:
        return "the memory estimate is off, so whether the paged optimizer's states pile up is not known"
    if any(e.paged_optimizer_states > 0 for e in configuration_estimates(config, memory)):
        return "the paged optimizer's states (CUDA unified memory, never freed by bitsandbytes) would pile up"
    return ""


def trial_memory(plan: SweepPlan, card_gib: float) -> TrialMemory | None:
    """The memory plan of the sweep's trials, from the model's config.json and the tokenized data; None
    (with a note) for a model whose shape the estimate does not know."""
    config, trial = plan.config, plan.trial
    try:
        shape = load_model_shape(trial.model_path)
    except ValueError as err:
        print(f"memory estimate: off ({err})", flush=True)
        return None
    lengths = [len(ids) for ids in trial.train_data["input_ids"]]
    padding_free = config.model.fused_kernels and config.train.padding_free  # the CUDA fast path's batches
    return TrialMemory(
        model=shape,
        linear_modules=tuple(plan.summary.linear_modules),
        batch_size=config.train.batch_size,
        longest=max(lengths),
        largest_batch_tokens=largest_batch_tokens(lengths, config.train.batch_size) if padding_free else None,
        quantization=config.model.quantization,
        double_quant=config.model.double_quant,
        # What the trial uses on a GPU (trainable.train.build_trainer): bf16, paged AdamW unless set.
        compute_dtype="bfloat16" if config.model.compute_dtype == "auto" else config.model.compute_dtype,
        gradient_checkpointing=config.model.gradient_checkpointing,
        activation_memory_gib=config.model.activation_memory_gib,
        optimizer="paged_adamw_32bit" if config.train.optimizer == "auto" else config.train.optimizer,
        card_gib=card_gib,
        share=1.0,
    )


def largest_estimate(config: SweepConfig, memory: TrialMemory) -> MemoryEstimate:
    """The estimate of the space's largest configuration (configuration_estimates)."""
    return max(configuration_estimates(config, memory), key=lambda e: e.total_gib)


def configuration_estimates(config: SweepConfig, memory: TrialMemory) -> list[MemoryEstimate]:
    """The estimates of the space's costliest configurations: every hyperparameter that costs memory
    (trainable.settings.MEMORY_COSTS) at the largest value the space allows, or at each of its choices; one
    estimate per combination of the latter (target_modules: one per value). Those not searched take the
    `lora` section's value."""
    space = config.search.space
    dimensions = parse_space({name: space[name] for name in MEMORY_COSTS if name in space})
    largest: dict[str, Any] = {}
    each: dict[str, list[Any]] = {}
    for name, cost in MEMORY_COSTS.items():
        if name not in dimensions:
            continue
        if cost == "largest":
            largest[name] = dimensions[name].largest()
        else:
            each[name] = list(dimensions[name].values)
    costliest = dataclasses.replace(config.lora, **largest)
    combinations = [dict(zip(each, values, strict=True)) for values in itertools.product(*each.values())]
    return [estimate_trial_memory(memory, dataclasses.replace(costliest, **c)) for c in combinations]


def auto_trials_per_gpu(config: SweepConfig, memory: TrialMemory) -> int:
    """As many trials per card as the largest configuration fits within SAFETY_MARGIN of it (at least 1):
    packing by the largest means no trial is skipped for sharing a card."""
    worst = largest_estimate(config, memory).total_gib
    return max(1, min(64, int(SAFETY_MARGIN * memory.card_gib // worst)))


@dataclass(frozen=True)
class Card:
    """What a GPU worker says of its card."""

    memory_gib: float
    # A CUDA MPS control daemon answers on the worker's node: processes sharing the card run their kernels
    # side by side in one context; without it the card takes turns between them (docs/cost.md#mps).
    mps: bool


def ask_card() -> Card | None:
    """A GPU worker's card, asked through one Ray task holding a GPU; None where that worker has no CUDA
    (fake GPUs) or none answers within CARD_QUERY_TIMEOUT_S."""
    import ray

    task = ray.remote(_card_here).options(num_gpus=1, num_cpus=0)
    try:
        answer: Card | None = ray.get(task.remote(), timeout=CARD_QUERY_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        answer = None
    if answer is None:
        print(
            "memory estimate: off (no GPU worker reported its memory; set search.gpu_memory_gib)", flush=True
        )
    return answer


def _card_here() -> Card | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return Card(memory_gib=torch.cuda.get_device_properties(0).total_memory / GIB, mps=mps_running())


def mps_running(control: str = "nvidia-cuda-mps-control") -> bool:
    """Whether a CUDA MPS control daemon answers on this node: its front end (`control`, on PATH) asked for
    the daemon's server list exits 0. False where the program is missing, fails or does not answer in 5 s."""
    program = shutil.which(control)
    if program is None:
        return False
    try:
        done = subprocess.run([program], input="get_server_list\n", capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0
