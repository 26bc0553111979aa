"""The reference model π_ref: the frozen initial policy that the KL penalty and DPO compare against.

With LoRA the reference is the policy itself with its adapter disabled, so the base weights are held
once; otherwise it is a frozen copy made before training starts.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
from transformers import PreTrainedModel

from rlhfkit.models.policy import PLAIN_SAMPLING, SamplingDistribution, TokenBatch, completion_logits, token_logprobs


def is_lora(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def add_lora(model: PreTrainedModel, r: int = 8, alpha: int = 16, dropout: float = 0.0,
             target_modules: list[str] | str | None = None):
    """Wrap a policy with LoRA adapters (peft); only the adapters are trained."""
    from peft import LoraConfig, TaskType, get_peft_model

    from rlhfkit.models.policy import is_seq2seq

    task = TaskType.SEQ_2_SEQ_LM if is_seq2seq(model) else TaskType.CAUSAL_LM
    return get_peft_model(model, LoraConfig(task_type=task, r=r, lora_alpha=alpha, lora_dropout=dropout,
                                            target_modules=target_modules or "all-linear"))


class Reference:
    """log π_ref(y_t) for completion tokens, never with gradients."""

    def __init__(self, policy: PreTrainedModel, copy_weights: bool | None = None) -> None:
        self.shared = is_lora(policy) if copy_weights is None else not copy_weights
        if self.shared and not is_lora(policy):
            raise ValueError("a shared reference needs a LoRA policy (the adapter is switched off to get π_ref)")
        self.model = policy if self.shared else copy.deepcopy(policy).eval().requires_grad_(False)

    @classmethod
    def frozen(cls, model: PreTrainedModel) -> Reference:
        """A reference from a separate model (e.g. the initial policy loaded again), used as it is: no copy."""
        reference = cls.__new__(cls)
        reference.shared, reference.model = False, model.eval().requires_grad_(False)
        return reference

    def to(self, device: torch.device | str) -> Reference:
        """Move a separate reference next to the policy (a shared one moves with the policy)."""
        if not self.shared:
            self.model.to(device)
        return self

    @torch.no_grad()
    def logprobs(self, batch: TokenBatch, sampling: SamplingDistribution = PLAIN_SAMPLING) -> torch.Tensor:
        with self.model.disable_adapter() if self.shared else nullcontext():
            logits, _ = completion_logits(self.model, batch)
            return token_logprobs(logits, batch.completion_ids, sampling)[0]
