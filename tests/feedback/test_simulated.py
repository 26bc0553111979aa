import random

from conftest import make_completions
from rlhfkit.feedback.simulated import SimulatedLabeler, simulate_rankings
from rlhfkit.reward.base import FunctionReward

COMPLETIONS = make_completions("p0", 4)
QUALITY = [0.1, 0.9, 0.5, 0.3]


def test_noiseless_labeler_ranks_by_quality():
    ranking = SimulatedLabeler("a", noise=0.0).rank(COMPLETIONS, QUALITY, random.Random(0), "kindness")
    assert ranking.groups == [["p0-1"], ["p0-2"], ["p0-3"], ["p0-0"]]
    assert ranking.criterion == "kindness"


def test_tie_margin_groups_close_neighbours():
    ranking = SimulatedLabeler("a", noise=0.0, tie_margin=0.25).rank(COMPLETIONS, QUALITY, random.Random(0), "k")
    assert ranking.groups == [["p0-1"], ["p0-2", "p0-3"], ["p0-0"]]


def test_short_completions_are_flagged():
    short = [c.model_copy(update={"text": "ok"}) if c.index == 2 else c for c in COMPLETIONS]
    assert SimulatedLabeler("a", flag_below_words=2).rank(short, QUALITY, random.Random(0), "k").flagged == ["p0-2"]
    assert SimulatedLabeler("a", flag_below_words=0).rank(short, QUALITY, random.Random(0), "k").flagged == []


def test_every_labeler_ranks_every_prompt_and_random_one_disagrees():
    completions = COMPLETIONS + make_completions("p1", 4)
    quality = FunctionReward(lambda p, c: float(c.split()[-1]))  # "answer 3" -> 3.0
    labelers = [SimulatedLabeler("good", noise=0.01), SimulatedLabeler("poor", random_order=True)]
    rankings = simulate_rankings(completions, quality, labelers, "k", seed=1)
    assert sorted((r.labeler_id, r.prompt_id) for r in rankings) == [
        ("good", "p0"), ("good", "p1"), ("poor", "p0"), ("poor", "p1")]
    good = [r for r in rankings if r.labeler_id == "good"]
    assert all(r.groups == [[f"{r.prompt_id}-{i}"] for i in (3, 2, 1, 0)] for r in good)
    assert simulate_rankings(completions, quality, labelers, "k", seed=1) == rankings  # reproducible
