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
    # Prompts per generate() call (left-padded); prompts of similar length share a batch, and a batch runs
    # until its longest answer ends, so larger batches pay off most when answers are short.
    batch_size: Annotated[int, Field(ge=1)] = 32


@dataclass(frozen=True, config=STRICT)
class ReportSettings:
    """The reporting stage (python -m analysis.report), run by the driver at the end of a sweep."""

    enabled: bool = True
    # Finalists: the top_k trials by eval loss; the baseline trials and the base model are always added.
    top_k: Annotated[int, Field(ge=1)] = 4
    # Held-out prompts every finalist answers: the data's test split (the eval split when it has none), all
    # of it up to this many (spread over the tasks): the cap bounds the report's time on a large test split.
    eval_prompts: Annotated[int, Field(ge=0)] = 500
    prompts: list[str] = field(default_factory=lambda: ["Write me a poem about Singapore"])
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    # Ranking rule (analysis/rank.py): finalists that the held-out paired tests do not separate, and whose
    # best eval loss is within this fraction of the best, are ordered by held-out score, the rest by eval loss.
    loss_tolerance: Annotated[float, Field(ge=0)] = 0.02
    # The held-out scores, most important first: exact_match (accuracy on prompts with a checkable or short
    # answer), chrf (character F-score against the reference, 0-100), judge (Bradley-Terry strength from the
    # judge's pairwise verdicts). The first of exact_match/chrf that was scored is the one the paired tests
    # separate finalists by; all of them, in order, order the finalists the tests leave tied.
    rank_by: list[Literal["exact_match", "chrf", "judge"]] = field(
        default_factory=lambda: ["exact_match", "chrf"]
    )
    judge: str | None = None  # optional: a hub id, local path or OpenAI-compatible endpoint URL
    # Prompts the judge compares every pair of candidates on (held-out ones spread over the tasks, then the
    # user's): each pair costs two judge calls per prompt, so not the whole held-out set.
    judge_prompts: Annotated[int, Field(ge=1)] = 16
    judge_model: str = "default"


def load_report_settings(experiment: Experiment, overrides: Sequence[str] = ()) -> ReportSettings:
    """The sweep's `report` section with dotted overrides (`top_k=3`, `generation.max_new_tokens=32`; a
    leading `report.` is allowed). Every problem is named by its key, all at once."""
    data = json.loads(json.dumps(experiment.summary.section("report")))  # a deep copy
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
