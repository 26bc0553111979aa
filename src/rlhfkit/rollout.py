"""Phase 1 of every on-policy algorithm (PPO, GRPO, RLOO): sample, then score.

For a batch of prompts: sample completions from the policy, then record for every completion token
the policy's log-prob, the reference's log-prob and (PPO) the value estimate, and for every completion
the reward from any reward callable.

Sampling is plain temperature sampling: top-k, top-p, repetition penalties and the like would make the
sampling distribution differ from softmax(logits / τ), the distribution whose log-probs enter the KL
estimate and the PPO ratio; that mismatch is the classic cause of a KL that comes out negative. So the
generation settings are built here from scratch, and none is taken from the model's `generation_config`;
the completions come from the rollout engine (`models/engine.py`: each prompt's KV read once for its
n samples, `generate` for models it cannot run). A prompt that leaves no room for ``max_new_tokens`` in
the model's positions is refused with its text.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from rlhfkit.data.records import Text, render_text
from rlhfkit.generate import format_prompt
from rlhfkit.models.engine import Decoding, sample_completions
from rlhfkit.models.packed import forget_packed_weights
from rlhfkit.models.policy import PLAIN_SAMPLING, SamplingDistribution, TokenBatch, check_prompt_lengths
from rlhfkit.models.reference import Reference
from rlhfkit.models.value_head import Actor
from rlhfkit.reward.base import RewardFn, score_completions


@dataclass
class Rollout:
    prompts: list[str]  # one per completion (a prompt repeated for each of its samples)
    completions: list[str]
    batch: TokenBatch
    logprobs: torch.Tensor | None  # [B, T] log π_θ_old(y_t) under the sampling distribution (None: not asked)
    ref_logprobs: torch.Tensor  # [B, T] log π_ref(y_t), under the same transformation of its logits
    values: torch.Tensor | None  # [B, T] V(s_t) from the value head (PPO only)
    scores: torch.Tensor  # [B] reward of each completion from the reward function

    @property
    def mask(self) -> torch.Tensor:
        return self.batch.completion_mask.float()


def completion_mask(tokens: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 for every token up to and including the first EOS, 0 after it (padding)."""
    is_eos = (tokens == eos_token_id).long()
    after_eos = (is_eos.cumsum(dim=1) - is_eos) > 0
    return (~after_eos).long()


@contextmanager
def full_parameters(actor: torch.nn.Module) -> Iterator[None]:
    """Generation needs whole weights: under FSDP, gather the shards for the duration (no write-back) and
    forget the packed copies of the gathered weights at the end (FSDP swaps parameters' storage in and out,
    which the packed-weight check would not always see). DDP and DeepSpeed ZeRO-1/2 keep whole weights on
    every rank and need nothing."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if not isinstance(actor, FullyShardedDataParallel):
        yield
        return
    with FullyShardedDataParallel.summon_full_params(actor, writeback=False, recurse=True):
        try:
            yield
        finally:
            forget_packed_weights(actor)


@torch.no_grad()
def collect_rollout(actor: torch.nn.Module, reference: Reference, tokenizer: PreTrainedTokenizerBase,
                    prompts: Sequence[Text], reward_fn: RewardFn, sampling: SamplingDistribution = PLAIN_SAMPLING,
                    max_new_tokens: int = 32, n_per_prompt: int = 1, use_chat_template: bool = False,
                    policy_logprobs: bool = True) -> Rollout:
    """Sample ``n_per_prompt`` completions per prompt and score them (see the module docstring).

    ``actor`` may be wrapped (DDP); generation uses the bare model, scoring goes through the wrapper.
    ``policy_logprobs=False`` skips the policy's forward pass (log-probs and values stay None), for
    updates that take one gradient step and get them from their own forward pass.
    """
    bare: Actor = getattr(actor, "module", actor)
    model = bare.model
    device = next(model.parameters()).device
    texts = [format_prompt(p, tokenizer, use_chat_template) for p in prompts]
    encoded = tokenizer(texts, return_tensors="pt", padding=True,
                        add_special_tokens=not use_chat_template).to(device)
    check_prompt_lengths(model, encoded["attention_mask"], texts, max_new_tokens)
    decoding = Decoding(max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
                        temperature=sampling.temperature, min_new_tokens=sampling.min_new_tokens)
    with full_parameters(actor):
        completion_ids = sample_completions(model, encoded["input_ids"], encoded["attention_mask"], n_per_prompt,
                                            decoding)
    batch = TokenBatch(prompt_ids=encoded["input_ids"].repeat_interleave(n_per_prompt, dim=0),
                       prompt_mask=encoded["attention_mask"].repeat_interleave(n_per_prompt, dim=0),
                       completion_ids=completion_ids,
                       completion_mask=completion_mask(completion_ids, tokenizer.eos_token_id))
    logprobs, _, values = actor(batch, sampling, with_entropy=False) if policy_logprobs else (None, None, None)
    # π_ref = π_θ itself (the initial policy evaluated, KL 0): its log-probs are the policy's, without a second pass
    same_model = logprobs is not None and not reference.shared and reference.model is model
    ref_logprobs = logprobs if same_model else reference.logprobs(batch, sampling)
    completions = tokenizer.batch_decode(completion_ids * batch.completion_mask
                                         + tokenizer.pad_token_id * (1 - batch.completion_mask),
                                         skip_special_tokens=True)
    repeated = [render_text(p) for p in prompts for _ in range(n_per_prompt)]
    scores = score_completions(reward_fn, repeated, completions).to(device)
    return Rollout(repeated, completions, batch, logprobs, ref_logprobs, values, scores)
