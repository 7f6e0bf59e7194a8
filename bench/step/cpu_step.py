"""A CPU trial's training step, padded batches against padding-free ones, in one process.

    python -m bench.step.cpu_step --steps 6 --repeats 3 --out bench/step/results/cpu-step-DATE.jsonl

The default local sweep's trial (sweeps/configs/local.yaml: the embedded SmolLM2-135M-Instruct in 4-bit,
its initial point, batch 8 of the bundled tasks) built with trainable.train.setup_trial as a trial builds
it, once with `train.padding_free` off and once on, alternately, --repeats times each. Each run times
--steps optimizer steps after one untimed warm-up step (the same batches in both modes: the same seed).
Prints and appends one JSON line per run, then one with the median and range of each mode's seconds per
step and of the ratio of the pairs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from bench.records import append_jsonl, spread
from sweeps.baselines import calibrated_learning_rate
from sweeps.config import load_config
from trainable.hardware import describe_cpu
from trainable.prepare import prepare_trial
from trainable.settings import Hyperparameters
from trainable.train import setup_trial


class StepClock(TrainerCallback):
    """The wall time of each optimizer step."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
        self.ends.append(time.perf_counter())

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.ends.append(time.perf_counter())


def time_steps(*, padding_free: bool, steps: int) -> dict[str, Any]:
    config = load_config("local")
    train = dataclasses.replace(
        config.train, max_steps=steps + 1, eval_every=steps + 1, padding_free=padding_free
    )
    trial = prepare_trial(
        model=config.model, data=config.data, train=train, cpus=torch.get_num_threads()
    ).settings
    # The local sweep's one trial: its first starting point (the calibrated default, SmolLM2's rate).
    point = config.starting_points(calibrated_learning_rate(576))[0].values
    hparams = Hyperparameters(**{**dataclasses.asdict(config.lora), **point})
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        trainer = setup_trial(hparams, trial, output_dir=out, device="cpu", callbacks=[clock])
        trainer.args.eval_strategy = trainer.args.save_strategy = "no"  # the steps alone
        trainer.train()
    seconds = [b - a for a, b in zip(clock.ends[1:-1], clock.ends[2:], strict=False)]  # after the warm-up
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return {
        "padding_free": padding_free,
        "steps": len(seconds),
        "s_per_step": statistics.median(seconds),
        "step_s": [round(s, 3) for s in seconds],
        "losses": losses,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per run (after one warm-up)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each mode, alternating")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    machine = {
        "cpu": describe_cpu(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    runs = []
    for repeat in range(args.repeats):
        for padding_free in (False, True):
            run = {"repeat": repeat, **time_steps(padding_free=padding_free, steps=args.steps), **machine}
            runs.append(run)
            print(json.dumps(run), flush=True)
    padded = [r["s_per_step"] for r in runs if not r["padding_free"]]
    free = [r["s_per_step"] for r in runs if r["padding_free"]]
    summary = {
        "summary": True,
        "padded_s_per_step": spread(padded),
        "padding_free_s_per_step": spread(free),
        "speedup": spread([a / b for a, b in zip(padded, free, strict=True)]),
        **machine,
    }
    print(json.dumps(summary), flush=True)
    append_jsonl(args.out, [*runs, summary])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
