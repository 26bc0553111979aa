import math

import pytest

from conftest import make_completions
from rlhfkit.data.pairs import borda, ranked_pairs
from rlhfkit.data.records import Ranking
from rlhfkit.feedback.agreement import (
    agreement,
    kendall_tau_b,
    kendall_w,
    krippendorff_alpha_ordinal,
    pairwise_agreement,
    positions,
)
from rlhfkit.feedback.simulated import SimulatedLabeler, simulate_rankings
from rlhfkit.reward.base import FunctionReward


def ranking(order, labeler, prompt="p0"):
    """order: a string like 'ab|c|d' or 'a|bc|d' (| separates groups)."""
    return Ranking(prompt_id=prompt, labeler_id=labeler, groups=[list(g) for g in order.split("|")])


def test_positions_give_tied_completions_their_mean_rank():
    assert positions(ranking("a|bc|d", "x")) == {"a": 1, "b": 2.5, "c": 2.5, "d": 4}


def test_perfect_agreement_gives_one_everywhere():
    rankings = [ranking(order, labeler, prompt) for prompt, order in [("p0", "a|b|c|d"), ("p1", "c|a|d|b")]
                for labeler in ("x", "y", "z")]
    result = agreement(rankings, borda)
    assert result.pairwise_agreement == 1.0
    assert result.krippendorff_alpha == pytest.approx(1.0)
    assert result.mean_kendall_w == pytest.approx(1.0)
    assert result.kendall_w_per_item == pytest.approx({"p0": 1.0, "p1": 1.0})
    assert all(s.tau == pytest.approx(1.0) and not s.poor for s in result.per_labeler)


def test_kendall_w_hand_computed():
    # rank sums a 4, b 6, c 8, d 12; mean 7.5; S = 35; W = 12·35 / (3²·(4³−4)) = 0.7778
    item = [ranking("a|b|c|d", "x"), ranking("a|c|b|d", "y"), ranking("b|a|c|d", "z")]
    assert kendall_w(item) == pytest.approx(420 / 540)
    assert kendall_w([ranking("a|b|c", "x"), ranking("c|b|a", "y")]) == pytest.approx(0.0)


def test_kendall_w_tie_correction():
    # x: a 1, b 2.5, c 2.5; y: a 1, b 2, c 3 → sums 2, 4.5, 5.5, mean 4, S = 4 + 0.25 + 2.25 = 6.5
    # T = 2³ − 2 = 6; W = 12·6.5 / (4·24 − 2·6) = 78 / 84
    assert kendall_w([ranking("a|bc", "x"), ranking("a|b|c", "y")]) == pytest.approx(78 / 84)


def test_krippendorff_alpha_hand_computed_disagreement():
    # one item, two completions, two labelers who disagree: o_12 = o_21 = 2, n_1 = n_2 = 2, n = 4,
    # δ²_12 = (4 − 2)² = 4; D_o = 16/4 = 4, D_e = 2·(2·2·4)/(4·3) = 8/3, α = 1 − 4/(8/3) = −0.5
    assert krippendorff_alpha_ordinal([ranking("a|b", "x"), ranking("b|a", "y")]) == pytest.approx(-0.5)


def test_krippendorff_alpha_three_positions_hand_computed():
    # x: a1 b2 c3; y: a1 b3 c2. Units: a (1,1), b (2,3), c (3,2); coincidences o_11 = 2, o_23 = o_32 = 2,
    # n_1 = 2, n_2 = 2, n_3 = 2, n = 6. Ordinal δ²: 1–2: (2+2−2)² = 4, 2–3: 4, 1–3: (6 − 2)² = 16.
    # only o_23 and o_32 are disagreements: D_o = (2·4 + 2·4)/6 = 8/3
    # D_e = Σ_c≠k n_c n_k δ² / (6·5) = 2·(4·4 + 4·4 + 4·16)/30 = 2·96/30 = 6.4; α = 1 − (8/3)/6.4 = 7/12
    alpha = krippendorff_alpha_ordinal([ranking("a|b|c", "x"), ranking("a|c|b", "y")])
    assert alpha == pytest.approx(7 / 12)


