"""The search space, as data: which LoRA hyperparameters a sweep varies and over what range.

A parameter is a one-key mapping: {"choice": [...]}, {"uniform": [low, high]}, {"loguniform": [low, high]}
or {"randint": [low, high]} (high exclusive). YAML files may replace the whole space under `search.space`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import ValidationError

from trainable.search_space import parse_dimension, parse_space
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
