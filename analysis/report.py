"""The reporting stage: generate with the best adapters and the base model, score, rank, write the report.

    python -m analysis.report experiments/local-20261130-120000
    python -m analysis.report experiments/local-20261130-120000/results.parquet --top-k 3
    python -m analysis.report EXPERIMENT generation.max_new_tokens=32 loss_tolerance=0.05 judge=HUB_ID_OR_URL
    python -m analysis.report s3://bucket/experiments/NAME     # fetched into the local cache, outputs put back

Overrides are dotted keys of the sweep's `report` section (see analysis.settings.ReportSettings).
Writes into the experiment folder: leaderboard.parquet and .csv, generations.parquet, report.html, and
judgments.parquet when a judge is set. The sweep driver runs this at the end of a sweep (report.enabled).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.experiment import (
    GENERATIONS,
    JUDGMENTS,
    LEADERBOARD,
    LEADERBOARD_CSV,
    REPORT_OUTPUTS,
    REPORT_PAGE,
    Experiment,
    ExperimentError,
    load_experiment,
    load_histories,
    resolve_base_model,
    write_file,
    write_table,
)
from analysis.generate import BASE, Candidate, Prompt, build_prompts, generate_for_candidates, render_prompts
from analysis.rank import choose_candidates
from analysis.seeds import describe_seed_spread, pool_seeds
from analysis.settings import ReportSettings, load_report_settings


@dataclass(frozen=True)
class ReportOutputs:
    folder: Path
    leaderboard: pd.DataFrame
    generations: pd.DataFrame  # scored
    judgments: pd.DataFrame | None
    timing: pd.DataFrame  # per candidate: seconds, new tokens, tokens/s
    seconds: float  # the whole report's wall time


def select_candidates(results: pd.DataFrame, top_k: int) -> list[Candidate]:
    """The base model, then the `top_k` usable trials by best eval loss that have an adapter on disk."""
    best = choose_candidates(results, top_k=top_k)
    return [Candidate(BASE), *(Candidate(str(r.trial_id), str(r.adapter_path)) for r in best.itertuples())]


def check_settings(settings: ReportSettings) -> None:
    if "judge" in settings.rank_by and not settings.judge:
        raise ExperimentError(
            "report.rank_by: 'judge' needs a judge; set report.judge to a model or endpoint URL"
        )


def build_prompt_set(experiment: Experiment, settings: ReportSettings) -> tuple[list[Prompt], str]:
    """The report's prompts and a note on where they came from (the eval split may be unreadable here)."""
    from trainable.data import DataError, load_splits

    data = experiment.data_settings
    try:
        evals = load_splits(data).eval if settings.eval_prompts else []
        note = f"{min(settings.eval_prompts, len(evals))} held-out prompts from the eval split"
    except (DataError, OSError) as err:
        evals, note = [], f"eval split unreadable here ({err}); user prompts only"
    prompts = build_prompts(
        evals, settings.prompts, count=settings.eval_prompts, system_prompt=data.system_prompt
    )
    return prompts, f"{note} + {len(settings.prompts)} from report.prompts"


def generate_answers(
    experiment: Experiment, candidates: Sequence[Candidate], prompts: Sequence[Prompt], settings: ReportSettings,
    *, device: str,
) -> tuple[pd.DataFrame, pd.DataFrame]:  # fmt: skip
    """Load the base model once and let every candidate answer every prompt."""
    import torch
    from transformers.utils import logging as transformers_logging

    from trainable.data import choose_chat_template
    from trainable.model import load_base_model, load_tokenizer

    transformers_logging.disable_progress_bar()  # per-tensor loading bars would bury the summary
    model_path = resolve_base_model(experiment)
    model_settings = experiment.model_settings
    tokenizer = load_tokenizer(model_path, model_settings)
    template = experiment.chat_template or choose_chat_template(
        tokenizer, experiment.data_settings.chat_template
    )
    texts = render_prompts(prompts, tokenizer, template)
    model = load_base_model(model_path, model_settings, device=device)
    torch.set_grad_enabled(False)
    return generate_for_candidates(model, tokenizer, prompts, texts, candidates, settings.generation)


