"""The reward contract shared by reward models, classifiers, judges and plain functions.

A reward is anything callable as ``reward(prompts, completions) -> torch.Tensor`` with one float per
completion. PPO, GRPO, evaluation and the reward-hacking monitors never care which kind they got.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class RewardFn(Protocol):
    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor: ...


class FunctionReward:
    """A plain Python function as a reward.

    ``fn(prompt, completion) -> float`` is called once per completion; with ``batched=True``,
    ``fn(prompts, completions) -> sequence of floats`` is called once per batch.
    """

    def __init__(self, fn: Callable, batched: bool = False, name: str | None = None) -> None:
        self.fn, self.batched = fn, batched
        self.name = name or getattr(fn, "__name__", "function")

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if self.batched:
            values = list(self.fn(list(prompts), list(completions)))
        else:
            values = [self.fn(p, c) for p, c in zip(prompts, completions, strict=True)]
        if len(values) != len(completions):
            raise ValueError(f"reward {self.name!r} returned {len(values)} values for {len(completions)} "
                             "completions")
        return torch.tensor([float(v) for v in values], dtype=torch.float32)
