"""Independent judges: offline scorers that are not the training reward.

Evaluating a policy with the reward it was trained on measures how well it learned to please that
reward, hacks included; these judges give a second opinion. Each fits the reward contract.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class ProfanityJudge:
    """1 − P(offensive) from ``alt-profanity-check`` (a linear SVM on bag of words): 1 is clean."""

    name = "not_offensive"

    def __init__(self) -> None:
        from profanity_check import predict_prob

        self._predict_prob = predict_prob

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        if not completions:
            return torch.zeros(0)
        offensive = self._predict_prob(list(completions))
        return 1.0 - torch.as_tensor(offensive, dtype=torch.float32)


class SentimentJudge:
    """VADER's compound sentiment score of the completion, from −1 (negative) to +1 (positive)."""

    name = "sentiment"

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        scores = [self._analyzer.polarity_scores(text)["compound"] for text in completions]
        return torch.tensor(scores, dtype=torch.float32)


JUDGES = {"profanity": ProfanityJudge, "sentiment": SentimentJudge}
