"""The loss of a CPU trial: the LM head projects only the tokens that have a label.

trl's SFTTrainer computes its loss with a fused LM head that scores only the labelled positions on Triton
devices (CUDA); elsewhere it scores every position, the prompt and the padding included, and on top of the
loss computes the entropy and top-1 accuracy of every position over the whole vocabulary for its logs.
With a 49k vocabulary and short answers that is most of a CPU step's work: profiled on 2 cores with the
default model, the vocabulary-wide element-wise work alone took more time than the layers' 4-bit matmuls
(docs/speed.md). `CompactLossTrainer` computes the same loss as trl's (the sum of -log p(label) over the
labelled tokens, divided by `num_items_in_batch` or, without it, by their count) from the labelled
positions only, and leaves out the log-only metrics, which trials do not report.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from trl import SFTTrainer

IGNORE_INDEX = -100  # the label of a token without loss (prompt, padding), as transformers spells it


def labelled_token_loss(
    causal_lm: Any, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | int | None = None
) -> torch.Tensor:
    """The next-token loss of a causal LM on `inputs` (input_ids, attention_mask, labels, ...), with the LM
    head applied to the labelled positions only."""
    labels = inputs["labels"][:, 1:]
    backbone_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    hidden = causal_lm.base_model(**backbone_inputs, use_cache=False).last_hidden_state[:, :-1]
    mask = labels != IGNORE_INDEX
    logits = causal_lm.get_output_embeddings()(hidden[mask]).float()
    total = F.cross_entropy(logits, labels[mask], reduction="sum")
    return total / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)


class CompactLossTrainer(SFTTrainer):
    """SFTTrainer with `labelled_token_loss` (the module docstring says why); for CPU trials."""

    def compute_loss(  # type: ignore[override]
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        loss = labelled_token_loss(causal_lm, inputs, num_items_in_batch)
        return (loss, {"loss": loss}) if return_outputs else loss
