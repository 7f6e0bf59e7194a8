"""report.html: one self-contained file (inline CSS, figures as base64 PNG, no script, nothing fetched)."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from analysis.generate import BASE
from analysis.rank import __doc__ as RANKING_RULE
from analysis.rank import format_p
from analysis.score import MOST_COMMON
from trainable.schema import BEST_EVAL_LOSS, COST_USD, GPU_SECONDS, STATUS, STEP
from trainable.settings import HYPERPARAMETERS

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 4px 7px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
.scroll { overflow-x: auto; } table.leaderboard td { white-space: nowrap; }
table.leaderboard td.wrap { white-space: normal; min-width: 16em; font-size: 12px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.first td { font-weight: 600; background: #eef8ee; }
tr.base td { font-style: italic; background: #f6f6f6; }
tr.failed td { background: #fdeaea; color: #8a1f1f; }
.meta { color: #555; font-size: 14px; } .note { color: #555; font-size: 13px; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
td.answer { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 12px; max-width: 420px; }
.ok { color: #1a7f37; font-weight: 600; } .bad { color: #b42318; font-weight: 600; }
p.recommendation { background: #eef8ee; border: 1px solid #b7dfb9; padding: 0.7em 1em; font-size: 15px; }
pre.rule { background: #fafafa; border: 1px solid #eee; padding: 0.8em; font-size: 12px; white-space: pre-wrap; }
"""


