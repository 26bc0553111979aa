"""Statistics of an evaluation: before/after comparisons with intervals that hold at 10–30 prompts,
per-prompt win rates, and text diversity measures.

Several completions of one prompt are not independent, and held-out prompts often come in groups
(the toy demo asks about each topic twice): the unit of resampling is the *cluster* of prompts (one
prompt per cluster when no grouping is given). For a statistic θ of a set of prompts (a mean
difference, a distinct-2 difference, a win rate), with G clusters and θ_(−g) computed without
cluster g, the delete-a-cluster jackknife gives

    se² = (G − 1)/G · Σ_g (θ_(−g) − θ̄)²,   θ̄ = mean_g θ_(−g),
    CI  = θ ± t_{G−1, 1−α/2} · se.

For a mean over equal-sized clusters, se² = s²/G with s² the sample variance of the cluster means,
so the interval is the exact Student t interval (coverage 1 − α for normal cluster means, close to
it otherwise); the percentile bootstrap it replaces covered 0.89 at 10–12 prompts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from scipy.stats import t as student_t

MIN_PROMPTS = 10  # below this many prompts an interval over prompts is not worth much


def jackknife_interval(statistic: Callable[[Sequence[str]], float], prompts: Sequence[str],
                       clusters: Mapping[str, str] | None = None,
                       confidence: float = 0.95) -> tuple[float, float, float]:
    """(θ, low, high): ``statistic`` of all ``prompts`` and its delete-a-cluster jackknife t interval
    (see the module docstring). ``clusters`` maps a prompt to its group (default: its own)."""
    groups: dict[str, list[str]] = {}
    for prompt in prompts:
        groups.setdefault((clusters or {}).get(prompt, prompt), []).append(prompt)
    if len(groups) < 2:
        raise ValueError(f"an interval needs at least 2 groups of prompts, got {len(groups)}")
    theta = statistic(prompts)
    leave_out = [statistic([p for p in prompts if p not in members]) for members in map(set, groups.values())]
    g = len(leave_out)
    centre = sum(leave_out) / g
    se = math.sqrt((g - 1) / g * sum((x - centre) ** 2 for x in leave_out))
    half = float(student_t.ppf(1 - (1 - confidence) / 2, g - 1)) * se
    return theta, theta - half, theta + half


@dataclass
class Comparison:
    """One judge before vs after on the same prompts: per-prompt means, after − before, its interval,
    and the share of prompts where after beats before (ties count ½) with its interval."""

    before: float
    after: float
    difference: float
    ci_low: float
    ci_high: float
    prompts: int
    clusters: int  # independent groups of prompts the interval resamples
    samples: int  # completions per side
    win_rate: float
    win_low: float
    win_high: float
    higher_is_better: bool = True

    @property
    def significant(self) -> bool:
        """The 95% interval excludes zero."""
        return self.ci_low > 0 or self.ci_high < 0

    @property
    def caveat(self) -> str:
        """"" — or, with fewer than MIN_PROMPTS independent units (prompts, or groups of prompts: 24
        prompts in pairs are 12), the note that a verdict on them is unreliable."""
        if self.clusters >= MIN_PROMPTS:
            return ""
        units = f"{self.prompts} prompts" if self.clusters == self.prompts else f"{self.clusters} groups of prompts"
        return f" (only {units}: unreliable)"

    @property
    def verdict(self) -> str:
        """improved / worse (in the judge's own direction) / no clear change, with its :attr:`caveat`."""
        better = (self.difference > 0) == self.higher_is_better
        return (("improved" if better else "worse") if self.significant else "no clear change") + self.caveat

    def as_dict(self) -> dict:
        return {**vars(self), "significant": self.significant, "verdict": self.verdict}


def paired_comparison(before: Mapping[str, Sequence[float]], after: Mapping[str, Sequence[float]],
                      clusters: Mapping[str, str] | None = None, higher_is_better: bool = True,
                      confidence: float = 0.95) -> Comparison:
    """Compare per-prompt mean scores b_i and a_i (several samples per prompt on each side):
    Δ = mean_i (a_i − b_i), win rate = mean_i (1[a_i > b_i] + ½·1[a_i = b_i]) — each with its
    cluster jackknife interval (module docstring). A win counts in the judge's direction."""
    prompts = sorted(before.keys() & after.keys())
    if len(prompts) < 2:
        raise ValueError(f"a comparison needs at least 2 prompts scored before and after, got {len(prompts)}")
    b = {p: sum(before[p]) / len(before[p]) for p in prompts}
    a = {p: sum(after[p]) / len(after[p]) for p in prompts}
    sign = 1.0 if higher_is_better else -1.0
    win = {p: 1.0 if sign * (a[p] - b[p]) > 0 else 0.5 if a[p] == b[p] else 0.0 for p in prompts}

    def mean_of(values: Mapping[str, float]) -> Callable[[Sequence[str]], float]:
        return lambda subset: sum(values[p] for p in subset) / len(subset)

    difference, low, high = jackknife_interval(mean_of({p: a[p] - b[p] for p in prompts}), prompts, clusters,
                                               confidence)
    win_rate, win_low, win_high = jackknife_interval(mean_of(win), prompts, clusters, confidence)
    return Comparison(before=mean_of(b)(prompts), after=mean_of(a)(prompts), difference=difference, ci_low=low,
                      ci_high=high, prompts=len(prompts), clusters=len({(clusters or {}).get(p, p) for p in prompts}),
                      samples=sum(len(after[p]) for p in prompts), win_rate=win_rate, win_low=max(0.0, win_low),
                      win_high=min(1.0, win_high), higher_is_better=higher_is_better)


def ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams of all texts (Li et al. 2016): low = the policy says the same thing."""
    grams = [g for text in texts for g in ngrams(text.lower().split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def template_share(texts: Sequence[str], similarity: float = 0.5) -> float:
    """Share of the texts in the largest group of near-duplicates: texts whose word-bigram sets have
    Jaccard similarity |A ∩ B| / |A ∪ B| ≥ ``similarity`` with the group's first text (greedy, in
    order). "For baking bread, start small …" and "For fixing a bike, start small …" share a template."""
    grams = [set(ngrams(text.lower().split(), 2)) or {(text.lower(),)} for text in texts]
    unassigned, largest = list(range(len(texts))), 0
    while unassigned:
        first = grams[unassigned[0]]
        group = [i for i in unassigned if len(first & grams[i]) >= similarity * len(first | grams[i])]
        largest = max(largest, len(group))
        unassigned = [i for i in unassigned if i not in group]
    return largest / len(texts) if texts else 0.0


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