def test_pairwise_agreement_and_tau():
    # x and y agree on a>b, a>c, disagree on b vs c: 2 of 3
    assert pairwise_agreement([ranking("a|b|c", "x"), ranking("a|c|b", "y")]) == pytest.approx(2 / 3)
    x, y = positions(ranking("a|b|c|d", "x")), positions(ranking("d|c|b|a", "y"))
    assert kendall_tau_b(x, x) == 1.0 and kendall_tau_b(x, y) == -1.0
    assert math.isnan(pairwise_agreement([ranking("a|b", "x")]))


def test_random_labeler_gets_low_tau_and_is_flagged():
    completions = [c for p in range(30) for c in make_completions(f"p{p}", 4)]
    quality = FunctionReward(lambda p, c: float(c.split()[-1]))
    labelers = [SimulatedLabeler("good1", noise=0.3), SimulatedLabeler("good2", noise=0.5),
                SimulatedLabeler("good3", noise=0.5), SimulatedLabeler("random", random_order=True)]
    rankings = simulate_rankings(completions, quality, labelers, "k", seed=1)
    result = agreement(rankings, borda)
    taus = {s.labeler_id: s.tau for s in result.per_labeler}
    assert taus["random"] < 0.2 < 0.6 < min(taus["good1"], taus["good2"], taus["good3"])
    assert result.poor_labelers == ["random"]
    assert 0.3 < result.krippendorff_alpha < 0.95
    assert len(result.kendall_w_per_item) == 30
    lowest = result.least_agreed(3)
    assert [w for _, w in lowest] == sorted(result.kendall_w_per_item.values())[:3]


def test_gold_items_measure_accuracy_and_flag_careless_labelers():
    gold = {"g": ranking("a|b|c", "answer", "g")}
    rankings = [ranking("a|b|c", "x", "g"), ranking("c|b|a", "y", "g"),
                ranking("a|b|c", "x"), ranking("a|b|c", "y")]
    stats = {s.labeler_id: s for s in agreement(rankings, borda, gold=gold).per_labeler}
    assert stats["x"].gold_accuracy == 1.0 and not stats["x"].poor
    assert stats["y"].gold_accuracy == 0.0 and stats["y"].poor and "gold" in stats["y"].reason


def test_ranked_pairs_majority_order_and_cycle_breaking():
    # a Condorcet cycle a>b, b>c, c>a, each by 2 votes to 1: a>b and b>c are locked (in the fixed
    # order of equal margins), c>a would close the cycle and is skipped
    votes = [ranking("a|b|c", "x"), ranking("b|c|a", "y"), ranking("c|a|b", "z")]
    assert ranked_pairs(votes).groups == [["a"], ["b"], ["c"]]
    # a clear majority winner
    votes = [ranking("b|a|c", "x"), ranking("b|c|a", "y"), ranking("a|b|c", "z")]
    assert ranked_pairs(votes).groups == [["b"], ["a"], ["c"]]
    # no majority between a and b: a tie group
    assert ranked_pairs([ranking("a|b|c", "x"), ranking("b|a|c", "y")]).groups == [["a", "b"], ["c"]]
    assert ranked_pairs(votes).labeler_id == "consensus:ranked_pairs"


def test_a_labeler_who_ties_everything_is_flagged_as_poor():
    rankings = [r for p in ("p0", "p1", "p2") for r in (ranking("a|b|c|d", "x", p), ranking("a|b|d|c", "y", p),
                                                         ranking("abcd", "tie", p))]
    stats = {s.labeler_id: s for s in agreement(rankings, borda).per_labeler}
    assert math.isnan(stats["tie"].tau) and stats["tie"].poor and "ties every completion" in stats["tie"].reason
    assert not stats["x"].poor and not stats["y"].poor