def _cell(value: Any, *, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return html.escape(str(value))


def _with_interval(value: float, low: float, high: float, *, percent: bool) -> str:
    scale, unit = (100, "%") if percent else (1, "")
    if pd.isna(low) or pd.isna(high):
        return f"{scale * value:.1f}{unit}"
    return f"{scale * value:.1f}{unit} [{scale * low:.1f}&ndash;{scale * high:.1f}]"


def _verdict(verdict: Any, delta: float, p: float, *, percent: bool) -> str:
    if not isinstance(verdict, str):
        return ""
    klass = {"better": "ok", "worse": "bad"}.get(verdict, "")
    word = f'<span class="{klass}">{verdict}</span>' if klass else verdict
    return f"{word} {(100 if percent else 1) * delta:+.1f} ({format_p(p)})"


def render_leaderboard(board: pd.DataFrame, *, rank_by: Sequence[str]) -> str:
    """The leaderboard as an HTML table: #1 highlighted, the base and baseline rows grey, failed trials red.
    Scores with their 95% interval and count; vs_baseline / vs_base: the paired test's verdict, difference in
    points and p-value."""
    columns = ["rank", "candidate", STATUS, "ranked_by", "exact_match", "chrf"]
    if "judge" in rank_by or "judge_strength" in board:
        columns.append("judge_strength")
    columns += [
        "vs_baseline",
        "vs_base",
        BEST_EVAL_LOSS,
        "seeds",
        "seed_spread",
        "loss_gap",
        *[h for h in HYPERPARAMETERS if h in board],
        STEP,
        "estimated_memory_gib",
        GPU_SECONDS,
        COST_USD,
        "note",
    ]
    columns = [c for c in columns if c in board]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    rows = []
    for _, row in board.iterrows():
        contrast = row["candidate"] in (BASE, MOST_COMMON)
        klass = "base" if contrast else ("first" if row["rank"] == 1 else "")
        if not contrast and pd.isna(row["rank"]):
            klass = "failed"
        cells = []
        for column in columns:
            value = row[column]
            if column in ("exact_match", "chrf") and pd.notna(value):
                n = row.get(f"{column}_n")
                text = _with_interval(
                    value,
                    row.get(f"{column}_low", math.nan),
                    row.get(f"{column}_high", math.nan),
                    percent=column == "exact_match",
                ) + (f" ({int(n)})" if pd.notna(n) else "")
            elif column in ("vs_baseline", "vs_base"):
                text = _verdict(
                    value,
                    row.get(f"{column}_delta", math.nan),
                    row.get(f"{column}_p", math.nan),
                    percent=row.get("vs_metric") == "exact_match",
                )
            elif column == "loss_gap" and pd.notna(value):
                text = f"{100 * value:+.2f}%"
            elif column == "judge_strength" and pd.notna(value):
                text = f"{value:+.2f} &plusmn; {row.get('judge_stderr', math.nan):.2f}"
            elif column == "rank" and pd.isna(value):
                text = "&ndash;"
            else:
                text = _cell(value)
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            klass_cell = "num" if numeric else ("wrap" if column == "note" else "")
            cells.append(f'<td class="{klass_cell}">{text}</td>' if klass_cell else f"<td>{text}</td>")
        rows.append(f'<tr class="{klass}">{"".join(cells)}</tr>')
    return (
        f'<div class="scroll"><table class="leaderboard" id="leaderboard-table"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def render_per_task(by_task: pd.DataFrame, candidates: Sequence[str]) -> str:
    """Tasks (rows) by candidates (columns): the task's score with its 95% interval, the count per task."""
    if by_task.empty:
        return '<p class="note">The data has no tasks (no `task` column).</p>'
    shown = [c for c in candidates if c in set(by_task["candidate"])]
    head = "<th>task</th><th>score</th><th>prompts</th>" + "".join(
        f"<th>{html.escape(c)}</th>" for c in shown
    )
    rows = []
    for (task, metric), group in by_task.groupby(["task", "metric"], sort=True):
        cells = {
            r.candidate: _with_interval(r.mean, r.low, r.high, percent=metric == "exact_match")
            for r in group.itertuples()
        }
        label = "exact match" if metric == "exact_match" else "chrF"
        rows.append(
            f'<tr><td>{html.escape(str(task))}</td><td>{label}</td><td class="num">{int(group["n"].max())}</td>'
            + "".join(f'<td class="num">{cells.get(c, "")}</td>' for c in shown)
            + "</tr>"
        )
    return (
        f'<div class="scroll"><table id="task-table"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def render_paired(paired: pd.DataFrame, candidates: Sequence[str]) -> str:
    """Every ordered pair of finalists (and the base) on each score: difference, 95% interval, test, p-value."""
    if paired.empty:
        return '<p class="note">No held-out prompt had a reference: nothing to compare.</p>'
    order = {c: i for i, c in enumerate(candidates)}
    table = paired[paired["candidate"].map(order) < paired["other"].map(order)]
    head = "".join(
        f"<th>{c}</th>"
        for c in ("candidate", "other", "score", "difference [95% CI]", "test", "p", "prompts", "verdict")
    )
    rows = []
    for r in table.itertuples():
        percent = r.metric == "exact_match"
        scale = 100 if percent else 1
        rows.append(
            f"<tr><td>{html.escape(str(r.candidate))}</td><td>{html.escape(str(r.other))}</td>"
            f"<td>{'exact match' if percent else 'chrF'}</td>"
            f'<td class="num">{scale * r.delta:+.1f} [{scale * r.low:+.1f}&ndash;{scale * r.high:+.1f}]</td>'
            f'<td>{html.escape(str(r.test))}</td><td class="num">{format_p(r.p_value)}</td>'
            f'<td class="num">{r.n}</td><td>{_verdict(r.verdict, r.delta, r.p_value, percent=percent)}</td></tr>'
        )
    return f'<table id="paired-table"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def render_generations(scored: pd.DataFrame, candidates: Sequence[str]) -> str:
    """Every prompt in a row, each candidate's answer in its own column, with its scores."""
    head = "<th>prompt</th><th>reference</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in candidates)
    rows = []
    for prompt_id, group in scored.groupby("prompt_id", sort=False):
        first = group.iloc[0]
        label = f"<b>{html.escape(str(prompt_id))}</b>" + (
            f" &middot; {html.escape(first['task'])}" if isinstance(first["task"], str) else ""
        )
        cells = [
            f'<td>{label}<br><span class="answer">{html.escape(first["question"])}</span></td>',
            f'<td class="answer">{_cell(first["reference"])}</td>',
        ]
        by_candidate = {r["candidate"]: r for _, r in group.iterrows()}
        for candidate in candidates:
            answer = by_candidate.get(candidate)
            if answer is None:
                cells.append("<td></td>")
                continue
            marks = []
            if pd.notna(answer["exact_match"]):
                marks.append(
                    '<span class="ok">&#10003; match</span>'
                    if answer["exact_match"]
                    else '<span class="bad">&#10007; no match</span>'
                )
            if pd.notna(answer["chrf"]):
                marks.append(f"chrF {answer['chrf']:.1f}")
            cells.append(
                f'<td class="answer">{html.escape(answer["answer"])}<br><span class="note">{" &middot; ".join(marks)}</span></td>'
            )
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return f'<table class="generations" id="generations-table"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def render_table(table: pd.DataFrame, *, table_id: str) -> str:
    """A small table of numbers (timing, judge strengths), plainly."""
    return table.to_html(
        table_id=table_id, float_format=lambda x: f"{x:.4g}", na_rep="", border=0, escape=True
    )


def render_environment(environment: Mapping[str, Any]) -> str:
    """sweep.json's environment: what the sweep's figures were measured with."""
    packages = environment.get("packages") or {}
    cpu = environment.get("cpu") or {}
    device = str(environment.get("device", "?"))
    if device == "cuda":
        device = f"CUDA {environment.get('cuda')}: {', '.join(environment.get('gpus') or [])}"
    rows = {
        "packages": ", ".join(f"{name} {version}" for name, version in packages.items()),
        "device": device,
        "compute dtype": str(environment.get("compute_dtype", "?")),
        "CPU": f"{cpu.get('model', '?')}, {cpu.get('cores', '?')} cores, flags {' '.join(cpu.get('flags') or [])}"
        f"{', native bf16' if cpu.get('native_bf16') else ', no native bf16'}",
        "Python": str(environment.get("python", "?")),
        "commit": str(environment.get("commit") or "not run from a git checkout"),
    }
    items = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in rows.items())
    return f'<ul class="meta" id="environment">{items}</ul>'


def render_report(
    *,
    title: str,
    facts: Mapping[str, str],
    leaderboard_html: str,
    figures: Mapping[str, tuple[str, str]],
    sections: Mapping[str, str],
    recommendation: str = "",
) -> str:
    """The whole page. `figures`: id -> (caption, base64 PNG), in page order; `sections`: extra titled HTML
    blocks (importance note, judge, generations, timing), in page order after the figures."""
    meta = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in facts.items())
    figure_html = "".join(
        f'<h2>{html.escape(caption)}</h2><figure><img id="{html.escape(fig_id)}" alt="{html.escape(caption)}" '
        f'src="data:image/png;base64,{png}"></figure>'
        for fig_id, (caption, png) in figures.items()
    )
    section_html = "".join(f"<h2>{html.escape(name)}</h2>{body}" for name, body in sections.items())
    rule = html.escape((RANKING_RULE or "").split("\n\n", 1)[-1].strip())
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        f'<h1>{html.escape(title)}</h1><ul class="meta">{meta}</ul>'
        f'<p class="recommendation" id="recommendation">{html.escape(recommendation)}</p>'
        f'<h2 id="leaderboard">Leaderboard</h2>{leaderboard_html}'
        f'<details><summary class="note">How the leaderboard is ranked</summary><pre class="rule">{rule}</pre></details>'
        f"{figure_html}{section_html}</body></html>\n"
    )
