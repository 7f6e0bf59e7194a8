"""The report's figures, drawn with matplotlib; each function returns a Figure (shown as is in a notebook,
embedded as a base64 PNG in report.html).

Figures are made without pyplot: no global figure state, no GUI backend, and a notebook shows a returned
figure once (pyplot's inline backend would show it a second time).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Collection, Mapping

import matplotlib
import numpy as np
import pandas as pd
from matplotlib import cm, colors, ticker
from matplotlib.figure import Figure

from analysis.importance import Importance
from analysis.score import MOST_COMMON
from trainable.outcome import METRIC
from trainable.schema import BEST_EVAL_LOSS, TRIAL_ID
from trainable.search_space import Dimension
from trainable.settings import HYPERPARAMETERS


def _log_scaled(space: Mapping[str, Dimension] | None) -> set[str]:
    return {name for name, dimension in (space or {}).items() if dimension.log}


def _continuous(values: pd.Series, name: str, log: Collection[str]) -> bool:
    """Drawn on a numeric axis: a log-scaled dimension and any number with many values; the rest as
    categories."""
    return pd.api.types.is_numeric_dtype(values) and (
        name in log or name == BEST_EVAL_LOSS or values.nunique() > 4
    )


def _categories(values: pd.Series) -> tuple[list[str], pd.Series]:
    """Sorted category labels (numbers in numeric order, written short) and each value's label."""
    labels = values.map(lambda v: f"{v:g}" if isinstance(v, float) else str(v))
    return sorted(labels.unique(), key=lambda c: (_as_number(c), c)), labels


def figure_to_base64(figure: Figure, *, dpi: int = 100) -> str:
    """The figure as a base64 PNG (for an <img src="data:image/png;base64,...">)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _note_figure(text: str, *, size: tuple[float, float] = (6, 1.2)) -> Figure:
    figure = Figure(figsize=size)
    axis = figure.subplots()
    axis.axis("off")
    axis.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    return figure


def plot_eval_curves(
    histories: pd.DataFrame, *, base_eval_loss: float = math.nan, highlight: str | None = None
) -> Figure:
    """Eval loss against training step, one line per trial; the base model's loss as a dashed line."""
    figure = Figure(figsize=(8, 4.5))
    axis = figure.subplots()
    for trial_id, group in histories.groupby(TRIAL_ID, sort=False):
        group = group.dropna(subset=[METRIC]).sort_values("step")
        if group.empty:
            continue
        best = trial_id == highlight
        axis.plot(
            group["step"],
            group[METRIC],
            marker="o",
            markersize=3,
            linewidth=2.5 if best else 1.2,
            label=f"{trial_id} (#1)" if best else str(trial_id),
            zorder=3 if best else 2,
        )
    if math.isfinite(base_eval_loss):
        axis.axhline(base_eval_loss, color="gray", linestyle="--", linewidth=1, label="base model")
    axis.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    axis.set_xlabel("training step")
    axis.set_ylabel("eval loss")
    axis.set_title("Eval loss of every trial")
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=7, ncol=2 if histories[TRIAL_ID].nunique() > 8 else 1, loc="upper right")
    figure.tight_layout()
    return figure


def searched_parameters(results: pd.DataFrame) -> list[str]:
    """The hyperparameters that took more than one value in the sweep (the others cannot explain anything)."""
    return [h for h in HYPERPARAMETERS if h in results and results[h].astype(str).nunique() > 1]


def _usable(results: pd.DataFrame) -> pd.DataFrame:
    loss = pd.to_numeric(results[BEST_EVAL_LOSS], errors="coerce")
    return results[np.isfinite(loss)]


