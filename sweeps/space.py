"""The search space, as data: which LoRA hyperparameters a sweep varies and over what range.

A parameter is a one-key mapping: {"choice": [...]}, {"uniform": [low, high]}, {"loguniform": [low, high]}
or {"randint": [low, high]} (high exclusive). YAML files may replace the whole space under `search.space`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from pydantic import ValidationError

from trainable.search_space import parse_dimension, parse_space
from trainable.settings import HYPERPARAMETERS, Hyperparameters

# Sources (docs/search.md has the longer why): Hu et al. 2021, "LoRA" (arXiv:2106.09685); Dettmers et al.
# 2023, "QLoRA" (arXiv:2305.14314); Schulman and Thinking Machines Lab 2025, "LoRA Without Regret" (blog
# post, thinkingmachines.ai). The baselines (sweeps/baselines.py) lie in this space.
DEFAULT_SPACE: dict[str, dict[str, list[Any]]] = {
    # The hyperparameter that matters most, so the widest, continuous range, centred where the evidence is:
    # a decade either side of the model's calibrated rate (sweeps.baselines: 5e-5 x 10 x (2000 /
    # hidden_size) ** 0.781 for Llama-family models; 1.3e-3 for SmolLM2-135M, 2.9e-4 for Llama-2-7B). TPE's
    # prior is centred on the range (Optuna's Parzen estimator puts it at the middle in log space), so the
    # first trials start at the calibrated rate instead of at QLoRA's 2e-4 whatever the model.
    "learning_rate": {"loguniform": ["calibrated / 10", "calibrated * 10"]},
    # Rank matters much less: QLoRA (sec. 4, fig. 4) found r unrelated to quality once every linear layer
    # is adapted; LoRA Without Regret sees rank limit LoRA only once the data outgrows the adapter.
    # Powers of two from 8 to 64 span the ranks people ship; 4-bit weights make 64 affordable.
    "r": {"choice": [8, 16, 32, 64]},
    # Nearly fixed: the update scales with alpha/r x learning rate, so alpha trades with the learning rate,
    # and with alpha fixed the best learning rate barely moves with r (LoRA Without Regret). 16 is QLoRA's
    # value, 32 LoRA Without Regret's; searching wider would spend trials the learning rate already covers.
    "lora_alpha": {"choice": [16, 32]},
    # MLP layers matter: attention-only LoRA trails (QLoRA sec. 4: all linear layers are needed to match
    # full fine-tuning; LoRA Without Regret: MLP-only is close to all, attention-only falls behind), so the
    # choice is MLP-only against all linear layers; attention-only presets are left out (our judgement).
    "target_modules": {"choice": ["mlp", "all-linear"]},
    # QLoRA used 0.1 up to 13B and 0.05 above; 0 (no regularization) is the natural contrast for short runs.
    # A minor axis: our judgement, not a finding.
    "lora_dropout": {"choice": [0.0, 0.05, 0.1]},
    # Not searched by default (add them under search.space; each costs trials in a small sweep): use_rslora
    # (Kalajdzievski 2023), use_dora (Liu et al. 2024), loraplus_lr_ratio (Hayou et al. 2024), bias.
}

# A learning-rate bound written relative to the model's calibrated rate (sweeps.baselines): "calibrated",
# or it times or divided by a number, e.g. "calibrated / 10".
_RELATIVE = re.compile(r"^\s*calibrated\s*(?:(?P<op>[*/])\s*(?P<factor>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?))?\s*$")


def resolve_space(space: dict[str, Any], calibrated_lr: float | None) -> tuple[dict[str, Any], list[str]]:
    """The space with learning-rate bounds written relative to the calibrated rate turned into numbers (3
    significant digits), and the problems of such bounds. Without `calibrated_lr` (the model not resolved
    yet) such a dimension is left out of the space returned, its bounds checked for their form only."""
    resolved, problems = {}, []
    for name, spec in space.items():
        kind, values = next(iter(spec.items())) if isinstance(spec, dict) and len(spec) == 1 else ("", None)
        if kind == "choice" or not isinstance(values, list) or not any(isinstance(v, str) for v in values):
            resolved[name] = spec  # no relative bound (check_space says what else may be wrong with it)
            continue
        if name != "learning_rate" or kind not in ("uniform", "loguniform"):
            problems.append(
                f"search.space.{name}.{kind}: {values!r}: only learning_rate's uniform or "
                "loguniform bounds may be written relative to the calibrated rate"
            )
            continue
        bounds = []
        for value in values:
            match = _RELATIVE.match(value) if isinstance(value, str) else None
            if isinstance(value, str) and match is None:
                problems.append(
                    f"search.space.{name}.{kind}: {value!r} is not a number, 'calibrated', or "
                    "'calibrated * N' / 'calibrated / N'"
                )
            elif match is None or calibrated_lr is None:
                bounds.append(value)
            else:
                factor = float(match["factor"] or 1)
                scaled = calibrated_lr * factor if match["op"] != "/" else calibrated_lr / factor
                bounds.append(float(f"{scaled:.3g}"))
        if calibrated_lr is not None and len(bounds) == len(values):
            resolved[name] = {kind: bounds}
    return resolved, problems


def check_space(space: dict[str, Any]) -> list[str]:
    """Problems with a search space, each naming its key; empty when the space is usable."""
    problems = []
    for name, spec in space.items():
        if name not in HYPERPARAMETERS:
            problems.append(
                f"search.space.{name}: not a hyperparameter; searchable are {', '.join(HYPERPARAMETERS)}"
            )
            continue
        dimension = parse_dimension(name, spec)
        if isinstance(dimension, str):
            problems.append(dimension)
            continue
        values = dimension.values if dimension.kind == "choice" else dimension.bounds
        problems += [
            f"search.space.{name}: {problem}" for value in values for problem in check_value(name, value)
        ]
    return problems


def check_value(name: str, value: Any) -> list[str]:
    """Why `value` is not valid for hyperparameter `name` (Hyperparameters' rules), or nothing."""
    try:
        dataclasses.replace(Hyperparameters(), **{name: value})
    except ValidationError as err:
        return [f"value {value!r}: {e['msg']}" for e in err.errors()]
    except TypeError as err:  # pydantic dataclasses raise this for some non-coercible values
        return [f"value {value!r}: {err}"]
    return []


def to_tune_space(space: dict[str, Any]) -> dict[str, Any]:
    """The space as Ray Tune domains, which OptunaSearch turns into Optuna distributions (the same ones
    Dimension.to_optuna gives the study that the driver records)."""
    return {name: dimension.to_tune() for name, dimension in parse_space(space).items()}