def run_report(
    path: str | Path,
    *,
    overrides: Sequence[str] = (),
    top_k: int | None = None,
    device: str = "auto",
) -> ReportOutputs:
    """Everything `python -m analysis.report` does; returns the tables it wrote."""
    import torch

    from analysis.judge import build_comparisons, fit_bradley_terry, load_judge, run_judge
    from analysis.rank import rank_trials
    from analysis.score import score_generations, summarize_quality

    start = time.perf_counter()
    experiment = load_experiment(path)
    settings = load_report_settings(experiment, overrides)
    if top_k is not None:
        settings = dataclasses.replace(settings, top_k=top_k)
    check_settings(settings)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    results = pool_seeds(experiment.results)  # with seed re-checks: one row per configuration
    candidates = select_candidates(results, settings.top_k)
    prompts, prompt_note = build_prompt_set(experiment, settings)
    generations, timing = generate_answers(experiment, candidates, prompts, settings, device=device)
    scored = score_generations(generations)
    quality = summarize_quality(scored)
    judgments = None
    if settings.judge:
        judge = load_judge(settings.judge, endpoint_model=settings.judge_model, device=device)
        judgments = run_judge(build_comparisons(scored), judge)
        quality = quality.join(fit_bradley_terry(judgments, list(quality.index)))
    board = rank_trials(results, quality, loss_tolerance=settings.loss_tolerance,
                        rank_by=settings.rank_by, base_eval_loss=experiment.base_eval_loss)  # fmt: skip
    folder = experiment.path
    write_table(board, folder, LEADERBOARD)
    write_table(board, folder, LEADERBOARD_CSV)
    write_table(scored, folder, GENERATIONS)
    if judgments is not None:
        write_table(judgments, folder, JUDGMENTS)
    seconds = time.perf_counter() - start
    page = build_report_page(experiment, board, scored, timing, settings, judgments,
                             prompt_note=prompt_note, device=device, seconds=seconds)  # fmt: skip
    write_file(folder, REPORT_PAGE, page.encode("utf-8"))
    return ReportOutputs(folder, board, scored, judgments, timing, time.perf_counter() - start)


def build_report_page(
    experiment: Experiment,
    board: pd.DataFrame,
    scored: pd.DataFrame,
    timing: pd.DataFrame,
    settings: ReportSettings,
    judgments: pd.DataFrame | None,
    *,
    prompt_note: str,
    device: str,
    seconds: float,
) -> str:
    """report.html's text: leaderboard, figures, importance, judge, generations."""
    from analysis.importance import compute_importance
    from analysis.plots import (
        figure_to_base64,
        plot_eval_curves,
        plot_hyperparameters,
        plot_importance,
        plot_parallel_coordinates,
        plot_quality,
    )
    from analysis.render import render_generations, render_leaderboard, render_report, render_table
    from analysis.score import summarize_quality

    results = experiment.results
    ranked = board[board["rank"].notna()]
    first = str(ranked.iloc[0]["candidate"]) if len(ranked) else None
    importance = compute_importance(experiment)
    candidates = list(scored["candidate"].unique())
    figures = {
        "fig-quality": ("Answer quality", figure_to_base64(plot_quality(summarize_quality(scored)))),
        "fig-curves": ("Eval-loss curves", figure_to_base64(plot_eval_curves(
            load_histories(experiment), base_eval_loss=experiment.base_eval_loss, highlight=first))),
        "fig-hyperparameters": ("Hyperparameters against eval loss", figure_to_base64(plot_hyperparameters(results))),
        "fig-parallel": ("Parallel coordinates", figure_to_base64(plot_parallel_coordinates(results))),
        "fig-importance": ("Hyperparameter importance", figure_to_base64(plot_importance(importance))),
    }  # fmt: skip
    # Without values the figure itself carries the note; with values, the note says how to read them.
    sections = (
        {"Importance note": f'<p class="note" id="importance-note">{_escape(importance.note)}</p>'}
        if importance.values
        else {}
    )
    if judgments is not None:
        strengths = board.set_index("candidate")[[c for c in board if c.startswith("judge_")]].dropna(
            how="all"
        )
        sections["Judge (Bradley-Terry)"] = (
            f'<p class="note">Judge: {_escape(str(settings.judge))}; {len(judgments)} pairwise verdicts (both orders '
            "of every pair on every prompt), prompts and replies in judgments.parquet. Strength: log-odds of "
            "winning against an average candidate, &plusmn; one standard error.</p>"
            + render_table(strengths, table_id="judge-table")
        )
    sections["Generations side by side"] = (
        f'<p class="note">{_escape(prompt_note)}. Generation: {_escape(json.dumps(dataclasses.asdict(settings.generation)))}.</p>'
        + render_generations(scored, candidates)
    )
    sections["Generation time"] = (
        f'<p class="note">On {device}; the whole report took {seconds:.0f} s before this page.</p>'
        + render_table(timing.set_index("candidate"), table_id="timing-table")
    )
    model = experiment.model_settings
    data = experiment.summary.get("data", {})
    facts = {
        "experiment": experiment.name,
        "base model": f"{model.name_or_path} ({model.quantization} 4-bit)" if model.quantization != "none" else model.name_or_path,
        "data": f"{experiment.data_settings.source}: {data.get('train_examples', '?')} train / {data.get('eval_examples', '?')} eval examples",
        "trials": ", ".join(f"{n} {s}" for s, n in results["status"].value_counts().items()),
        "ranking": f"within {100 * settings.loss_tolerance:g}% of the best eval loss, by {', '.join(settings.rank_by)}; then by eval loss",
        "candidates": f"top {settings.top_k} by eval loss + the base model: {', '.join(candidates)}",
    }  # fmt: skip
    if (seeds := describe_seed_spread(board)) is not None:
        facts["seed re-checks"] = f"ranked by mean best eval loss over seeds. {seeds}"
    return render_report(title=f"Sweep report: {experiment.name}", facts=facts,
                         leaderboard_html=render_leaderboard(board, rank_by=settings.rank_by),
                         figures=figures, sections=sections)  # fmt: skip