def plot_hyperparameters(results: pd.DataFrame, *, space: Mapping[str, Dimension] | None = None) -> Figure:
    """Best eval loss against each hyperparameter, one panel each (categories evenly spaced; `space`, the
    sweep's, puts its log-scaled dimensions on a log axis)."""
    log = _log_scaled(space)
    data = _usable(results)
    names = searched_parameters(data) or [h for h in HYPERPARAMETERS if h in data]
    if data.empty or not names:
        return _note_figure("no trial reported a finite eval loss")
    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    figure = Figure(figsize=(4 * columns, 3.2 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis, name in zip(axes.flat, names, strict=False):
        values = data[name]
        if _continuous(values, name, log):
            axis.scatter(values, data[BEST_EVAL_LOSS], s=25, alpha=0.8)
            if name in log:
                axis.set_xscale("log")
        else:
            categories, labels = _categories(values)
            codes = labels.map({c: i for i, c in enumerate(categories)})
            jitter = np.random.default_rng(0).uniform(-0.08, 0.08, len(codes))
            axis.scatter(codes + jitter, data[BEST_EVAL_LOSS], s=25, alpha=0.8)
            axis.set_xticks(range(len(categories)), categories, rotation=20, fontsize=8)
            axis.set_xlim(-0.5, len(categories) - 0.5)
        axis.set_xlabel(name)
        axis.set_ylabel("best eval loss")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(names) :]:
        axis.axis("off")
    figure.suptitle("Each hyperparameter against best eval loss")
    figure.tight_layout()
    return figure


def _as_number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.inf


def plot_parallel_coordinates(
    results: pd.DataFrame, *, space: Mapping[str, Dimension] | None = None
) -> Figure:
    """One line per trial across an axis per hyperparameter and a last axis for eval loss, colored by loss
    (`space`, the sweep's, puts its log-scaled dimensions on a log axis)."""
    log = _log_scaled(space)
    data = _usable(results)
    names = searched_parameters(data) or [h for h in HYPERPARAMETERS if h in data]
    if data.empty:
        return _note_figure("no trial reported a finite eval loss")
    axes_names = [*names, BEST_EVAL_LOSS]
    scaled = pd.DataFrame(index=data.index)
    ticks: dict[str, tuple[list[float], list[str]]] = {}
    for name in axes_names:
        values = data[name]
        if _continuous(values, name, log):
            numbers = np.log10(values.astype(float)) if name in log else values.astype(float)
            low, high = float(numbers.min()), float(numbers.max())
            scaled[name] = (numbers - low) / (high - low) if high > low else 0.5
            shown = [low, (low + high) / 2, high] if high > low else [low]
            labels = [f"{10**v:.2g}" if name in log else f"{v:.4g}" for v in shown]
            ticks[name] = ([0.0, 0.5, 1.0] if high > low else [0.5], labels)
        else:
            categories, labels = _categories(values)
            step = 1 / (len(categories) - 1) if len(categories) > 1 else 0
            positions = {c: (i * step if len(categories) > 1 else 0.5) for i, c in enumerate(categories)}
            scaled[name] = labels.map(positions)
            ticks[name] = (list(positions.values()), categories)
    figure = Figure(figsize=(max(6, 1.8 * len(axes_names)), 4.5))
    axis = figure.subplots()
    loss = data[BEST_EVAL_LOSS].astype(float)
    norm = colors.Normalize(
        vmin=float(loss.min()),
        vmax=float(loss.max()) if loss.max() > loss.min() else float(loss.min()) + 1e-9,
    )
    colormap = matplotlib.colormaps["viridis_r"]
    x = np.arange(len(axes_names))
    for index in data.index:
        axis.plot(
            x,
            scaled.loc[index, axes_names].to_numpy(dtype=float),
            color=colormap(norm(loss[index])),
            alpha=0.85,
            linewidth=1.5,
        )
    for position, name in zip(x, axes_names, strict=True):
        axis.axvline(float(position), color="black", linewidth=0.8)
        for y, label in zip(*ticks[name], strict=True):
            axis.text(position + 0.03, y, label, fontsize=7, va="center")
    axis.set_xticks(x, axes_names, fontsize=8)
    axis.set_yticks([])
    axis.set_xlim(-0.2, len(axes_names) - 0.6)
    axis.set_ylim(-0.08, 1.08)
    figure.colorbar(cm.ScalarMappable(norm=norm, cmap=colormap), ax=axis, label="best eval loss")
    axis.set_title("Parallel coordinates: hyperparameters and best eval loss (darker is lower)")
    figure.tight_layout()
    return figure


def plot_importance(importance: Importance) -> Figure:
    """fANOVA importance as horizontal bars, or the note saying why there is none."""
    if not importance.values:
        return _note_figure(importance.note, size=(8, 1.2))
    names = list(importance.values)[::-1]
    figure = Figure(figsize=(6, 0.5 * len(names) + 1.2))
    axis = figure.subplots()
    axis.barh(names, [importance.values[n] for n in names], color="tab:blue")
    axis.set_xlabel("share of eval-loss variance (fANOVA)")
    axis.set_title(f"Hyperparameter importance ({importance.trials} trials)")
    axis.grid(alpha=0.3, axis="x")
    figure.tight_layout()
    return figure


def plot_quality(quality: pd.DataFrame) -> Figure:
    """Exact match (checkable or short answers) and chrF (prompts with a reference) per candidate, with their
    95% intervals where the quality table has them (`_low`, `_high`)."""
    if quality.empty:
        return _note_figure("no answers were generated")
    figure = Figure(figsize=(10, 0.45 * len(quality) + 1.6))
    axes = figure.subplots(1, 2)
    names = [str(c) for c in quality.index][::-1]
    for axis, column, label, scale in (
        (axes[0], "exact_match", "exact-match accuracy", 100),
        (axes[1], "chrf", "chrF", 1),
    ):
        values = quality[column].astype(float).to_numpy()[::-1] * scale
        error = None
        if f"{column}_low" in quality and f"{column}_high" in quality:
            low = quality[f"{column}_low"].astype(float).to_numpy()[::-1] * scale
            high = quality[f"{column}_high"].astype(float).to_numpy()[::-1] * scale
            error = np.nan_to_num(np.vstack([values - low, high - values]))
        axis.barh(
            names,
            np.nan_to_num(values),
            xerr=error,
            capsize=3,
            color=["tab:gray" if n in ("base", MOST_COMMON) else "tab:green" for n in names],
        )
        axis.set_xlabel(f"{label} (%)" if scale == 100 else label)
        axis.set_xlim(0, 100)
        axis.grid(alpha=0.3, axis="x")
    figure.suptitle("Answer quality per candidate")
    figure.tight_layout()
    return figure
