"""The report's settings: read from the sweep's `report` section with dotted overrides."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from analysis.experiment import Experiment, ExperimentError
from analysis.settings import load_report_settings
from tests.conftest import sweep_summary
from trainable.settings import apply_override


def experiment_with(report: dict) -> Experiment:
    return Experiment(path=Path("."), summary=sweep_summary({"report": report}), results=pd.DataFrame())


def test_overrides_read_exponents_as_floats_as_the_driver_does() -> None:
    data: dict = {}
    apply_override(data, "report.loss_tolerance=1e-4", strip_prefix="report.")
    assert data == {"loss_tolerance": 1e-4} and isinstance(data["loss_tolerance"], float)
    settings = load_report_settings(
        experiment_with({"top_k": 3}), ["loss_tolerance=1e-4", "report.generation.temperature=5e-1"]
    )
    assert settings.top_k == 3 and settings.loss_tolerance == 1e-4 and settings.generation.temperature == 0.5


def test_every_bad_override_is_named_at_once() -> None:
    with pytest.raises(ExperimentError, match=r"expected key=value, e\.g\. generation\.max_new_tokens=32"):
        load_report_settings(experiment_with({}), ["generation.max_new_tokens"])
    with pytest.raises(ExperimentError) as err:
        load_report_settings(experiment_with({}), ["top_k=0", "colour=red"])
    message = str(err.value)
    assert "report settings: 2 problem(s)" in message
    assert "report.top_k" in message and "report.colour" in message
