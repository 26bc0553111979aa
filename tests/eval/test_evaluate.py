"""`evaluate_policy` reuses an earlier file only when policy, reference, judges and settings match."""

import torch

from conftest import build_tiny_causal, make_prompts, word_tokenizer
from rlhfkit.eval.evaluate import EvalConfig, compare, evaluate_policy, fingerprint_path, judge_identity
from rlhfkit.reward.base import FunctionReward

LENGTH = FunctionReward(lambda p, c: len(c.split()), name="length")
KIND = FunctionReward(lambda p, c: float("kind" in c), name="kind")
CONFIG = EvalConfig(samples=2, seeds=(0,), max_new_tokens=4, use_chat_template=False)


def test_an_evaluation_is_reused_only_with_the_same_policy_judges_and_settings(tmp_path):
    prompts, tokenizer, out = make_prompts(3), word_tokenizer(), tmp_path / "before.jsonl"
    policy = build_tiny_causal()
    first = evaluate_policy(policy, tokenizer, prompts, {"length": LENGTH}, CONFIG, output=out, progress=False)
    assert fingerprint_path(out).exists()
    stamp = out.stat().st_mtime_ns
    again = evaluate_policy(policy, tokenizer, prompts, {"length": LENGTH}, CONFIG, output=out, progress=False)
    assert out.stat().st_mtime_ns == stamp and [c.text for c in again] == [c.text for c in first]

    # another policy in the same folder (was: the earlier policy's numbers, silently)
    with torch.no_grad():
        other = build_tiny_causal()
        for p in other.parameters():
            p.add_(0.5)
    changed = evaluate_policy(other, tokenizer, prompts, {"length": LENGTH}, CONFIG, output=out, progress=False)
    assert out.stat().st_mtime_ns != stamp and [c.text for c in changed] != [c.text for c in first]

    # a new judge in the same folder (was: KeyError)
    judged = evaluate_policy(other, tokenizer, prompts, {"length": LENGTH, "kind": KIND}, CONFIG, output=out,
                             progress=False)
    assert all("kind" in c.scores for c in judged)
    assert compare(judged, judged, "kind").difference == 0.0

    # other settings
    longer = evaluate_policy(other, tokenizer, prompts, {"length": LENGTH, "kind": KIND},
                             EvalConfig(samples=3, seeds=(0,), max_new_tokens=4, use_chat_template=False),
                             output=out, progress=False)
    assert len(longer) == 3 * 3


def test_comparing_on_a_score_the_evaluation_lacks_says_so(tmp_path):
    import pytest

    done = evaluate_policy(build_tiny_causal(), word_tokenizer(), make_prompts(3), {"length": LENGTH}, CONFIG,
                           progress=False)
    with pytest.raises(ValueError, match="no 'kind' score"):
        compare(done, done, "kind")


def test_judges_of_one_kind_and_name_differ_by_their_weights_settings_and_code():
    """Two reward-model folders both answer to "reward_model": their scores must not be reused for each other."""
    class Scorer:
        def __init__(self, shift: float) -> None:
            self.name, self.shift, self.model = "reward_model", 0.0, torch.nn.Linear(2, 1, bias=False)
            with torch.no_grad():
                self.model.weight.fill_(shift)

    assert judge_identity("rm", Scorer(1.0)) == judge_identity("rm", Scorer(1.0))
    assert judge_identity("rm", Scorer(1.0)) != judge_identity("rm", Scorer(2.0))
    shifted = Scorer(1.0)
    shifted.shift = 0.5
    assert judge_identity("rm", shifted) != judge_identity("rm", Scorer(1.0))
    words = FunctionReward(lambda p, c: len(c.split()), name="length")
    assert judge_identity("length", words) == judge_identity("length", LENGTH)
    assert judge_identity("length", FunctionReward(lambda p, c: len(c), name="length")) != judge_identity(
        "length", LENGTH)
