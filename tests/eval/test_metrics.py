import random

import pytest

from rlhfkit.eval.metrics import (
    distinct_n,
    jackknife_interval,
    mean_words,
    paired_comparison,
    repetition,
    template_share,
)


def test_interval_excludes_zero_for_a_clear_improvement_only():
    before = {f"p{i}": [0.1 * (i % 3), 0.2] for i in range(20)}
    better = {p: [s + 0.5 + 0.01 * (i % 2) for s in scores] for i, (p, scores) in enumerate(before.items())}
    result = paired_comparison(before, better)
    assert result.difference == pytest.approx(0.505) and result.ci_low > 0.49
    assert result.significant and result.prompts == 20 and result.samples == 40 and result.win_rate == 1.0
    assert result.verdict == "improved"
    few = paired_comparison({p: before[p] for p in list(before)[:4]}, {p: better[p] for p in list(before)[:4]})
    assert few.verdict == "improved (only 4 prompts: unreliable)"
    # 20 prompts asked about 5 topics are 5 independent observations, not 20
    topics = {p: f"topic{i % 5}" for i, p in enumerate(before)}
    assert paired_comparison(before, better, topics).verdict == "improved (only 5 groups of prompts: unreliable)"
    assert paired_comparison(before, better, {p: f"topic{i % 10}" for i, p in enumerate(before)}).verdict == "improved"

    noisy = {p: [s + (0.3 if i % 2 else -0.3) for s in scores] for i, (p, scores) in enumerate(before.items())}
    result = paired_comparison(before, noisy)
    assert result.ci_low < 0 < result.ci_high and not result.significant and result.verdict == "no clear change"
    assert result.win_rate == 0.5


def test_verdict_follows_the_judges_direction():
    before = {f"p{i}": [1.0 + 0.1 * (i % 3)] for i in range(12)}
    lower = {p: [s[0] - 0.5] for p, s in before.items()}
    assert paired_comparison(before, lower, higher_is_better=False).verdict == "improved"
    assert paired_comparison(before, lower, higher_is_better=False).win_rate == 1.0
    assert paired_comparison(before, lower).verdict == "worse"


def simulated_coverage(prompts: int, trials: int = 2000, effect: float = 0.3, seed: int = 0) -> float:
    """Share of trials whose 95% interval holds the true effect, for prompts asked in pairs (a topic
    effect shared by both prompts of a pair) with 4 noisy samples per prompt and side."""
    rng = random.Random(seed)
    clusters = {f"p{i}": f"topic{i // 2}" for i in range(prompts)}
    covered = 0
    for _ in range(trials):
        topic = {c: rng.gauss(0, 0.3) for c in set(clusters.values())}
        before, after = {}, {}
        for p, c in clusters.items():
            base = rng.gauss(0, 0.5)
            before[p] = [base + rng.gauss(0, 0.4) for _ in range(4)]
            after[p] = [base + effect + topic[c] + rng.gauss(0, 0.4) for _ in range(4)]
        result = paired_comparison(before, after, clusters)
        covered += result.ci_low <= effect <= result.ci_high
    return covered / trials


@pytest.mark.parametrize("prompts", [12, 24])
def test_interval_has_its_nominal_coverage_at_the_sizes_we_run(prompts):
    assert 0.93 <= simulated_coverage(prompts) <= 0.97


def test_clustered_prompts_widen_the_interval_as_they_should():
    clusters = {f"p{i}": f"topic{i // 2}" for i in range(12)}
    # both prompts of a topic move together: 6 independent observations, not 12
    diffs = {f"p{i}": [0.1 * (i // 2) - 0.25] for i in range(12)}
    zeros = {p: [0.0] for p in diffs}
    naive, grouped = paired_comparison(zeros, diffs), paired_comparison(zeros, diffs, clusters)
    assert grouped.clusters == 6 and naive.clusters == 12
    assert grouped.ci_high - grouped.ci_low > naive.ci_high - naive.ci_low


def test_jackknife_of_a_mean_is_the_student_t_interval():
    values = {f"p{i}": v for i, v in enumerate([0.3, -0.1, 0.8, 0.2, 0.5, 0.0])}
    theta, low, high = jackknife_interval(lambda s: sum(values[p] for p in s) / len(s), list(values))
    mean = sum(values.values()) / 6
    sd = (sum((v - mean) ** 2 for v in values.values()) / 5) ** 0.5
    assert theta == pytest.approx(mean) and high - theta == pytest.approx(2.5706 * sd / 6**0.5, rel=1e-4)
    assert theta - low == pytest.approx(high - theta)


def test_comparison_needs_shared_prompts():
    with pytest.raises(ValueError, match="at least 2 prompts"):
        paired_comparison({"a": [1.0]}, {"b": [1.0]})


def test_distinct_n_repetition_template_share_and_length():
    assert distinct_n(["a b c", "a b d"], 1) == pytest.approx(4 / 6)
    assert distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)
    assert distinct_n(["same words here"] * 5, 2) == pytest.approx(2 / 10)
    assert repetition(["a b c a b c"], 3) == pytest.approx(1 - 3 / 4)
    assert repetition(["a b c d"], 3) == 0.0
    assert mean_words(["a b", "c d e f"]) == 3.0
    template = [f"Great question! For {t} start small and practice a little every day."
                for t in ("baking bread,", "fixing a bike,", "washing a car,")]
    varied = ["Knead the dough well.", "Check the tyre pressure first.", "Use a soft sponge.",
              "Practice scales slowly."]
    assert template_share([*template, *varied]) == pytest.approx(3 / 7)
    assert template_share(varied) == pytest.approx(1 / 4)