def _escape(text: str) -> str:
    import html

    return html.escape(text)


def fetch_experiment(uri: str) -> Path:
    """Copy what the report reads of a remote experiment (tables, trial progress, adapters; no optimizer
    states) into the local cache; returns the local folder."""
    from pyarrow import fs

    from trainable.model import cache_dir

    filesystem, root = fs.FileSystem.from_uri(uri)
    root = root.rstrip("/")
    local = cache_dir() / "experiments" / Path(root).name
    wanted_suffixes = (".json", ".parquet", ".csv", ".db", ".safetensors", ".jinja")
    for info in filesystem.get_file_info(fs.FileSelector(root, recursive=True)):
        relative = info.path[len(root) :].lstrip("/")
        if (
            info.type != fs.FileType.File
            or not relative.endswith(wanted_suffixes)
            or relative.split("/")[-1].startswith(".")
        ):
            continue
        with filesystem.open_input_stream(info.path) as source:
            write_file(local, relative, source.read())
    return local


def publish_outputs(local: Path, uri: str) -> None:
    """Put the report's outputs back next to the remote experiment, each written atomically."""
    for name in REPORT_OUTPUTS:
        if (local / name).is_file():
            write_file(uri, name, (local / name).read_bytes())


def format_summary(outputs: ReportOutputs) -> str:
    board = outputs.leaderboard
    shown = [
        c
        for c in (
            "rank",
            "candidate",
            "status",
            "exact_match",
            "chrf",
            "judge_strength",
            "best_eval_loss",
            "note",
        )
        if c in board
    ]
    lines = [board[shown].head(12).to_string(index=False, float_format=lambda x: f"{x:.4g}"), ""]
    for row in outputs.timing.itertuples():
        lines.append(
            f"{row.candidate}: {row.new_tokens} new tokens in {row.seconds:.1f} s ({row.tokens_per_s:.1f} tokens/s)"
        )
    if (seeds := describe_seed_spread(board)) is not None:
        lines.append(f"seed re-checks: {seeds}")
    lines.append(f"\nreport: {outputs.folder / REPORT_PAGE} ({outputs.seconds:.0f} s)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", help="the experiment folder (or its results.parquet, or a storage URI)")
    parser.add_argument(
        "--top-k", type=int, default=None, help="adapters to generate with (default: report.top_k)"
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the report section, e.g. top_k=3")
    return parser.parse_intermixed_args(argv)  # overrides may follow options


def main(argv: list[str] | None = None) -> int:
    # Before torch loads OpenMP: its threads spin while they wait for work, and on a CPU shared with other
    # jobs (a sweep's trials, other users) the spinning threads starve the working ones; generation on
    # 2 busy cores measured 8x slower with spinning than with waiting threads that sleep.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = parse_args(argv)
    remote = args.experiment if "://" in args.experiment else None
    path: Any = fetch_experiment(remote) if remote else args.experiment
    try:
        outputs = run_report(path, overrides=args.overrides, top_k=args.top_k, device=args.device)
    except ExperimentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if remote:
        publish_outputs(outputs.folder, remote)
    print(format_summary(outputs), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
