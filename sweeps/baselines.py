"""The baselines a sweep has to beat: what a user would train without it, each trained in full.

    search: {baselines: [qlora, calibrated]}    # what the default, auto, runs in a sweep of several trials
    search: {baselines: []}                     # none; a single trial's auto is [calibrated]

- `qlora`: the QLoRA paper's recipe for 7B-13B models (Dettmers et al. 2023, arXiv:2305.14314, sec. 4 and
  appendix B): r 64, alpha 16, every linear layer, learning rate 2e-4, dropout 0.1.
- `calibrated`: today's informed default. LoRA on every linear layer with r 32 and alpha 32, the setting
  "LoRA Without Regret" (Schulman and Thinking Machines Lab, 2025) trains with: its learning rate is about 10x
  full fine-tuning's and nearly independent of the rank when alpha is fixed. The learning rate is
  calibrated to the model's width as the Tinker cookbook's `get_lr` computed it in 2025
  (tinker_cookbook/hyperparam_utils.py): 5e-5 x 10 x (2000 / hidden_size) ** P, with P 0.781 for
  Llama-family models and 0.0775 for Qwen, fitted by its authors to sweeps of several model sizes (about
  1.3e-3 for SmolLM2-135M's 576-wide model, 2.9e-4 for Llama-2-7B's 4096). No dropout: the short runs a
  sweep compares are not where it pays. Later versions of the cookbook replaced the formula by a table of
  sweep results per model (e.g. 1e-3 for Llama-3.2-1B, 3e-4 for Llama-3.1-8B), close to the formula's
  values for those widths; the formula serves any model.

The driver runs the baselines first (the searcher's points to evaluate), ASHA never stops them early
(sweeps.search.build_scheduler), the report always lets them answer the held-out prompts and recommends the
best of them unless a finalist of the search is measurably better (analysis.rank).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal, get_args

from trainable.outcome import BaselineName
from trainable.settings import ModelSettings

BASELINES: tuple[BaselineName, ...] = get_args(BaselineName)

QLORA_RECIPE: dict[str, Any] = {
    "r": 64,
    "lora_alpha": 16,
    "target_modules": "all-linear",
    "learning_rate": 2e-4,
    "lora_dropout": 0.1,
}

# Tinker cookbook's get_lr (2025): the base learning rate of full fine-tuning at width 2000, LoRA's factor
# over it, and the exponent of (2000 / hidden_size) per model family.
_BASE_LR = 5e-5
_LORA_FACTOR = 10.0
_WIDTH = 2000
_EXPONENTS = {"qwen": 0.0775}  # by model_type prefix; every other family takes Llama's
_LLAMA_EXPONENT = 0.781


def calibrated_learning_rate(hidden_size: int, model_type: str = "llama") -> float:
    """LoRA's learning rate for a model of this width (module docstring), to 3 significant digits."""
    exponent = next((e for prefix, e in _EXPONENTS.items() if model_type.startswith(prefix)), _LLAMA_EXPONENT)
    return float(f"{_BASE_LR * _LORA_FACTOR * (_WIDTH / hidden_size) ** exponent:.3g}")


def model_learning_rate(model_path: str, settings: ModelSettings) -> float:
    """calibrated_learning_rate of the model at `model_path` (a folder or a hub id), from its config (a
    multimodal model's text config). ValueError naming the model when the config has no hidden_size."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        model_path, revision=settings.revision, trust_remote_code=settings.trust_remote_code
    ).get_text_config()
    hidden_size = getattr(config, "hidden_size", None)
    if not isinstance(hidden_size, int):
        raise ValueError(
            f"model {model_path}: its config has no integer hidden_size, which the calibrated learning rate "
            "(search.baselines: calibrated, and learning-rate bounds relative to it) is computed from"
        )
    return calibrated_learning_rate(hidden_size, str(getattr(config, "model_type", "")))


def calibrated_point(learning_rate: float) -> dict[str, Any]:
    return {
        "r": 32,
        "lora_alpha": 32,
        "target_modules": "all-linear",
        "learning_rate": learning_rate,
        "lora_dropout": 0.0,
    }


@dataclasses.dataclass(frozen=True)
class StartingPoint:
    """A trial the searcher runs before it samples: a baseline, or one of search.initial_points. `values`
    hold every searched hyperparameter (those a point leaves out take the `lora` section's value)."""

    origin: Literal["baseline", "initial"]
    values: dict[str, Any]
    baseline: str = ""  # its BaselineName, for a baseline


def holds_point(config: Mapping[str, Any], point: Mapping[str, Any]) -> bool:
    """Whether a trial's config trains `point`: every value of the point, exactly (the searcher hands the
    points it was given back unchanged)."""
    return all(name in config and config[name] == value for name, value in point.items())


def claim_points(configs: list[Mapping[str, Any]], points: list[Mapping[str, Any]]) -> list[int | None]:
    """For trials in the order Tune created them, the index of the starting point each one trains, or None
    for a trial of the searcher's own. The searcher suggests the points first, in order, so each point
    belongs to the first trial not yet claimed whose config holds it; a later trial that the searcher
    happened to give the same values stays the searcher's."""
    claimed: list[int | None] = [None] * len(configs)
    for index, point in enumerate(points):
        for i, config in enumerate(configs):
            if claimed[i] is None and holds_point(config, point):
                claimed[i] = index
                break
    return claimed
