from rlhfkit.demo.seeds import accuracy_interval, honest_criteria, pooled_verdict
from rlhfkit.eval.metrics import Comparison


def comparison(difference, low, high, higher_is_better=True):
    return Comparison(before=0.0, after=difference, difference=difference, ci_low=low, ci_high=high, prompts=24,
                      clusters=12, samples=96, win_rate=0.5, win_low=0.3, win_high=0.7,
                      higher_is_better=higher_is_better)


def test_improved_only_when_every_seed_agrees_and_the_pooled_interval_excludes_zero():
    pooled = comparison(0.3, 0.1, 0.5)
    seeds = [comparison(0.4, 0.1, 0.7), comparison(0.2, -0.1, 0.5), comparison(0.3, 0.0, 0.6)]
    assert pooled_verdict(seeds, pooled) == "improved"
    one_against = [*seeds[:2], comparison(-0.05, -0.3, 0.2)]
    assert pooled_verdict(one_against, pooled) == "seeds disagree"
    assert pooled_verdict(seeds, comparison(0.3, -0.01, 0.6)) == "no clear change"


def test_verdict_follows_the_direction_of_the_measure():
    lower_is_better = [comparison(-0.5, -0.8, -0.2, higher_is_better=False)] * 3
    assert pooled_verdict(lower_is_better, comparison(-0.5, -0.7, -0.3, higher_is_better=False)) == "improved"


def test_reward_model_accuracy_interval_narrows_with_more_pairs():
    low_few, high_few = accuracy_interval(0.8, 20)
    low_many, high_many = accuracy_interval(0.8, 500)
    assert low_few < low_many < 0.8 < high_many < high_few


def test_too_few_prompts_are_never_called_improved():
    """With 4 held-out prompts on 2 topics the verdict keeps "unreliable": the demo's bar ("improved") fails."""
    few = [Comparison(before=0.0, after=0.3, difference=0.3, ci_low=0.1, ci_high=0.5, prompts=4, clusters=2,
                      samples=16, win_rate=1.0, win_low=1.0, win_high=1.0)] * 2
    assert pooled_verdict(few[:1], few[1]) == "improved (only 2 groups of prompts: unreliable)"
    assert not honest_criteria({"relevance": few[0], "distinct_2": few[0]}, {"gold": pooled_verdict(few, few[0])},
                               [])["gold improved"]


def test_a_seed_that_loses_relevance_or_diversity_fails_the_bar_even_when_the_pooled_result_passes():
    fine = {"relevance": comparison(0.0, -0.05, 0.05), "distinct_2": comparison(0.0, -0.01, 0.01)}
    fine["distinct_2"].before, fine["distinct_2"].after = 0.2, 0.2
    worse_relevance = {**fine, "relevance": comparison(-0.1, -0.15, -0.05)}
    less_diverse = {**fine, "distinct_2": comparison(-0.03, -0.05, -0.01)}
    less_diverse["distinct_2"].before, less_diverse["distinct_2"].after = 0.2, 0.17
    criteria = honest_criteria(fine, {"gold": "improved"}, [fine, fine])
    assert all(criteria.values())
    assert list(honest_criteria(fine, {"gold": "improved"}, [fine, worse_relevance]).values()) == [True, False, True]
    assert list(honest_criteria(fine, {"gold": "improved"}, [fine, less_diverse]).values()) == [True, True, False]
    nan = {**fine, "relevance": comparison(float("nan"), float("nan"), float("nan"))}
    assert not honest_criteria(nan, {"gold": "improved"}, [])["relevance not worse (pooled, every seed)"]
