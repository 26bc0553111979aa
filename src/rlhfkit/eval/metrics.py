"""Statistics of an evaluation: a paired bootstrap confidence interval, and text diversity measures.

The paired bootstrap resamples *prompts* (with replacement), not samples: several completions of one
prompt are not independent, and a before/after comparison on the same prompts should keep each prompt's
pair together. For per-prompt means b_i (before) and a_i (after), i = 1..P:

    Δ = mean_i (a_i − b_i);   Δ*_k = mean_{i ∈ S_k} (a_i − b_i) for B resamples S_k of P prompts;
    95% CI = [2.5th, 97.5th] percentiles of Δ*  (percentile bootstrap).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

MIN_PROMPTS = 10  # below this many prompts a bootstrap interval over prompts is not worth much


@dataclass
class Comparison:
    before: float
    after: float
    difference: float
    ci_low: float
    ci_high: float
    prompts: int
    samples: int  # completions per side

    @property
    def significant(self) -> bool:
        """The 95% interval excludes zero."""
        return self.ci_low > 0 or self.ci_high < 0

    @property
    def verdict(self) -> str:
        """improved / worse / no clear change; with fewer than MIN_PROMPTS prompts the percentile
        bootstrap's interval is too narrow to trust, and the verdict says so."""
        verdict = ("improved" if self.difference > 0 else "worse") if self.significant else "no clear change"
        return verdict if self.prompts >= MIN_PROMPTS else f"{verdict} (only {self.prompts} prompts: unreliable)"

    def as_dict(self) -> dict:
        return {**vars(self), "significant": self.significant, "verdict": self.verdict}


def paired_bootstrap(before: dict[str, Sequence[float]], after: dict[str, Sequence[float]],
                     resamples: int = 10_000, confidence: float = 0.95, seed: int = 0) -> Comparison:
    """Compare per-prompt scores before and after (several samples per prompt on each side)."""
    prompts = sorted(before.keys() & after.keys())
    if len(prompts) < 2:
        raise ValueError(f"a bootstrap needs at least 2 prompts scored before and after, got {len(prompts)}")
    b = torch.tensor([sum(before[p]) / len(before[p]) for p in prompts], dtype=torch.float64)
    a = torch.tensor([sum(after[p]) / len(after[p]) for p in prompts], dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(prompts), (resamples, len(prompts)), generator=generator)
    deltas = (a - b)[picks].mean(dim=1)
    tail = (1 - confidence) / 2
    low, high = torch.quantile(deltas, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return Comparison(before=b.mean().item(), after=a.mean().item(), difference=(a - b).mean().item(),
                      ci_low=low, ci_high=high, prompts=len(prompts),
                      samples=sum(len(after[p]) for p in prompts))


def ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams of all texts (Li et al. 2016): low = the policy says the same thing."""
    grams = [g for text in texts for g in ngrams(text.lower().split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition(texts: Sequence[str], n: int = 3) -> float:
    """Mean share of each text's n-grams that repeat an earlier n-gram of the same text."""
    shares = []
    for text in texts:
        grams = ngrams(text.lower().split(), n)
        if grams:
            shares.append(1 - len(set(grams)) / len(grams))
    return sum(shares) / len(shares) if shares else 0.0


def mean_words(texts: Sequence[str]) -> float:
    return sum(len(t.split()) for t in texts) / len(texts) if texts else 0.0
