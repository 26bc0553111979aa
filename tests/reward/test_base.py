"""The reward contract: one finite float per completion, else an error naming the reward and the sample."""

import numpy as np
import pytest
import torch

from rlhfkit.reward.base import FunctionReward, RewardError, score_completions

PROMPTS = ["how do i fix bike", "plan day", "write code"]
COMPLETIONS = ["happy to help", "go away", "kind regards"]


class TensorReward:
    name = "fixed"

    def __init__(self, value) -> None:
        self.value = value

    def __call__(self, prompts, completions):
        return self.value


def test_a_reward_that_keeps_the_contract_gives_float_scores():
    scores = score_completions(FunctionReward(lambda p, c: len(c.split())), PROMPTS, COMPLETIONS)
    assert scores.dtype == torch.float32 and scores.tolist() == [3.0, 2.0, 2.0]


@pytest.mark.parametrize(("returned", "expected"), [
    (torch.tensor(0.5), r"reward 'fixed' returned a single value for 3 completions.*not broadcast"),
    (torch.ones(3, 1), r"returned a tensor of shape \(3, 1\) for 3 completions"),
    ([0.1, 0.2, 0.3], r"reward 'fixed' returned a list; a reward returns a torch.Tensor"),
    (torch.tensor([0.1, float("nan"), float("inf")]),
     r"reward 'fixed' gave nan for completion 1 of 3 \(prompt 'plan day', completion 'go away'\); 2 of 3 scores"),
])
def test_a_reward_that_breaks_the_contract_is_named_with_the_sample(returned, expected):
    with pytest.raises(RewardError, match=expected):
        score_completions(TensorReward(returned), PROMPTS, COMPLETIONS)


@pytest.mark.parametrize(("fn", "batched", "expected"), [
    (lambda p, c: "0.5", False, r"reward 'f' returned str '0.5' for completion 0 \('happy to help'\); it must return "
                                r"a number"),
    (lambda p, c: [1.0], False, r"reward 'f' returned list '\[1.0\]' for completion 0"),
    (lambda ps, cs: 1.0, True, r"reward 'f' returned a float for a batch of 3; a batched reward returns one float"),
    (lambda ps, cs: "abc", True, r"reward 'f' returned a str for a batch of 3"),
])
def test_a_python_reward_returning_text_or_lists_is_refused(fn, batched, expected):
    with pytest.raises(RewardError, match=expected):
        FunctionReward(fn, batched=batched, name="f")(PROMPTS, COMPLETIONS)


def failing_reward(prompt, completion):
    return {"no such key": 1.0}["score"]


def test_an_exception_in_a_python_reward_names_where_it_was_raised_and_the_sample():
    with pytest.raises(RewardError, match=r"test_base\.py:\d+: reward 'failing_reward' raised KeyError: 'score' "
                                          r"\(scoring completion 0 \('happy to help'\)\)") as err:
        FunctionReward(failing_reward)(PROMPTS, COMPLETIONS)
    assert isinstance(err.value.__cause__, KeyError)


@pytest.mark.parametrize(("fn", "batched"), [
    (lambda ps, cs: np.arange(len(cs), dtype=np.float64), True),
    (lambda p, c: np.float32(PROMPTS.index(p)), False),
    (lambda p, c: np.array([PROMPTS.index(p)]), False),
])
def test_numpy_numbers_and_arrays_are_rewards(fn, batched):
    assert FunctionReward(fn, batched=batched)(PROMPTS, COMPLETIONS).tolist() == [0.0, 1.0, 2.0]


def test_an_integer_too_large_for_a_float_is_refused_by_name():
    with pytest.raises(RewardError, match=r"reward 'f' returned '1000.*' for completion 0 .* too large for a float"):
        FunctionReward(lambda p, c: 10**400, name="f")(PROMPTS, COMPLETIONS)
