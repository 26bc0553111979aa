"""The reward contract shared by reward models, classifiers, judges and plain functions.

A reward is anything callable as ``reward(prompts, completions) -> torch.Tensor`` with one float per
completion. PPO, GRPO, evaluation and the reward-hacking monitors never care which kind they got;
they call it through :func:`score_completions`, which holds every reward to that contract (one finite
float per completion: no scalar broadcast to the batch, no NaN or inf trained on).
"""

from __future__ import annotations

import math
import numbers
import traceback
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class RewardFn(Protocol):
    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor: ...


class RewardError(ValueError):
    """A reward broke its contract; the message names the reward and, where one is to blame, the sample."""


def reward_name(reward_fn: RewardFn) -> str:
    return str(getattr(reward_fn, "name", None) or getattr(reward_fn, "__name__", None) or type(reward_fn).__name__)


def _shown(text: str, width: int = 60) -> str:
    return repr(text if len(text) <= width else text[: width - 3] + "...")


def score_completions(reward_fn: RewardFn, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
    """``reward_fn(prompts, completions)`` as a float32 tensor [n], after checking the contract: a tensor
    of n finite numbers, else a :class:`RewardError` naming the reward (and the first bad sample)."""
    name, n = reward_name(reward_fn), len(completions)
    scores = reward_fn(prompts, completions)
    if not isinstance(scores, torch.Tensor):
        raise RewardError(f"reward {name!r} returned a {type(scores).__name__}; a reward returns a torch.Tensor "
                          "with one float per completion")
    if scores.dim() != 1 or len(scores) != n:
        got = "a single value" if scores.dim() == 0 else f"a tensor of shape {tuple(scores.shape)}"
        raise RewardError(f"reward {name!r} returned {got} for {n} completions; it must return one float per "
                          "completion (shape [n]); a scalar is not broadcast")
    if scores.is_complex():
        raise RewardError(f"reward {name!r} returned a tensor of {scores.dtype}; rewards are real numbers")
    scores = scores.detach().float()
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise RewardError(f"reward {name!r} gave {scores[i].item()} for completion {i} of {n} (prompt "
                          f"{_shown(prompts[i])}, completion {_shown(completions[i])}); "
                          f"{len(bad)} of {n} scores are not finite")
    return scores


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
            returned = self._call(list(prompts), list(completions), what=f"a batch of {len(completions)}")
            if isinstance(returned, str | bytes) or not isinstance(returned, Sequence | torch.Tensor | np.ndarray):
                raise RewardError(f"reward {self.name!r} returned a {type(returned).__name__} for a batch of "
                                  f"{len(completions)}; a batched reward returns one float per completion")
            values = list(returned)
        else:
            values = [self._call(p, c, what=f"completion {i} ({_shown(c)})")
                      for i, (p, c) in enumerate(zip(prompts, completions, strict=True))]
        if len(values) != len(completions):
            raise RewardError(f"reward {self.name!r} returned {len(values)} values for {len(completions)} "
                              "completions")
        return torch.tensor([self._number(v, i, completions) for i, v in enumerate(values)], dtype=torch.float32)

    def _call(self, *args: object, what: str) -> object:
        """``fn(*args)``; an exception in the user's function is a RewardError naming where it was raised
        (``file:line``) and what it was scoring (the original stays chained as ``__cause__``)."""
        try:
            return self.fn(*args)
        except Exception as exc:
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            raise RewardError(f"{frame.filename}:{frame.lineno}: reward {self.name!r} raised "
                              f"{type(exc).__name__}: {exc} (scoring {what})") from exc

    def _number(self, value: object, index: int, completions: Sequence[str]) -> float:
        """A returned value as a float: a real number (or a one-element tensor), never a string or a list."""
        if isinstance(value, torch.Tensor | np.ndarray) and math.prod(value.shape) == 1:
            value = value.item()
        if isinstance(value, numbers.Real):
            try:
                return float(value)
            except OverflowError:
                raise RewardError(f"reward {self.name!r} returned {_shown(str(value))} for completion {index} "
                                  f"({_shown(completions[index])}); it is too large for a float") from None
        raise RewardError(f"reward {self.name!r} returned {type(value).__name__} {_shown(str(value))} for completion "
                          f"{index} ({_shown(completions[index])}); it must return a number")
