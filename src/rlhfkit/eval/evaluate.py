"""Judge a policy on held-out prompts: several samples per prompt, several seeds, independent judges,
and the KL to the reference measured on the same samples.

Samples come from the rollout code (plain temperature sampling), so that the per-sequence estimate
KL = Σ_t log π(y_t) − log π_ref(y_t) is unbiased for KL(π ‖ π_ref) on the evaluation prompts. Before
training, π = π_ref and it is exactly 0.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhfkit.console import progress_bar
from rlhfkit.data.io import read_records, write_records
from rlhfkit.data.records import Completion, Prompt, SamplingParams
from rlhfkit.eval.metrics import Comparison, distinct_n, mean_words, paired_bootstrap, repetition
from rlhfkit.models.policy import SamplingDistribution, prepare_tokenizer
from rlhfkit.models.reference import Reference
from rlhfkit.models.value_head import Actor
from rlhfkit.reward.base import RewardFn
from rlhfkit.rollout import collect_rollout


@dataclass
class EvalConfig:
    samples: int = 4  # completions per prompt and seed
    seeds: tuple[int, ...] = (0, 1, 2)
    max_new_tokens: int = 40
    temperature: float = 1.0
    batch_size: int = 16  # prompts per generate call
    use_chat_template: bool = True


@torch.no_grad()
def evaluate_policy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt],
                    judges: dict[str, RewardFn], config: EvalConfig, reference: Reference | None = None,
                    model_name: str = "policy", output: str | os.PathLike | None = None,
                    progress: bool = True) -> list[Completion]:
    """Sample and score; every completion carries each judge's score, ``kl`` and ``tokens``.

    ``reference``: π_ref for the KL (None: the policy itself, as for the initial policy). With an
    ``output`` file that already holds a finished evaluation, that file is read instead."""
    if output is not None and Path(output).exists():
        return read_records(output, Completion)
    if not judges:
        raise ValueError("evaluation needs at least one judge")
    tokenizer = prepare_tokenizer(tokenizer, model)
    model.eval()
    reference = reference or _SelfReference(model)
    actor = Actor(model, value_head=False)
    sampling = SamplingDistribution(config.temperature, 0, tokenizer.eos_token_id)
    first, *others = judges.items()
    completions: list[Completion] = []
    batches = [prompts[i:i + config.batch_size] for i in range(0, len(prompts), config.batch_size)]
    with progress_bar(progress) as bar:
        task = bar.add_task(f"evaluating {model_name}", total=len(batches) * len(config.seeds), info="")
        for seed in config.seeds:
            params = SamplingParams(temperature=config.temperature, max_new_tokens=config.max_new_tokens, seed=seed)
            for b, batch in enumerate(batches):
                torch.manual_seed(seed * 1_000_003 + b)
                rollout = collect_rollout(actor, reference, tokenizer, [p.text for p in batch], first[1], sampling,
                                          config.max_new_tokens, config.samples, config.use_chat_template)
                mask = rollout.mask
                kl = ((rollout.logprobs - rollout.ref_logprobs) * mask).sum(dim=1)
                scores = {first[0]: rollout.scores.tolist(), "kl": kl.tolist(), "tokens": mask.sum(dim=1).tolist()}
                for name, judge in others:
                    scores[name] = judge(rollout.prompts, rollout.completions).tolist()
                for i, text in enumerate(rollout.completions):
                    prompt = batch[i // config.samples]
                    index = seed * config.samples + i % config.samples
                    completions.append(Completion(
                        id=f"{prompt.id}-s{seed}-{i % config.samples}", prompt_id=prompt.id, prompt=prompt.text,
                        text=text.strip(), index=index, model=model_name, sampling=params,
                        scores={k: float(v[i]) for k, v in scores.items()}))
                bar.update(task, advance=1)
    if output is not None:
        write_records(output, completions)
    return completions


class _SelfReference(Reference):
    """The policy as its own reference (KL = 0): evaluating the initial policy needs no copy of it."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.shared, self.model = False, model


def scores_by_prompt(completions: Sequence[Completion], key: str) -> dict[str, list[float]]:
    result: dict[str, list[float]] = defaultdict(list)
    for c in completions:
        result[c.prompt_id].append(c.scores[key])
    return dict(result)


def text_stats(completions: Sequence[Completion]) -> dict[str, float]:
    texts = [c.text for c in completions]
    n = max(len(completions), 1)
    return {"kl": sum(c.scores.get("kl", 0.0) for c in completions) / n,
            "tokens": sum(c.scores.get("tokens", 0.0) for c in completions) / n,
            "words": mean_words(texts), "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
            "repetition_3": repetition(texts, 3)}


def compare(before: Sequence[Completion], after: Sequence[Completion], key: str, seed: int = 0) -> Comparison:
    """Paired bootstrap of one judge's per-prompt mean score, after − before."""
    return paired_bootstrap(scores_by_prompt(before, key), scores_by_prompt(after, key), seed=seed)
