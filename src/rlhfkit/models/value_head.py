"""The actor (policy) with an optional value head on its last hidden state (the PPO critic).

Policy and critic share the transformer trunk, as in the PPO paper's shared-parameter variant whose
loss weighs the value term by c1; the head is one linear layer.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from rlhfkit.models.policy import PLAIN_SAMPLING, SamplingDistribution, TokenBatch, completion_logits, token_logprobs


class Actor(nn.Module):
    """``forward(batch)`` → (log-probs [B, T], entropy [B, T], values [B, T] or None) in one pass, so
    that a DDP wrapper sees every parameter that gets a gradient."""

    def __init__(self, model: PreTrainedModel, value_head: bool = True) -> None:
        super().__init__()
        self.model = model
        self.value_head = nn.Linear(model.config.hidden_size, 1) if value_head else None
        if self.value_head is not None:
            nn.init.normal_(self.value_head.weight, std=1.0 / (model.config.hidden_size + 1) ** 0.5)
            nn.init.zeros_(self.value_head.bias)

    def forward(self, batch: TokenBatch, sampling: SamplingDistribution = PLAIN_SAMPLING,
                with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        logits, hidden = completion_logits(self.model, batch, output_hidden=self.value_head is not None)
        logprobs, entropy = token_logprobs(logits, batch.completion_ids, sampling, with_entropy)
        values = None
        if self.value_head is not None:
            with torch.autocast(hidden.device.type, enabled=False):  # V(s_t) in fp32 under a bf16 autocast too
                values = self.value_head(hidden.float()).squeeze(-1)
        return logprobs, entropy, values
