"""The search space, as data: which LoRA hyperparameters a sweep varies and over what range.

A parameter is a one-key mapping: {"choice": [...]}, {"uniform": [low, high]}, {"loguniform": [low, high]}
or {"randint": [low, high]} (high exclusive). YAML files may replace the whole space under `search.space`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from trainable.search_space import KINDS
from trainable.settings import HYPERPARAMETERS, Hyperparameters

# Sources (docs/search.md has the longer why): Hu et al. 2021, "LoRA" (arXiv:2106.09685); Dettmers et al.
# 2023, "QLoRA" (arXiv:2305.14314); Schulman and Thinking Machines Lab 2025, "LoRA Without Regret" (blog
# post, thinkingmachines.ai). The recipe below is QLoRA's and lies in this space.
DEFAULT_SPACE: dict[str, dict[str, list[Any]]] = {
    # The hyperparameter that matters most, so the widest, continuous range: LoRA's best learning rate is
    # about 10x full fine-tuning's and barely moves with r (LoRA Without Regret), but moves with model size
    # and data; a decade either side of QLoRA's 2e-4 for 7B, which reaches small models' higher optimum.
    "learning_rate": {"loguniform": [2e-5, 2e-3]},
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

# The QLoRA paper's recipe for 7B-13B models; a sweep evaluates it first, so the search has to beat it.
QLORA_RECIPE: dict[str, Any] = {
    "r": 64,
    "lora_alpha": 16,
    "target_modules": "all-linear",
    "learning_rate": 2e-4,
    "lora_dropout": 0.1,
}


def check_space(space: dict[str, Any]) -> list[str]:
    """Problems with a search space, each naming its key; empty when the space is usable."""
    problems = []
    for name, spec in space.items():
        key = f"search.space.{name}"
        if name not in HYPERPARAMETERS:
            problems.append(f"{key}: not a hyperparameter; searchable are {', '.join(HYPERPARAMETERS)}")
            continue
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            problems.append(
                f"{key}: must be one of {{choice: [...]}}, {{uniform|loguniform|randint: [low, high]}}; got {spec!r}"
            )
            continue
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            problems.append(f"{key}.{kind}: must be a non-empty list, got {values!r}")
            continue
        if kind != "choice":
            if (
                len(values) != 2
                or not all(isinstance(v, int | float) for v in values)
                or values[0] >= values[1]
            ):
                problems.append(f"{key}.{kind}: must be [low, high] numbers with low < high, got {values!r}")
                continue
            if kind == "loguniform" and values[0] <= 0:
                problems.append(f"{key}.loguniform: low must be > 0, got {values[0]}")
                continue
            values = [values[0], values[1] - 1 if kind == "randint" else values[1]]
        problems += [f"{key}: {problem}" for value in values for problem in check_value(name, value)]
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


def contains(space: dict[str, Any], name: str, value: Any) -> bool:
    kind, values = next(iter(space[name].items()))
    if kind == "choice":
        return value in values
    high_ok = value < values[1] if kind == "randint" else value <= values[1]
    return isinstance(value, int | float) and values[0] <= value and high_ok


def to_tune_space(space: dict[str, Any]) -> dict[str, Any]:
    """The space as Ray Tune domains, which OptunaSearch turns into Optuna distributions (the same ones
    trainable.search_space.to_optuna_distributions gives the study that the driver records)."""
    from ray import tune

    makers: dict[str, Callable[..., Any]] = {
        "choice": tune.choice,
        "uniform": tune.uniform,
        "loguniform": tune.loguniform,
        "randint": tune.randint,
    }
    domains = {}
    for name, spec in space.items():
        kind, values = next(iter(spec.items()))
        domains[name] = makers[kind](values) if kind == "choice" else makers[kind](*values)
    return domains
