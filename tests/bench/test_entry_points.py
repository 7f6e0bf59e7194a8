"""Every benchmark a user runs as `python -m bench...` builds its command line and imports what it needs
(`--help`), and the ones a CPU runs in seconds run on a tiny case, here or in their own test file (the
replay, the scale benchmark, the step and memory benchmarks' refusals without a GPU): a benchmark nobody
runs for weeks must not be the first to find that the project's API moved (mypy checks the calls inside
them)."""

from __future__ import annotations

import ast
import importlib
import json
import sys
from pathlib import Path

import pytest

from analysis.experiment import RESULTS, write_table
from tests.conftest import trial_result
from trainable.outcome import START_PARTS, TrialReport
from trainable.schema import TrialResult, results_table

REPO = Path(__file__).resolve().parents[2]


def find_entry_points() -> list[str]:
    """Every module under bench/ with a main(): what a user runs as `python -m MODULE`."""
    found = []
    for path in sorted((REPO / "bench").rglob("*.py")):
        tree = ast.parse(path.read_text())
        if any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body):
            found.append(".".join(path.relative_to(REPO).with_suffix("").parts))
    return found


ENTRY_POINTS = find_entry_points()


def test_the_entry_points_are_found() -> None:
    assert len(ENTRY_POINTS) >= 12
    for module in (
        "bench.make_model",
        "bench.search.replay",
        "bench.start.trial_setup",
        "bench.sweep.summary",
    ):
        assert module in ENTRY_POINTS


def run_main(module: str, *args: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m module args...`, in this process: its main() reads the arguments from sys.argv."""
    monkeypatch.setattr(sys, "argv", [module, *args])
    importlib.import_module(module).main()


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_describes_the_benchmark(
    module: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps at the terminal's width: one line per paragraph
    # bench.generation.dequantized sets OMP_WAIT_POLICY when imported, as the report does; not for later tests.
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    with pytest.raises(SystemExit) as stop:
        run_main(module, "--help", monkeypatch=monkeypatch)
    assert stop.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    summary = (importlib.import_module(module).__doc__ or "").split("\n\n")[0]
    assert out.startswith("usage:") and summary and " ".join(summary.split()) in out


def test_make_model_writes_a_tiny_checkpoint_with_the_default_models_tokenizer_once(
    tokenizer_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoConfig, AutoTokenizer

    out = tmp_path / "tiny"
    args = ("--shape", "tiny", "--tokenizer", "smollm2", "--out", str(out))
    run_main("bench.make_model", *args, monkeypatch=monkeypatch)
    config = AutoConfig.from_pretrained(out)
    assert (config.hidden_size, config.num_hidden_layers) == (64, 2)  # bench.recipes.SHAPES["tiny"]
    assert (
        config.vocab_size
        == len(AutoTokenizer.from_pretrained(out))
        == len(AutoTokenizer.from_pretrained(tokenizer_path))
    )
    weights = out / "model.safetensors"
    written = weights.stat().st_mtime_ns
    run_main("bench.make_model", *args, monkeypatch=monkeypatch)
    assert weights.stat().st_mtime_ns == written  # kept, not made again


def finished_trial(
    experiment: Path, trial_id: str, *, device: str, start: float, seconds: float
) -> TrialResult:
    """A finished trial as the driver leaves it: Tune's result.json (the trial's reports, with Tune's
    timestamp and time_total_s) and its row of results.parquet."""
    report = TrialReport(
        eval_loss=0.5,
        step=40,
        base_eval_loss=2.0,
        tokens_per_s=1000.0,
        peak_memory_gib=0.5,
        cuda_visible_devices=device,
        visible_gpus=1,
        gpu_ids=device,
        worker_trial=1,
        **dict.fromkeys(START_PARTS, 0.4),
    )
    folder = experiment / f"train_trial_{trial_id}"
    folder.mkdir(parents=True)
    last = {**report.to_tune(), "trial_id": trial_id, "timestamp": start + seconds, "time_total_s": seconds}
    (folder / "result.json").write_text(json.dumps({**last, "step": 20}) + "\n" + json.dumps(last) + "\n")
    return trial_result(
        trial_id, 0.5, r=16, learning_rate=1e-3, wall_time_s=seconds, trial_path=str(folder), last=report
    )


def test_sweep_summary_records_each_trials_gpu_and_how_many_ran_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    experiment = tmp_path / "two-at-a-time"
    # a and b overlap on GPUs 0 and 1; c starts on GPU 0 after a ended: at most 2 at once.
    rows = [
        finished_trial(experiment, "a", device="0", start=100.0, seconds=20.0),
        finished_trial(experiment, "b", device="1", start=105.0, seconds=20.0),
        finished_trial(experiment, "c", device="0", start=121.0, seconds=20.0),
    ]
    write_table(results_table(rows), experiment, RESULTS)
    out = tmp_path / "out"
    run_main(
        "bench.sweep.summary",
        str(experiment),
        "--label",
        "two",
        "--wall-s",
        "50.5",
        "--out",
        str(out),
        monkeypatch=monkeypatch,
    )
    (record,) = [json.loads(line) for line in (out / "sweeps.jsonl").read_text().splitlines()]
    assert (record["label"], record["experiment"], record["sweep_wall_s"]) == ("two", "two-at-a-time", 50.5)
    assert record["trials"] == 3 and record["most_trials_at_once"] == 2
    assert record["distinct_devices"] == ["0", "1"] and record["every_trial_saw_one_gpu"]
    assert sorted(t["cuda_visible_devices"] for t in record["per_trial"]) == ["0", "0", "1"]
    trial = record["per_trial"][0]
    assert trial["steps"] == 40 and trial["startup_s"] == 2.0  # the five start parts of 0.4 s
    assert trial["hparams"]["r"] == 16 and trial["hparams"]["learning_rate"] == 1e-3
