"""Naming a reward on the command line or in a config: one string, resolved to a `RewardFn`.

| spec | reward |
|---|---|
| ``PATH`` (a folder from ``rlhfkit reward train``) | the Bradley-Terry reward model |
| ``judge:profanity`` / ``judge:sentiment`` | 1 − P(offensive) / VADER compound |
| ``classifier:NAME_OR_PATH:LABEL`` | logit of LABEL from a sequence classifier |
| ``python:MODULE:FUNCTION`` | ``FUNCTION(prompt, completion) -> float`` |
"""

from __future__ import annotations

import importlib
from pathlib import Path

from rlhfkit.eval.judges import JUDGES
from rlhfkit.reward.base import FunctionReward, RewardFn
from rlhfkit.reward.classifier import ClassifierReward
from rlhfkit.reward.model import RewardModel


def load_reward(spec: str) -> RewardFn:
    kind, _, rest = spec.partition(":")
    if kind == "judge":
        if rest not in JUDGES:
            raise ValueError(f"unknown judge {rest!r}; choose one of {sorted(JUDGES)}")
        return JUDGES[rest]()
    if kind == "classifier":
        name, sep, label = rest.rpartition(":")
        if not sep or not name:
            raise ValueError(f"classifier reward spec must be classifier:NAME_OR_PATH:LABEL, got {spec!r}")
        return ClassifierReward.from_pretrained(name, label=int(label) if label.isdigit() else label)
    if kind == "python":
        module, sep, function = rest.partition(":")
        if not sep:
            raise ValueError(f"python reward spec must be python:MODULE:FUNCTION, got {spec!r}")
        return FunctionReward(getattr(importlib.import_module(module), function))
    if Path(spec).is_dir():
        return RewardModel.load(spec)
    raise ValueError(f"cannot read reward spec {spec!r}: not a reward-model folder, nor judge:NAME, "
                     "classifier:NAME_OR_PATH:LABEL or python:MODULE:FUNCTION")
