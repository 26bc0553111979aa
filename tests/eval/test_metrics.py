import pytest

from rlhfkit.eval.metrics import distinct_n, mean_words, paired_bootstrap, repetition


def test_bootstrap_interval_excludes_zero_for_a_clear_improvement_only():
    before = {f"p{i}": [0.1 * (i % 3), 0.2] for i in range(20)}
    better = {p: [s + 0.5 for s in scores] for p, scores in before.items()}
    result = paired_bootstrap(before, better)
    assert result.difference == pytest.approx(0.5) and result.ci_low == pytest.approx(0.5)
    assert result.significant and result.prompts == 20 and result.samples == 40
    assert result.verdict == "improved"
    few = paired_bootstrap({p: before[p] for p in list(before)[:4]}, {p: better[p] for p in list(before)[:4]})
    assert few.verdict == "improved (only 4 prompts: unreliable)"

    noisy = {p: [s + (0.3 if i % 2 else -0.3) for s in scores] for i, (p, scores) in enumerate(before.items())}
    result = paired_bootstrap(before, noisy)
    assert result.ci_low < 0 < result.ci_high and not result.significant and result.verdict == "no clear change"


def test_bootstrap_interval_covers_the_mean_difference_and_narrows_with_more_prompts():
    import random

    rng = random.Random(0)

    def draw(n):
        before = {f"p{i}": [rng.gauss(0, 1)] for i in range(n)}
        return before, {p: [s[0] + 0.2 + rng.gauss(0, 1)] for p, s in before.items()}

    small, large = paired_bootstrap(*draw(20)), paired_bootstrap(*draw(400))
    assert small.ci_low < small.difference < small.ci_high
    assert large.ci_high - large.ci_low < (small.ci_high - small.ci_low) / 2
    assert large.ci_low < 0.2 < large.ci_high


def test_bootstrap_needs_shared_prompts():
    with pytest.raises(ValueError, match="at least 2 prompts"):
        paired_bootstrap({"a": [1.0]}, {"b": [1.0]})


def test_distinct_n_repetition_and_length():
    assert distinct_n(["a b c", "a b d"], 1) == pytest.approx(4 / 6)
    assert distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)
    assert distinct_n(["same words here"] * 5, 2) == pytest.approx(2 / 10)
    assert repetition(["a b c a b c"], 3) == pytest.approx(1 - 3 / 4)
    assert repetition(["a b c d"], 3) == 0.0
    assert mean_words(["a b", "c d e f"]) == 3.0
