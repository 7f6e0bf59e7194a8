"""What the CPU generation benches share: their command line and the report's work they time.

Each bench runs `analysis.report.generate_answers` on an experiment in two modes, alternately, --repeats
times; this module parses the command line and loads what `python -m analysis.report` would generate for.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from analysis import report
from analysis.experiment import Experiment, load_experiment
from analysis.generate import Candidate, Prompt
from analysis.seeds import pool_seeds
from analysis.settings import ReportSettings, load_report_settings


@dataclass(frozen=True)
class ReportCase:
    experiment: Experiment
    settings: ReportSettings
    candidates: list[Candidate]
    prompts: list[Prompt]
    repeats: int
    out: Path


def load_case(description: str, argv: list[str] | None) -> ReportCase:
    """Parse `EXPERIMENT [--repeats N] --out FILE` and load the report's finalists and prompts."""
    # As python -m analysis.report sets it (its main says why); before torch starts its threads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    p = argparse.ArgumentParser(description=description)
    p.add_argument("experiment")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    experiment = load_experiment(args.experiment)
    settings = load_report_settings(experiment, ())
    return ReportCase(
        experiment=experiment,
        settings=settings,
        candidates=report.select_finalists(pool_seeds(experiment.results), settings.top_k),
        prompts=report.build_prompt_set(experiment, settings).prompts,
        repeats=args.repeats,
        out=args.out,
    )
