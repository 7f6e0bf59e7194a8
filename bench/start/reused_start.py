"""A reused worker's trial start with the process's objects left out of Python's collections (gc.freeze at
the worker's first trial, as trainable.worker.start_worker_trial does) and without (gc.freeze made a no-op),
in alternating processes on the same host, model and trials.

    python -m bench.start.reused_start --config bench/packing/packing.yaml --trials 7 --repeats 3 --out results/
    python -m bench.start.reused_start --config bench/start/trial_start.yaml --out results/ model.name_or_path=TINY

Each process plans the config as the driver does (sweeps.plan.plan_sweep; on CUDA with the memory plan of
one trial per card, so the kept base is copied as in a sweep) and runs --trials trials one after another as
Tune runs them in one reused worker (trainable.train.run_trial): the config's initial points in turn, each
cut to --steps steps. The first trial loads the base; the later ones are the reused starts measured.
Processes alternate frozen, unfrozen, frozen, ... (--repeats of each). Appends a line per trial to
reused_start.jsonl under --out and prints, per mode, the median and range of each start part over the
reused trials.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from trainable.outcome import START_PARTS

MODES = ("frozen", "unfrozen")


def run_process(
    config: str, overrides: list[str], *, trials: int, steps: int, mode: str
) -> list[dict[str, Any]]:
    """The trials of one worker process, here; their first reports' start fields."""
    import torch

    from sweeps.config import load_config
    from sweeps.plan import plan_sweep
    from sweeps.resources import trial_memory
    from trainable.train import run_trial

    if mode == "unfrozen":
        gc.freeze = lambda: None  # this process only: the start as it was before the freeze
    plan = plan_sweep(load_config(config, overrides))
    train = dataclasses.replace(plan.trial.train, max_steps=steps, eval_every=steps)
    settings = dataclasses.replace(plan.trial, train=train, reused_worker=True, base_eval_loss=1.0)
    if torch.cuda.is_available():
        card_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
        settings = dataclasses.replace(settings, gpu_share=1.0, memory=trial_memory(plan, card_gib))
    points = [p.values for p in plan.points]
    rows = []
    for i in range(trials):
        reports: list[dict[str, Any]] = []

        def send(
            metrics: dict[str, Any], _checkpoint: str | None, sink: list[dict[str, Any]] = reports
        ) -> None:
            sink.append(metrics)

        run_trial(points[i % len(points)], settings, send=send)
        first = reports[0]
        rows.append(
            {
                "mode": mode,
                "worker_trial": first["worker_trial"],
                "base_copied": first["base_copied"],
                "startup_s": sum(first[p] for p in START_PARTS),
                **{p: first[p] for p in START_PARTS},
            }
        )
    return rows


def summarize(rows: list[dict[str, Any]]) -> str:
    lines = []
    for mode in MODES:
        reused = [r for r in rows if r["mode"] == mode and r["worker_trial"] > 1]
        if not reused:
            continue
        parts = []
        for name in ("startup_s", *START_PARTS[1:]):
            values = [r[name] for r in reused]
            parts.append(f"{name} {statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]")
        lines.append(f"{mode} ({len(reused)} reused trials): " + ", ".join(parts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.start.reused_start", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--trials", type=int, default=7, help="trials per process (the first loads the base)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per trial")
    parser.add_argument("--repeats", type=int, default=3, help="processes per mode, alternating")
    parser.add_argument("--out", required=True)
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # a process of the alternation
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.one:
        one = run_process(args.config, args.overrides, trials=args.trials, steps=args.steps, mode=args.one)
        print("ROWS " + json.dumps(one), flush=True)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for mode in MODES:
            command = [
                sys.executable,
                "-m",
                "bench.start.reused_start",
                "--config",
                args.config,
                "--trials",
                str(args.trials),
                "--steps",
                str(args.steps),
                "--out",
                args.out,
                "--one",
                mode,
                *args.overrides,
            ]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{mode} #{repeat} failed:\n{done.stderr[-4000:]}")
            line = next(x for x in done.stdout.splitlines() if x.startswith("ROWS "))
            rows += [{**row, "repeat": repeat} for row in json.loads(line[5:])]
    with open(out / "reused_start.jsonl", "a") as file:
        file.writelines(json.dumps(row) + "\n" for row in rows)
    print(summarize(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
