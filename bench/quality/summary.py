"""The quality benchmark's table: for each finished sweep of bench/quality/quality.yaml, what its report found.

    python -m bench.quality.summary experiments/quality-bundled-* experiments/quality-dm_math-* \
        --out bench/quality/results/quality-<date>.jsonl

One JSON line per experiment, and the Markdown table docs/report.md shows: the held-out test prompts scored,
exact match (95% interval) of the base model, each baseline, the #1 and the most accurate finalist (only
finalists are scored), the calibrated default against QLoRA's recipe and the search's best finalist against
the best baseline (difference, 95% interval, McNemar p), and the GPU-hours of the baselines and of the
search beyond them. Everything is read from the experiment folder (leaderboard.parquet,
paired_tests.parquet, results.parquet) as the report wrote it.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.experiment import LEADERBOARD, PAIRED_TESTS, load_experiment
from analysis.generate import BASE
from trainable.outcome import BASELINE
from trainable.schema import BASELINE_NAME, GPU_SECONDS, ORIGIN, TRIAL_ID


def summarize(path: str | Path) -> dict[str, Any]:
    """The benchmark's row for one experiment whose report has run."""
    experiment = load_experiment(path)
    board = pd.read_parquet(experiment.path / LEADERBOARD).set_index("candidate")
    paired = pd.read_parquet(experiment.path / PAIRED_TESTS)
    results = experiment.results
    trials = board[board[TRIAL_ID].notna() & board["exact_match"].notna()]

    def score(candidate: str) -> dict[str, Any]:
        row = board.loc[candidate]
        return {
            "candidate": candidate,
            "exact_match": float(row["exact_match"]),
            "low": float(row["exact_match_low"]),
            "high": float(row["exact_match_high"]),
        }

    def test(a: str | None, b: str | None) -> dict[str, Any] | None:
        """a against b on held-out exact match, as the report's paired tests have it."""
        rows = paired[
            (paired["candidate"] == a) & (paired["other"] == b) & (paired["metric"] == "exact_match")
        ]
        if a is None or b is None or rows.empty:
            return None
        t = rows.iloc[0]
        return {
            "candidate": a,
            "delta": float(t["delta"]),
            "low": float(t["low"]),
            "high": float(t["high"]),
            "p": float(t["p_value"]),
            "verdict": str(t["verdict"]),
        }

    ranked = board[board["rank"].notna()].sort_values("rank")
    first = str(ranked.index[0])
    best = next((str(c) for c, b in board["best_baseline"].items() if b), None)
    baselines = results[results[ORIGIN] == BASELINE]
    by_name = dict(zip(baselines[BASELINE_NAME].astype(str), baselines[TRIAL_ID].astype(str), strict=True))
    # The search's own best: the highest-ranked finalist that is not a baseline.
    searched = next(
        (str(c) for c in ranked.index if str(c) in trials.index and str(c) not in by_name.values()), None
    )
    hours = results[GPU_SECONDS].sum() / 3600
    baseline_hours = baselines[GPU_SECONDS].sum() / 3600
    return {
        "experiment": experiment.name,
        "data": experiment.data_settings.source,
        "test_prompts": int(board.loc[first, "exact_match_n"]),
        "base": score(BASE),
        "baselines": {
            str(name): score(str(t))
            for name, t in zip(baselines[BASELINE_NAME], baselines[TRIAL_ID], strict=True)
            if str(t) in trials.index
        },
        "best_baseline": best,
        "first": score(first),
        "first_is_baseline": first in set(baselines[TRIAL_ID].astype(str)),
        "most_accurate": score(str(trials["exact_match"].astype(float).idxmax())),
        "first_vs_best_baseline": test(first, best) if first != best else None,
        "search_vs_best_baseline": test(searched, best),
        "calibrated_vs_qlora": test(by_name.get("calibrated"), by_name.get("qlora")),
        "gpu_hours": hours,
        "baseline_gpu_hours": baseline_hours,
        "search_gpu_hours": hours - baseline_hours,
        "trials": len(results),
    }


NAMES = {"qlora": "QLoRA recipe", "calibrated": "calibrated default"}


def markdown(rows: list[dict[str, Any]]) -> str:
    def em(s: dict[str, Any] | None) -> str:
        return (
            "" if s is None else f"{100 * s['exact_match']:.1f}% ({100 * s['low']:.1f}-{100 * s['high']:.1f})"
        )

    def test(t: dict[str, Any] | None) -> str:
        if t is None:
            return ""
        p = "p < 0.001" if t["p"] < 0.001 else f"p = {t['p']:.2g}"
        return f"{100 * t['delta']:+.1f} ({100 * t['low']:+.1f} to {100 * t['high']:+.1f}), {p}"

    def first(row: dict[str, Any]) -> str:
        baseline = next(
            (name for name, s in row["baselines"].items() if s["candidate"] == row["first"]["candidate"]),
            None,
        )
        return f"{em(row['first'])}{f', the {NAMES[baseline]}' if baseline else ''}"

    lines = [
        "| data | test prompts | base | QLoRA recipe | calibrated default | calibrated vs recipe | sweep #1 | "
        "most accurate | search's best finalist vs best baseline | GPU-hours: baselines + search |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        baselines = row["baselines"]
        lines.append(
            f"| {Path(row['data']).stem} | {row['test_prompts']} | {em(row['base'])} | "
            f"{em(baselines.get('qlora'))} | {em(baselines.get('calibrated'))} | "
            f"{test(row['calibrated_vs_qlora'])} | {first(row)} | {em(row['most_accurate'])} | "
            f"{test(row['search_vs_best_baseline'])} | {row['baseline_gpu_hours']:.3f} + "
            f"{row['search_gpu_hours']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.quality.summary", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("experiments", nargs="+", help="experiment folders whose report has run")
    parser.add_argument("--out", help="a .jsonl file for the rows; the Markdown table goes beside it (.md)")
    args = parser.parse_args(argv)
    rows = [summarize(path) for path in args.experiments]
    table = markdown(rows)
    print(table)
    if args.out:
        out = Path(args.out)
        out.write_text(
            "".join(json.dumps(row, default=lambda x: None if math.isnan(x) else x) + "\n" for row in rows)
        )
        out.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
