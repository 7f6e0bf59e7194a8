"""The training-step benchmark's CPU-checkable parts: its summary over repeats and its refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.step import train_step
from bench.step.train_step import build_cases, memory_left_under_textbook, peaks_of, spread, summarize


def record(
    case: str, label: str, repeat: int, tokens_per_s: float, step_s: float, **extra: Any
) -> dict[str, Any]:
    recipe = "textbook" if label == "textbook" else "project"
    return {
        "case": case,
        "label": label,
        "recipe": recipe,
        "repeat": repeat,
        "tokens_per_s": tokens_per_s,
        "step_s_median": step_s,
        "targets": "all",
        "batches": "4x1024",
        "steps": 8,
        "peak_gib": 6.0,
        "mfu": 0.2,
        **extra,
    }


def test_spread_is_median_and_range() -> None:
    s = spread([1.62, 1.28, 1.44])
    assert (s.median, s.low, s.high) == (1.44, 1.28, 1.62)
    assert s.relative == pytest.approx(0.34 / 1.44)
    assert s.as_dict(2) == {"median": 1.44, "min": 1.28, "max": 1.62, "spread": round(0.34 / 1.44, 4)}
    with pytest.raises(ValueError, match="no values"):
        spread([])


def test_ratio_pairs_each_repeat_with_its_own_textbook() -> None:
    # A slow host in repeat 1 slows both sides: per-repeat ratios are 1.5, 1.5, 3.0. Dividing medians of
    # tokens/s (300 / 100 = 3.0) would credit the project with the textbook's bad luck.
    records = [
        record("fixed", "textbook", 0, 100, 0.70),
        record("fixed", "project", 0, 150, 0.46),
        record("fixed", "textbook", 1, 200, 0.35),
        record("fixed", "project", 1, 300, 0.23),
        record("fixed", "textbook", 2, 100, 0.70),
        record("fixed", "project", 2, 300, 0.23),
        record("realistic", "textbook", 0, 1000, 1.2),
        record("realistic", "project", 0, 4000, 0.3),
    ]
    summary = {(s["case"], s["label"]): s for s in summarize(records)}
    project = summary["fixed", "project"]
    assert project["repeats"] == 3
    assert project["ratio"] == {"median": 1.5, "min": 1.5, "max": 3.0, "spread": 1.0}
    assert project["step_s"]["median"] == 0.23 and project["step_s"]["spread"] == 1.0
    assert summary["fixed", "textbook"]["ratio"]["median"] == 1.0
    assert summary["realistic", "project"]["ratio"]["median"] == 4.0  # cases are never mixed


def test_a_variant_without_its_textbook_has_no_ratio() -> None:
    records = [record("memory", "no-checkpointing", r, 13000, 0.3) for r in range(3)]
    (summary,) = summarize(records)
    assert summary["ratio"] is None and summary["tokens_per_s"]["median"] == 13000


def test_unchecked_layers_get_the_memory_the_textbook_peak_leaves() -> None:
    records = [
        record("memory", "textbook", 0, 5870, 0.7, peak_gib=8.38),
        record("memory", "project", 0, 9000, 0.45, peak_gib=6.36),
        record("fixed", "textbook", 0, 5870, 0.7, peak_gib=20.0),
    ]
    peaks = peaks_of(records, "memory")
    assert peaks == {"textbook": 8.38, "project": 6.36}  # another case's textbook is not this one's
    assert memory_left_under_textbook(peaks, case="memory") == 1.77  # 8.38 - 6.36 - 0.25 margin
    assert memory_left_under_textbook({"textbook": 6.0, "project": 6.1}, case="memory") == 0.0
    with pytest.raises(ValueError, match="case memory: the textbook's and the project's peaks"):
        memory_left_under_textbook({"project": 6.36}, case="memory")


def test_every_case_runs_the_textbook_beside_the_project_on_the_same_batches() -> None:
    cases = build_cases("7b", steps=8, warmup=3, realistic_steps=40, seed=0)
    for case in cases.values():
        assert case.variants[0].recipe == "textbook" and any(v.recipe == "project" for v in case.variants)
    assert cases["realistic"].steps == 40 and cases["realistic"].batches.batch_size == 8
    assert cases["fixed"].batches.label == "4x1024"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cases", "fixed,fast"], "--cases 'fixed,fast': unknown fast"),
        (["--repeats", "2"], "--repeats 2: at least 3"),
        (["--cases", "realistic", "--realistic-steps", "8"], "--realistic-steps 8: at least 40"),
        (["--cases", "fixed"], "needs a CUDA GPU"),  # valid options: on a CPU it stops before any work
    ],
)
def test_bad_options_stop_before_any_work(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    if message == "needs a CUDA GPU" and train_step.torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        train_step.main(["--out", str(tmp_path / "out"), *argv])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
