"""The reporting stage: the finalists and the base model answer the held-out prompts; score, test, rank, report.

    python -m analysis.report experiments/local-20261130-120000
    python -m analysis.report experiments/local-20261130-120000/results.parquet --top-k 3
    python -m analysis.report EXPERIMENT generation.max_new_tokens=32 loss_tolerance=0.05 judge=HUB_ID_OR_URL
    python -m analysis.report s3://bucket/experiments/NAME  # read through the local cache, outputs put back

Overrides are dotted keys of the sweep's `report` section (see analysis.settings.ReportSettings).
Writes into the experiment folder: leaderboard.parquet and .csv, generations.parquet, paired_tests.parquet,
report.html, and judgments.parquet when a judge is set. The sweep driver runs this at the end of a sweep
(report.enabled).
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
    PAIRED_TESTS,
    REPORT_OUTPUTS,
    REPORT_PAGE,
    Experiment,
    ExperimentError,
    join,
    load_experiment,
    load_histories,
    publish_folder,
    resolve_base_model,
    write_file,
    write_table,
)
from analysis.generate import (
    BASE,
    Candidate,
    Prompt,
    build_prompts,
    generate_for_candidates,
    render_prompts,
    spread_over_tasks,
)
from analysis.rank import choose_candidates
from analysis.score import MOST_COMMON
from analysis.seeds import describe_seed_spread, pool_seeds
from analysis.settings import ReportSettings, load_report_settings
from trainable.schema import BEST_EVAL_LOSS, STATUS, describe_cost
from trainable.settings import ModelSettings

# Held-out prompts shown side by side on the page (spread over the tasks): two per bundled task; a page of
# 300 prompts x 6 candidates would bury the rest. Every answer is in generations.parquet.
SHOWN_PROMPTS = 24


@dataclass(frozen=True)
class ReportOutputs:
    folder: Path
    leaderboard: pd.DataFrame
    generations: pd.DataFrame  # scored
    paired: pd.DataFrame  # paired tests of every ordered pair of finalists and the base, per score
    recommendation: str  # in words: the adapter to use and how sure the report is
    judgments: pd.DataFrame | None
    timing: pd.DataFrame  # per candidate: seconds, new tokens, tokens/s
    seconds: float  # the whole report's wall time
    uri: str | None = None  # where the outputs were put back, for a remote experiment


def select_finalists(results: pd.DataFrame, top_k: int) -> list[Candidate]:
    """The base model, then the finalists of analysis.rank.choose_candidates (the `top_k` usable trials by
    best eval loss that have an adapter on disk, and the baseline trials)."""
    chosen = choose_candidates(results, top_k=top_k)
    return [Candidate(BASE), *(Candidate(str(r.trial_id), str(r.adapter_path)) for r in chosen.itertuples())]


def check_settings(settings: ReportSettings) -> None:
    if "judge" in settings.rank_by and not settings.judge:
        raise ExperimentError(
            "report.rank_by: 'judge' needs a judge; set report.judge to a model or endpoint URL"
        )


@dataclass(frozen=True)
class PromptSet:
    prompts: list[Prompt]
    note: str  # where the held-out prompts came from, for the page
    baseline_answers: dict[str | None, str]  # the most common training answer per task (None: overall)


def build_prompt_set(experiment: Experiment, settings: ReportSettings) -> PromptSet:
    """The held-out prompts (the test split; the eval split when the data has none), the user's, and the
    trivial baseline's answers; the data may be unreadable here (then: the user's prompts only)."""
    from analysis.score import most_common_answers
    from trainable.data import DataError, load_splits

    data = experiment.data_settings
    try:
        splits = load_splits(data)
    except (DataError, OSError) as err:
        return PromptSet(
            build_prompts([], settings.prompts, count=0, system_prompt=data.system_prompt),
            f"data unreadable here ({err}); user prompts only",
            {},
        )
    held_out, source = (splits.test, "test") if splits.test else (splits.eval, "eval")
    prompts = build_prompts(
        held_out,
        settings.prompts,
        count=settings.eval_prompts,
        source=source,
        system_prompt=data.system_prompt,
    )
    scored = sum(p.source == source for p in prompts)
    note = f"{scored} of the {len(held_out)} prompts of the {source} split"
    if source == "eval":
        # Eval loss chose the finalists on these very prompts: their scores lean in the finalists' favour.
        note += (
            " (the data has no test split; eval loss was measured on these prompts, so scores are optimistic)"
        )
    baseline = most_common_answers([(e.task, e.reference) for e in splits.train])
    return PromptSet(prompts, f"{note} + {len(settings.prompts)} from report.prompts", baseline)


def shown_prompt_ids(scored: pd.DataFrame, count: int) -> list[str]:
    """`count` held-out prompts spread over the tasks, then every user prompt: those shown side by side on
    the page and given to the judge (all of them are in generations.parquet)."""
    prompts = scored.drop_duplicates("prompt_id")
    held = prompts[prompts["source"] != "user"]
    picked = [
        held["prompt_id"].iloc[i]
        for i in spread_over_tasks([t if isinstance(t, str) else None for t in held["task"]], count)
    ]
    return [*picked, *prompts.loc[prompts["source"] == "user", "prompt_id"]]


def generate_answers(
    experiment: Experiment,
    candidates: Sequence[Candidate],
    prompts: Sequence[Prompt],
    settings: ReportSettings,
    *,
    device: str,
    merge_adapters: bool | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Load the base model once and let every candidate answer every prompt. `merge_adapters`: each adapter
    merged into a copy of the base (analysis.generate.merged_copy) rather than run beside it; by default on
    the CPU, where the base's layers are plain (dequantized_for_generation), not on a GPU's 4-bit base."""
    import torch

    from trainable.data import choose_chat_template
    from trainable.model import load_base_model, load_tokenizer, quiet_libraries

    quiet_libraries()  # per-tensor loading bars and library notes would bury the summary
    model_path = resolve_base_model(experiment)
    model_settings = experiment.model_settings
    tokenizer = load_tokenizer(model_path, model_settings)
    template = experiment.summary.chat_template or choose_chat_template(
        tokenizer, experiment.data_settings.chat_template
    )
    texts = render_prompts(prompts, tokenizer, template)
    model = load_base_model(model_path, model_settings, device=device)
    if device == "cpu" and model_settings.quantization != "none":
        model = dequantized_for_generation(model, model_settings)
    torch.set_grad_enabled(False)
    merge = device == "cpu" if merge_adapters is None else merge_adapters
    return generate_for_candidates(
        model, tokenizer, prompts, texts, candidates, settings.generation, merge_adapters=merge
    )


