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


def python_reward(spec: str, module: str, function: str) -> FunctionReward:
    """``FUNCTION`` of ``MODULE`` (importable: installed, or its folder on PYTHONPATH) as a reward."""
    try:
        namespace = importlib.import_module(module)
    except ImportError as exc:
        raise ValueError(f"reward {spec!r}: cannot import module {module!r} ({exc}); is its folder on "
                         "PYTHONPATH?") from None
    fn = getattr(namespace, function, None)
    if not callable(fn):
        where = getattr(namespace, "__file__", None) or "built in"
        raise ValueError(f"reward {spec!r}: module {module!r} ({where}) has no function {function!r}")
    return FunctionReward(fn)


def load_reward(spec: str) -> RewardFn:
    """The reward a spec names (see the table above); a spec that cannot be resolved is a ValueError or,
    for a missing folder, a FileNotFoundError saying which."""
    kind, _, rest = spec.partition(":")
    if kind == "judge":
        if rest not in JUDGES:
            raise ValueError(f"unknown judge {rest!r}; choose one of {sorted(JUDGES)}")
        return JUDGES[rest]()
    if kind == "classifier":
        name, sep, label = rest.rpartition(":")
        if not sep or not name or not label:
            raise ValueError(f"classifier reward spec must be classifier:NAME_OR_PATH:LABEL, got {spec!r}")
        return ClassifierReward.from_pretrained(name, label=int(label) if label.isdigit() else label)
    if kind == "python":
        module, sep, function = rest.partition(":")
        if not sep or not module or not function:
            raise ValueError(f"python reward spec must be python:MODULE:FUNCTION, got {spec!r}")
        return python_reward(spec, module, function)
    folder = Path(spec).expanduser()
    if folder.is_dir():
        return RewardModel.load(folder)
    if "/" in spec or spec.startswith((".", "~")):
        raise FileNotFoundError(f"{spec}: {'a file' if folder.exists() else 'no such folder'}; a reward model "
                                "is a folder written by `rlhfkit reward train`")
    raise ValueError(f"cannot read reward spec {spec!r}: not a reward-model folder, nor judge:NAME, "
                     "classifier:NAME_OR_PATH:LABEL or python:MODULE:FUNCTION")
