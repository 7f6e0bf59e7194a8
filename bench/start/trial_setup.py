"""Trial setup time: from a fresh Python process to the end of the first optimizer step, on the trial's code.

    python -m bench.start.trial_setup --model /tmp/llama7b-shape --out results/

Runs the measured process several times: without the quantized-base cache, then filling it (first trial
on a node), then from it (every later trial on that node), each with the page cache warm (the checkpoint
was just read) and, where the machine lets us drop it, cold. The measured process prepares the trial's
inputs as the driver does (`trainable.prepare.prepare_trial`: the bundled data, tokenized once; excluded
from the clock, since a trial receives them ready-made) and then runs the trial's own setup,
`trainable.train.setup_trial` (tokenizer, 4-bit base, LoRA, trl SFTTrainer with the fast path), timing each
part; the first optimizer step ends the clock. The base model's eval loss, which a fresh trial also
computes before training, is timed separately.

Run from the repository root (as bench/suite.sh does). Writes setup.jsonl (one line per run) under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def measured_process(model: str, cache: str) -> None:
    """The body of one measured process; `START` (set by the parent just before spawning) is time zero."""
    start = float(os.environ["START"])
    marks: dict[str, float] = {"python_started": time.time() - start}
    import torch
    from transformers import TrainerCallback

    from trainable.prepare import prepare_trial
    from trainable.reporter import TRAINER_EVAL_LOSS
    from trainable.settings import DataSettings, Hyperparameters, ModelSettings, TrainSettings
    from trainable.train import setup_trial

    marks["imports"] = time.time() - start
    settings = ModelSettings(name_or_path=model, cache_quantized=cache != "off")
    # What the driver hands every trial (sweeps.plan.plan_sweep calls the same function).
    trial = prepare_trial(
        model=settings,
        data=DataSettings(max_length=512, max_eval_examples=16),
        train=TrainSettings(max_steps=1, batch_size=4, eval_every=1),
    ).settings
    start_trial = time.time()  # a trial receives the above ready-made
    marks["driver_work_excluded"] = start_trial - start - marks["imports"]
    shift = marks["driver_work_excluded"]

    def mark(name: str) -> None:
        if name == "base_model_loaded":
            torch.cuda.synchronize()  # the copy to the GPU is asynchronous
        marks[name] = time.time() - start - shift

    class FirstStep(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            torch.cuda.synchronize()
            mark("first_optimizer_step")
            control.should_training_stop = True

    output = f"/tmp/setup-trial-{os.getpid()}"
    trainer = setup_trial(
        Hyperparameters(), trial, output_dir=output, device="cuda", callbacks=[FirstStep()], on_stage=mark
    )
    t = time.time()
    base_eval = trainer.evaluate()[TRAINER_EVAL_LOSS]
    torch.cuda.synchronize()
    eval_s = time.time() - t
    shift += eval_s  # the base model's eval, reported on its own
    trainer.train()  # the step's own evaluation and checkpoint come after the mark
    print(
        "RESULT "
        + json.dumps(
            {
                "marks": {k: round(v, 2) for k, v in marks.items()},
                "base_eval_s": round(eval_s, 2),
                "base_eval_loss": base_eval,
            }
        )
    )


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", required=True, help="a local checkpoint folder (bf16 safetensors) with a tokenizer"
    )
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    p.add_argument("--cold", action="store_true", help="also measure with the page cache dropped")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        measured_process(args.model, args.child)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(f"/tmp/qlora-setup-cache-{os.getpid()}")
    runs = [
        ("fill", "first trial on the node (quantize, save to the cache)", False),
        ("on", "later trial (load the cached 4-bit base)", False),
    ]
    if args.cold:
        runs += [("off", "no cache, page cache dropped", True), ("on", "cached, page cache dropped", True)]
    for mode, label, cold in runs:
        if cold and not drop_page_cache():
            print(f"skip {label}: cannot drop the page cache here", flush=True)
            continue
        env = dict(os.environ, QLORA_SWEEPS_CACHE=str(cache_dir), START=repr(time.time()))
        command = [sys.executable, "-m", "bench.start.trial_setup", "--model", args.model, "--child", mode]
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{label}: failed\n{proc.stderr[-3000:]}", flush=True)
            continue
        result = json.loads(lines[-1][len("RESULT ") :])
        record = {
            "run": label,
            "cache": mode,
            "page_cache": "cold" if cold else "warm",
            "setup_s": result["marks"]["first_optimizer_step"],
            **result,
        }
        print(json.dumps(record), flush=True)
        with open(out / "setup.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