def dequantized_for_generation(model: Any, settings: ModelSettings) -> Any:
    """The 4-bit base with its weights dequantized once, in the compute dtype: on a CPU a 4-bit layer
    dequantizes its whole weight at every call, which in generation is every new token (docs/report.md
    has the figures). The values are those every 4-bit call computes, so adapters on it (merged into a
    copy of it: analysis.generate.merged_copy) answer as on the 4-bit base, up to rounding."""
    import torch

    from trainable.hardware import resolve_compute_dtype

    return model.dequantize(dtype=getattr(torch, resolve_compute_dtype(settings.compute_dtype, "cpu")))


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
    from analysis.rank import rank_trials, recommend
    from analysis.score import baseline_generations, compare_candidates, score_generations, summarize_quality

    start = time.perf_counter()
    experiment = load_experiment(path)
    settings = load_report_settings(experiment, overrides)
    if top_k is not None:
        settings = dataclasses.replace(settings, top_k=top_k)
    check_settings(settings)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    results = pool_seeds(experiment.results)  # with seed re-checks: one row per configuration
    candidates = select_finalists(results, settings.top_k)
    prompt_set = build_prompt_set(experiment, settings)
    generations, timing = generate_answers(
        experiment, candidates, prompt_set.prompts, settings, device=device
    )
    generations = pd.concat(
        [generations, baseline_generations(generations, prompt_set.baseline_answers)], ignore_index=True
    )
    scored = score_generations(generations)
    quality = summarize_quality(scored)
    paired = compare_candidates(scored, [c.name for c in candidates])
    judgments = None
    if settings.judge:
        judge = load_judge(settings.judge, endpoint_model=settings.judge_model, device=device)
        judged = scored[
            scored["prompt_id"].isin(shown_prompt_ids(scored, settings.judge_prompts))
            & (scored["candidate"] != MOST_COMMON)
        ]
        judgments = run_judge(build_comparisons(judged), judge)
        quality = quality.join(fit_bradley_terry(judgments, [c.name for c in candidates]))
    board = rank_trials(
        results,
        quality,
        loss_tolerance=settings.loss_tolerance,
        rank_by=settings.rank_by,
        base_eval_loss=experiment.base_eval_loss,
        paired=paired,
    )
    recommendation = recommend(board, paired, rank_by=settings.rank_by)
    folder = experiment.path
    write_table(board, folder, LEADERBOARD)
    write_table(board, folder, LEADERBOARD_CSV)
    write_table(scored, folder, GENERATIONS)
    write_table(paired, folder, PAIRED_TESTS)
    if judgments is not None:
        write_table(judgments, folder, JUDGMENTS)
    seconds = time.perf_counter() - start
    page = build_report_page(
        experiment,
        board,
        scored,
        paired,
        timing,
        settings,
        judgments,
        recommendation=recommendation,
        prompt_note=prompt_set.note,
        device=device,
        seconds=seconds,
    )
    write_file(folder, REPORT_PAGE, page.encode("utf-8"))
    if experiment.uri is not None:
        publish_folder(folder, experiment.uri, names=REPORT_OUTPUTS)
    return ReportOutputs(
        folder,
        board,
        scored,
        paired,
        recommendation,
        judgments,
        timing,
        time.perf_counter() - start,
        uri=experiment.uri,
    )


