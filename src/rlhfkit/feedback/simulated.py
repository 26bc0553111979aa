"""Simulated labelers: rank completions by a hidden quality score, with noise, ties and flags.

They stand in for people in demos and tests. A good labeler sees the quality with a little Gaussian
noise; a noisy one with more; a poor one ranks at random; an adversarial one ranks worst first; a
tie-happy one ties neighbours whose qualities are close. :data:`KINDS` names these.
"""

from __future__ import annotations

import random
import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from rlhfkit.data.records import Completion, Ranking, render_text
from rlhfkit.reward.base import RewardFn


@dataclass(frozen=True)
class SimulatedLabeler:
    id: str
    noise: float = 0.1  # std of the Gaussian noise added to the quality before ranking
    tie_margin: float = 0.0  # neighbours whose noisy qualities differ by less than this are tied
    random_order: bool = False  # ignore the quality altogether (a poor labeler)
    adversarial: bool = False  # rank by the opposite of the quality
    flag_below_words: int = 3  # flag completions with fewer words as unusable (0: never flag)

    def rank(self, completions: Sequence[Completion], quality: Sequence[float], rng: random.Random,
             criterion: str) -> Ranking:
        """This labeler's ranking of one prompt's completions, best first."""
        if self.random_order:
            noisy = [rng.random() for _ in completions]
        else:
            sign = -1.0 if self.adversarial else 1.0
            noisy = [sign * q + rng.gauss(0.0, self.noise) for q in quality]
        order = sorted(range(len(completions)), key=lambda i: -noisy[i])
        groups: list[list[str]] = []
        head = None  # index of the best completion of the current group
        for i in order:
            if head is not None and noisy[head] - noisy[i] < self.tie_margin:
                groups[-1].append(completions[i].id)
            else:
                groups.append([completions[i].id])
                head = i
        flagged = [c.id for c in completions if len(c.text.split()) < self.flag_below_words]
        return Ranking(prompt_id=completions[0].prompt_id, labeler_id=self.id, criterion=criterion,
                       groups=groups, flagged=flagged)


def simulate_rankings(completions: Sequence[Completion], quality: RewardFn,
                      labelers: Sequence[SimulatedLabeler], criterion: str, seed: int = 0) -> list[Ranking]:
    """Every labeler ranks every prompt's completions; ``quality`` is scored once for all of them."""
    scores = quality([render_text(c.prompt) for c in completions], [c.text for c in completions]).tolist()
    by_prompt: dict[str, list[tuple[Completion, float]]] = defaultdict(list)
    for completion, score in zip(completions, scores, strict=True):
        by_prompt[completion.prompt_id].append((completion, score))
    rankings = []
    for labeler in labelers:
        rng = random.Random(seed * 1_000_003 + zlib.crc32(labeler.id.encode()))
        for items in by_prompt.values():
            rankings.append(labeler.rank([c for c, _ in items], [s for _, s in items], rng, criterion))
    return rankings


KINDS = {
    "good": lambda name: SimulatedLabeler(name, noise=0.1),
    "noisy": lambda name: SimulatedLabeler(name, noise=0.6),
    "random": lambda name: SimulatedLabeler(name, random_order=True, flag_below_words=0),
    "adversarial": lambda name: SimulatedLabeler(name, noise=0.1, adversarial=True, flag_below_words=0),
    "tie-happy": lambda name: SimulatedLabeler(name, noise=0.1, tie_margin=0.5),
}
