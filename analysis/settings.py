"""The report's settings: the `report` section of a sweep's YAML (python -m analysis.report reads it from
the experiment's sweep.json) and how the report generates answers.

    settings = load_report_settings(experiment, ["top_k=3", "generation.max_new_tokens=32"])
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import field
from typing import Annotated, Literal

from pydantic import Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from analysis.experiment import Experiment, ExperimentError
from trainable.settings import STRICT, apply_override, format_problems, validation_problems


@dataclass(frozen=True, config=STRICT)
class GenerationSettings:
    """How the report generates answers; recorded with every generation."""

    temperature: Annotated[float, Field(ge=0)] = 0.0  # 0: greedy (or beam search with num_beams > 1)
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 50
    num_beams: Annotated[int, Field(ge=1)] = 1
    max_new_tokens: Annotated[int, Field(ge=1)] = 64
    seed: int = 0
    # Prompts per generate() call (left-padded): the default set (16 eval prompts + 1 of the user's) in one
    # batch, since a batch costs about as much per step as a full one until its longest answer ends.
    batch_size: Annotated[int, Field(ge=1)] = 32


@dataclass(frozen=True, config=STRICT)
class ReportSettings:
    """The reporting stage (python -m analysis.report), run by the driver at the end of a sweep."""

    enabled: bool = True
    top_k: Annotated[int, Field(ge=1)] = 2  # candidates by eval loss; the base model is always added
    eval_prompts: Annotated[int, Field(ge=0)] = 16  # held-out prompts taken from the eval split
    prompts: list[str] = field(default_factory=lambda: ["Write me a poem about Singapore"])
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    # Ranking rule: among trials whose best eval loss is within this fraction of the best, rank by answer
    # quality; the rest follow by eval loss.
    loss_tolerance: Annotated[float, Field(ge=0)] = 0.02
    # The answer-quality scores that order those trials, most important first (ties fall to the next):
    # exact_match (accuracy on prompts with a checkable answer), chrf (character F-score against the
    # reference, 0-100), judge (Bradley-Terry strength from the judge's pairwise verdicts).
    rank_by: list[Literal["exact_match", "chrf", "judge"]] = field(
        default_factory=lambda: ["exact_match", "chrf"]
    )
    judge: str | None = None  # optional: a hub id, local path or OpenAI-compatible endpoint URL
    # The model name sent to a judge endpoint (its key, if it needs one, comes from OPENAI_API_KEY).
    judge_model: str = "default"


def load_report_settings(experiment: Experiment, overrides: Sequence[str] = ()) -> ReportSettings:
    """The sweep's `report` section with dotted overrides (`top_k=3`, `generation.max_new_tokens=32`; a
    leading `report.` is allowed). Every problem is named by its key, all at once."""
    data = json.loads(json.dumps(experiment.config.get("report", {})))  # a deep copy
    problems = []
    for override in overrides:
        try:
            apply_override(data, override, strip_prefix="report.", example="generation.max_new_tokens=32")
        except ValueError as err:
            problems.append(str(err))
    if not problems:
        try:
            return TypeAdapter(ReportSettings).validate_python(data)
        except ValidationError as err:
            problems = validation_problems(err, prefix="report.")
    raise ExperimentError(format_problems("report settings", problems))