def build_report_page(
    experiment: Experiment,
    board: pd.DataFrame,
    scored: pd.DataFrame,
    paired: pd.DataFrame,
    timing: pd.DataFrame,
    settings: ReportSettings,
    judgments: pd.DataFrame | None,
    *,
    recommendation: str,
    prompt_note: str,
    device: str,
    seconds: float,
) -> str:
    """report.html's text: recommendation, leaderboard, figures, per-task scores, paired tests, importance,
    judge, generations."""
    from analysis.importance import compute_importance
    from analysis.plots import (
        figure_to_base64,
        plot_eval_curves,
        plot_hyperparameters,
        plot_importance,
        plot_parallel_coordinates,
        plot_quality,
    )
    from analysis.render import (
        render_environment,
        render_generations,
        render_leaderboard,
        render_paired,
        render_per_task,
        render_report,
        render_table,
    )
    from analysis.score import quality_by_task, summarize_quality

    results = experiment.results
    ranked = board[board["rank"].notna()]
    first = str(ranked.iloc[0]["candidate"]) if len(ranked) else None
    importance = compute_importance(experiment)
    candidates = list(scored["candidate"].unique())
    figures = {
        "fig-quality": ("Answer quality", figure_to_base64(plot_quality(summarize_quality(scored)))),
        "fig-curves": (
            "Eval-loss curves",
            figure_to_base64(
                plot_eval_curves(
                    load_histories(experiment), base_eval_loss=experiment.base_eval_loss, highlight=first
                )
            ),
        ),
        "fig-hyperparameters": (
            "Hyperparameters against eval loss",
            figure_to_base64(plot_hyperparameters(results, space=experiment.space)),
        ),
        "fig-parallel": (
            "Parallel coordinates",
            figure_to_base64(plot_parallel_coordinates(results, space=experiment.space)),
        ),
        "fig-importance": ("Hyperparameter importance", figure_to_base64(plot_importance(importance))),
    }
    # Without values the figure itself carries the note; with values, the note says how to read them.
    sections = {
        "Held-out scores per task": '<p class="note">Exact match (%) where it applies, else chrF; 95% bootstrap '
        f"interval in brackets. {MOST_COMMON}: the most common training answer of the task, for every prompt: a "
        "task it answers well tells little about an adapter.</p>"
        + render_per_task(quality_by_task(scored), candidates),
        "Paired tests": '<p class="note">Each finalist against each other and the base model on the same held-out '
        "prompts: the difference in points (exact match: McNemar's exact test; chrF: paired bootstrap), 95% "
        "bootstrap interval, better/worse when p &lt; 0.05.</p>" + render_paired(paired, candidates),
    }
    if importance.values:
        sections["Importance note"] = f'<p class="note" id="importance-note">{_escape(importance.note)}</p>'

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
    shown = shown_prompt_ids(scored, SHOWN_PROMPTS)
    sections["Generations side by side"] = (
        f'<p class="note">Held-out prompts: {_escape(prompt_note)}. Shown: {len(shown)} of them, spread over the '
        "tasks, and the user's; every answer is in generations.parquet. Generation: "
        f"{_escape(json.dumps(dataclasses.asdict(settings.generation)))}.</p>"
        + render_generations(scored[scored["prompt_id"].isin(shown)], candidates)
    )
    sections["Generation time"] = (
        f'<p class="note">On {device}; the whole report took {seconds:.0f} s before this page.</p>'
        + render_table(timing.set_index("candidate"), table_id="timing-table")
    )
    if experiment.summary.environment:
        sections["Environment of the sweep"] = render_environment(experiment.summary.environment)
    model = experiment.model_settings
    data = experiment.summary.data
    facts = {
        "experiment": experiment.name,
        "base model": f"{model.name_or_path} ({model.quantization} 4-bit)"
        if model.quantization != "none"
        else model.name_or_path,
        "data": f"{experiment.data_settings.source}: {data.get('train_examples', '?')} train / {data.get('eval_examples', '?')} eval examples",
        "trials": ", ".join(f"{n} {s}" for s, n in results[STATUS].value_counts().items()),
        "held-out prompts": prompt_note,
        "ranking": f"finalists by measurable held-out differences (paired tests, p < 0.05); else within {100 * settings.loss_tolerance:g}% of the best eval loss by {', '.join(settings.rank_by)}; then by eval loss",
        "finalists": f"top {settings.top_k} by eval loss + the baselines; with the base model and the {MOST_COMMON} answers: {', '.join(candidates)}",
        "cost": describe_cost(results),
    }
    if (seeds := describe_seed_spread(board)) is not None:
        facts["seed re-checks"] = f"ranked by mean best eval loss over seeds. {seeds}"
    return render_report(
        title=f"Sweep report: {experiment.name}",
        facts=facts,
        leaderboard_html=render_leaderboard(board, rank_by=settings.rank_by),
        figures=figures,
        sections=sections,
        recommendation=recommendation,
    )


def _escape(text: str) -> str:
    import html

    return html.escape(text)


def format_summary(outputs: ReportOutputs) -> str:
    board = outputs.leaderboard.copy()
    for column in ("exact_match", "exact_match_low", "exact_match_high"):
        if column in board:
            board[column] = 100 * board[column]  # percent, as on the page
    shown = [
        c
        for c in (
            "rank",
            "candidate",
            STATUS,
            "exact_match",
            "exact_match_low",
            "exact_match_high",
            "chrf",
            "vs_baseline",
            "vs_baseline_p",
            "vs_base",
            "judge_strength",
            BEST_EVAL_LOSS,
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
    lines.append(f"\n{outputs.recommendation}")
    page = join(outputs.uri, REPORT_PAGE) if outputs.uri else outputs.folder / REPORT_PAGE
    lines.append(f"\nreport: {page} ({outputs.seconds:.0f} s)")
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
    try:
        outputs = run_report(args.experiment, overrides=args.overrides, top_k=args.top_k, device=args.device)
    except ExperimentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(outputs), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
