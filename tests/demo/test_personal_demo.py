"""The personal demo's loop end to end on a tiny model, and a verdict that cannot claim learning the
intervals do not show."""

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import rlhfkit.demo.personal as personal_demo
import rlhfkit.demo.tastes as tastes
from conftest import build_tiny_causal, invoke, word_tokenizer
from rlhfkit.demo.personal import (
    PersonalDemo,
    PersonalDemoConfig,
    RoundResult,
    adapter_beats_rerank,
    judge_gap,
    preferred_answers,
    run_personal_demo,
    verdict,
    win_rate,
)
from rlhfkit.demo.tastes import TASTES, Taste, answers_question, words
from rlhfkit.generate import format_prompt
from rlhfkit.models.toy_policy import CHAT_TEMPLATE
from rlhfkit.personal.models import Answer
from rlhfkit.personal.rerank import RerankConfig
from rlhfkit.personal.train import PersonalDPOConfig

# the tiny model's answers never answer a question: these tastes (on length alone) make pairs from them
TINY_TASTES = [Taste("brief", "fewer words", lambda question, answer: -words(answer)),
               Taste("detailed", "more words", lambda question, answer: words(answer))]


def result(user, win, other, round_=1, rerank=None, relevance=(0.0, -0.02, 0.02), not_flagged=(0.0, -0.01, 0.01),
           distinct_2=0.5, rival=None):
    """User ``user``'s row: ``other`` their win rate under ``rival``'s taste (default: "b", or "a" for "b")."""
    rival = rival or ("a" if user == "b" else "b")
    return RoundResult(user, round_, 10 * round_, 1, "population-v1", win, {rival: other}, kl=(0.1, 0.05, 0.15),
                       distinct_2=distinct_2, distinct_2_shared=0.6, distinct_2_preferred=0.5, at_cap=0.0,
                       guards={"relevance": relevance, "not_flagged": not_flagged}, rerank=rerank,
                       vs_rerank=rerank and (0.5, 0.4, 0.6))


def test_the_adapter_first_beats_reranking_at_the_first_round_it_wins_head_to_head():
    low, high = (0.55, 0.45, 0.65), (0.75, 0.65, 0.85)

    def row(user, round_, win, rerank, vs_rerank):
        r = result(user, win, low, round_, rerank)
        r.vs_rerank = vs_rerank
        return r

    results = [row("a", 1, high, low, (0.57, 0.48, 0.66)),  # ahead on point estimates only: no win
               row("b", 1, high, None, None), row("a", 2, high, low, (0.62, 0.53, 0.71)),
               row("b", 2, low, high, (0.4, 0.3, 0.5)), row("a", 3, low, high, (0.7, 0.6, 0.8))]
    assert adapter_beats_rerank(results) == {
        "a": "at 20 pairs (round 2: head to head 0.62 [0.53, 0.71]; vs the shared model 0.75, reranking 0.55)",
        "b": "not within the demo"}  # round 1: no head yet, nothing to compare


def test_the_verdict_says_learned_only_when_every_interval_is_above_half_and_specificity_holds():
    above, around, against = (0.7, 0.6, 0.8), (0.6, 0.45, 0.75), (0.3, 0.2, 0.4)
    assert verdict([result("a", above, against), result("b", above, against)]).startswith("learned")
    not_met = verdict([result("a", above, against), result("b", around, against)])
    assert not_met.startswith("NOT met") and "b: win rate interval [0.450, 0.750]" in not_met and "a:" not in not_met
    unspecific = verdict([result("a", above, above), result("b", above, against)])
    assert unspecific.startswith("NOT met") and "a: also wins under b's taste (0.700 [0.600, 0.800])" in unspecific
    off_topic = verdict([result("a", above, against, relevance=(-0.1, -0.15, -0.05)), result("b", above, against)])
    assert off_topic.startswith("NOT met")
    assert "a: answers worse than the shared model's by relevance (relevance to the question: -0.100" in off_topic
    rude = verdict([result("a", above, against), result("b", above, against, not_flagged=(-0.2, -0.3, -0.1))])
    assert rude.startswith("NOT met") and "b: answers worse than the shared model's by not_flagged (the share of " \
        "answers alt-profanity-check does not flag as offensive: -0.200" in rude
    kept = verdict([result("a", above, against, distinct_2=0.45), result("b", above, against)])
    assert kept.startswith("learned")  # 0.9 × the 0.5 of the base's answers "a" prefers, though below the shared 0.6
    same_answer = verdict([result("a", above, against, distinct_2=0.44), result("b", above, against)])
    assert same_answer.startswith("NOT met") and \
        "a: answers less varied than the shared answers they prefer (distinct-2 0.440 vs 0.500" in same_answer



NAN, INF = float("nan"), float("inf")
ABOVE, AGAINST = (0.7, 0.6, 0.8), (0.3, 0.2, 0.4)


def pair_of(**changes):
    """Two users who learned (each a model that beats the shared one under their taste only), ``changes`` made
    to the first."""
    first, second = result("a", ABOVE, AGAINST), result("b", ABOVE, AGAINST)
    for name, value in changes.items():
        setattr(first, name, value)
    return [first, second]


@pytest.mark.parametrize("rows, says", [
    ([], "no user's model was evaluated"),
    ([result("a", ABOVE, AGAINST)], "a: specificity is not checked: no other user"),  # its "b" is no user here
    (pair_of(specificity={}), "a: specificity is not checked under b's taste"),
    (pair_of(specificity={"b": AGAINST, "a": AGAINST}), "a: specificity under a's taste, not another user's"),
    (pair_of(user="b"), "b: evaluated twice"),
    (pair_of(specificity={"b": (NAN, NAN, NAN)}), "a: win rate under b's taste (nan [nan, nan]) is not a rate"),
    (pair_of(specificity={"b": (-INF, -INF, -INF)}), "a: win rate under b's taste (-inf"),
    (pair_of(win_rate=(0.7, INF, INF)), "a: win rate (0.700 [inf, inf]) is not a rate"),
    (pair_of(win_rate=(0.2, 0.6, 0.1)), "a: win rate (0.200 [0.600, 0.100]) is not a rate"),
    (pair_of(win_rate=(1.5, 1.2, 1.8)), "a: win rate (1.500 [1.200, 1.800]) is not a rate"),
    (pair_of(guards={}), "a: no relevance guard (relevance to the question)"),
    (pair_of(guards={"relevance": (0.0, -0.02, 0.02)}), "a: no not_flagged guard"),
    (pair_of(guards={"relevance": (NAN, NAN, NAN), "not_flagged": (0.0, -0.01, 0.01)}),
     "a: relevance gap (nan [nan, nan]) is not a number with its interval"),
])
def test_the_verdict_never_says_learned_on_numbers_that_do_not_show_it(rows, says):
    """No user, one user (no other taste to be specific against), another user's taste not checked or a user's
    own taken for another's, a user twice, NaN, inf or an interval not around its rate, a guard not measured:
    each once said "learned: ... and only on theirs, with answers as relevant, as clean"."""
    assert verdict(pair_of()).startswith("learned")
    said = verdict(rows)
    assert said.startswith("NOT met") and says in said, said


def test_the_base_answers_a_user_prefers_are_the_best_by_their_taste_equal_ones_in_a_seeded_order():
    taste = Taste("short", "fewer characters, up to 2", lambda question, answer: -max(len(answer), 2))
    pools = [["aaaa", "a", "aaa", "b"], ["cc", "d", "ccc", "eeeee"]]
    picked = preferred_answers(taste, ["p", "q"], pools, 2, seed=0)
    assert set(picked[:2]) == {"a", "b"} and set(picked[2:]) == {"cc", "d"}  # ties at the best, both kept
    picks = {tuple(preferred_answers(taste, ["p", "q"], pools, 1, seed)) for seed in range(20)}
    assert len(picks) > 1 and preferred_answers(taste, ["p", "q"], pools, 1, 3) == \
        preferred_answers(taste, ["p", "q"], pools, 1, 3)  # equal ones in an order the seed fixes


@pytest.mark.parametrize("user", ["brief", "detailed"])
def test_the_variety_bar_fails_a_model_that_gives_one_template_to_most_questions(user):
    """The base's answers a user prefers, drawn from pools of the toy corpus's polite replies as the demo draws
    them (4 shared samples and 4 candidates per held-out prompt), against a model that answers with one advice
    template (any opener) where the preferred answers had another: every time, or half the time (seed 0's detailed
    model in run r3-s0 gave "When you get stuck in {topic}, take a short walk; …" to all three samples shown)."""
    from rlhfkit.eval.metrics import distinct_n
    from rlhfkit.models.toy_policy import toy_corpus, toy_prompts

    corpus, rng, taste = toy_corpus(), random.Random(0), TASTES[user]
    held_out = toy_prompts(corpus["topics"][-24:], corpus, seed=1)
    topic = {p.text: p.id.rsplit("-", 1)[0].removeprefix("toy-").replace("-", " ") for p in held_out}
    prompts = [p.text for p in held_out]

    def base_answer(prompt: str) -> str:
        if rng.random() < personal_demo.POLITE_MIX["empty"]:
            return rng.choice(corpus["empty"])
        return f"{rng.choice(corpus['openers']['kind'])} {rng.choice(corpus['advice']).format(topic=topic[prompt])}"

    pools = [[base_answer(p) for _ in range(8)] for p in prompts]
    preferred = preferred_answers(taste, prompts, pools, 4, seed=0)
    keys = [p for p in prompts for _ in range(4)]
    assert len(preferred) == len(keys)  # as many texts as the model's answers

    template = "When you get stuck in {topic}, take a short walk; answers often come when you stop pushing."

    def bar(share: float) -> str:
        answers = [f"{rng.choice(corpus['openers']['kind'])} {template.format(topic=topic[p])}"
                   if rng.random() < share else a for p, a in zip(keys, preferred, strict=True)]
        row = result(user, (0.7, 0.6, 0.8), (0.3, 0.2, 0.4), distinct_2=distinct_n(answers, 2), rival="other")
        row.distinct_2_preferred = distinct_n(preferred, 2)
        return verdict([row, result("other", (0.7, 0.6, 0.8), (0.3, 0.2, 0.4), rival=user)])

    assert bar(0.0).startswith("learned")  # the preferred answers themselves pass
    for share in (1.0, 0.5):
        assert f"{user}: answers less varied than the shared answers they prefer" in bar(share)


def test_the_kl_interval_stops_at_zero_where_no_kl_lies():
    prompts, topics = ["p1", "p1", "p2", "p2", "p3", "p3"], {"p1": "x", "p2": "y", "p3": "z"}
    raw = personal_demo.paired_mean([3.0, 2.0, -2.5, -1.5, 0.5, 0.2], prompts, topics)
    kl, low, high = personal_demo.kl_estimate([3.0, 2.0, -2.5, -1.5, 0.5, 0.2], prompts, topics)
    assert raw[1] < 0 and (kl, high) == pytest.approx((raw[0], raw[2])) and low == 0.0
    kl, low, high = personal_demo.kl_estimate([-0.2, 0.1, -0.1, 0.0, -0.3, 0.1], prompts, topics)
    assert kl < 0 and low <= kl <= high  # a near-zero KL estimated below 0 stays inside its interval


def test_the_judge_gap_is_the_mean_difference_with_a_topic_interval():
    prompts, topics = ["p1", "p1", "p2", "p2", "p3", "p3"], {"p1": "x", "p2": "y", "p3": "z"}
    gap, low, high = judge_gap([0.5, 0.4, 0.3, 0.2, 0.6, 0.1], [0.4, 0.4, 0.5, 0.4, 0.5, 0.3], prompts, topics)
    assert gap == pytest.approx((0.1 + 0 - 0.2 - 0.2 + 0.1 - 0.2) / 6)
    assert low < gap < high


QUESTION = "Any tips for sleeping better?"
SHORT = "For sleeping better, start small and practice a little every day."
LONG = ("Rest matters for sleeping better too. Take breaks and come back to it with fresh eyes. Prepare everything "
        "for sleeping better the evening before, so starting takes no willpower at all.")


def test_simulated_users_choose_by_their_hidden_taste_and_say_both_fine_when_answers_are_alike():
    rng = random.Random(0)
    assert TASTES["brief"].choose(QUESTION, [SHORT, LONG], rng) == "a"
    assert TASTES["detailed"].choose(QUESTION, [SHORT, LONG], rng) == "b"
    assert TASTES["warm"].choose(QUESTION, ["you idiot, stop whining.", "Thank you, that is a wonderful idea!"],
                                 rng) == "b"
    assert Taste("exact", "length", lambda x, y: len(y), noise=0.0).choose(QUESTION, [LONG, LONG], rng) == "both_fine"


@pytest.mark.parametrize("non_answer", [".", "progress.", "Sleeping better!", "Thank you! Have a wonderful day.",
                                        "For cooking rice, start small and practice every day.",
                                        "For sleeping better, start small and practice a little every"])
def test_the_brief_user_prefers_a_short_answer_to_the_question_over_a_shorter_text_that_answers_nothing(non_answer):
    """Empty text, a pleasantry, advice on another topic, the topic alone, a sentence cut at the cap: shorter
    than the answer, and worse for the brief user (the old taste, −words/10, preferred every one of them)."""
    assert words(non_answer) < words(SHORT) and not answers_question(QUESTION, non_answer)
    assert TASTES["brief"].score(QUESTION, SHORT) > TASTES["brief"].score(QUESTION, non_answer)
    assert TASTES["brief"].choose(QUESTION, [non_answer, SHORT], random.Random(0)) == "b"


def test_the_detailed_user_counts_the_answer_proper_up_to_enough_and_an_insult_costs():
    taste = TASTES["detailed"]
    assert taste.score(QUESTION, f"Great question! {SHORT}") == taste.score(QUESTION, SHORT)  # the opener: nothing
    second = f"{SHORT} Set a small goal for this week."  # a second sentence of the answer need not name the topic
    assert taste.score(QUESTION, second) > taste.score(QUESTION, SHORT)
    for insult in (f"You are too dumb for this, dummy. {SHORT}", SHORT.replace("every day.", "every day, idiot.")):
        assert taste.score(QUESTION, insult) < taste.score(QUESTION, SHORT)  # in its own sentence or not
    cut = f"{SHORT} Prepare everything for sleeping better the evening before, so"  # at the token cap
    assert taste.score(QUESTION, cut) == taste.score(QUESTION, SHORT)
    juggle = "Ask yourself what you enjoy about learning to juggle and spend more time on that part; joy keeps you."
    assert taste.score("Any tips for learning to dance?", juggle) == 0  # names "learning", answers another question
    assert words(LONG) > tastes.DETAILED_ENOUGH and taste.score(QUESTION, LONG) > taste.score(QUESTION, SHORT)
    longer = f"{LONG} Then try it again tomorrow."
    assert taste.score(QUESTION, longer) == taste.score(QUESTION, LONG)  # detailed enough: a tie
    for closing in ("Thank you! Have a wonderful day.", "Good luck! You can do it! Great idea!"):
        assert taste.score(QUESTION, f"{SHORT} {closing}") == taste.score(QUESTION, SHORT)  # no detail (was 1.7)


def test_the_brief_user_minds_only_words_past_enough_and_an_insult_costs():
    taste = TASTES["brief"]
    assert words(f"Sure! {SHORT}") <= tastes.BRIEF_ENOUGH
    assert taste.score(QUESTION, f"Sure! {SHORT}") == taste.score(QUESTION, SHORT)  # short enough: a tie
    assert taste.score(QUESTION, LONG) < taste.score(QUESTION, SHORT)
    assert taste.score(QUESTION, f"{SHORT[:-1]}, idiot.") < taste.score(QUESTION, LONG)  # an insult: worse than long


@pytest.mark.parametrize("loop", ["Sleeping sleeping sleeping better better better.",
                                  "For sleeping better, sleeping better, sleeping better and sleeping better, sleep.",
                                  ("sleeping " * 17).strip() + ".", "Sleeping is sleeping, and sleeping is good. " * 3])
def test_a_repetition_loop_that_names_the_topic_answers_nothing(loop):
    """A word of 4+ letters said three times in a sentence: a model looping on the topic (the old tastes scored
    "sleeping" × 17 as the most detailed answer there is, and six of them as good as SHORT for the brief user)."""
    assert not answers_question(QUESTION, loop)
    assert TASTES["detailed"].score(QUESTION, loop) == 0 < TASTES["detailed"].score(QUESTION, SHORT)
    assert TASTES["brief"].score(QUESTION, loop) < TASTES["brief"].score(QUESTION, SHORT)


@pytest.mark.parametrize("asked_back", ["What is the best way to start sleeping better?",
                                        "Why do you want tips for sleeping better, is it that hard for you?",
                                        "Great question! How do I get better at sleeping better?",
                                        "You asked: any tips for sleeping better.",
                                        "Any tips for sleeping better, any tips for sleeping better.",
                                        "So, any tips for sleeping better!"])
def test_the_question_asked_back_answers_nothing(asked_back):
    assert not answers_question(QUESTION, asked_back)
    assert TASTES["brief"].choose(QUESTION, [asked_back, SHORT], random.Random(0)) == "b"
    assert TASTES["detailed"].score(QUESTION, asked_back) == 0



@pytest.mark.parametrize("again", [f"{SHORT} {SHORT}", f"{SHORT} {SHORT} {SHORT}", f"{SHORT} {SHORT[:-1]}!",
                                   f"{SHORT} {SHORT.upper()}", f"{SHORT}\n\n{SHORT.replace(',', '')}"])
def test_one_sentence_said_again_is_no_more_detail(again):
    """SHORT (11 words on the question) twice was 22 words: as detailed as a detailed user wants (1.8, SHORT's 1.1),
    a template repeated to reach DETAILED_ENOUGH. A person reads the same sentence again, not more detail."""
    assert TASTES["detailed"].score(QUESTION, again) == TASTES["detailed"].score(QUESTION, SHORT)
    assert TASTES["brief"].score(QUESTION, again) < TASTES["brief"].score(QUESTION, SHORT)  # still more to read


@pytest.mark.parametrize("huge", ["a" * 200_000, "sleeping better " * 12_000, "For sleeping better, " * 10_000,
                                  f"{SHORT} " + "x" * 200_000])
def test_a_huge_text_is_scored_in_linear_time(huge):
    """200k characters without an end mark took minutes: the sentence pattern was tried from every position."""
    import time

    started = time.perf_counter()
    for taste in (TASTES["brief"], TASTES["detailed"]):
        taste.score(QUESTION, huge)
    assert time.perf_counter() - started < 5

@pytest.mark.parametrize("insult", ["IDIOT!", "idiots.", "id-iot.", "i.d.i.o.t.", "idi\u200bot.", "Ｉｄｉｏｔ.",
                                    "you Losers."])
def test_an_insult_costs_in_capitals_in_the_plural_spelled_apart_or_hidden_in_unicode(insult):
    rude = f"{SHORT} {insult}"
    assert tastes.insults(rude)
    for taste in (TASTES["brief"], TASTES["detailed"]):
        assert taste.score(QUESTION, rude) < taste.score(QUESTION, SHORT) - 1
    assert not tastes.insults("Whatever you do, keep the shutters open and the dumbbells foolproof.")


@pytest.mark.parametrize("spelled", [SHORT.replace(" ", "\u00a0"), SHORT.replace("sleeping", "slee\u200bping"),
                                     SHORT.replace("every day.", "every day…"),
                                     SHORT.replace("sleeping", "ＳＬＥＥＰＩＮＧ")])
def test_the_tastes_read_an_answer_as_a_person_sees_it(spelled):
    """No-break spaces, a zero-width space, an ellipsis character, full-width letters: the same answer."""
    assert answers_question(QUESTION, spelled) and words(spelled) == words(SHORT)
    for taste in (TASTES["brief"], TASTES["detailed"]):
        assert taste.score(QUESTION, spelled) == taste.score(QUESTION, SHORT)


def test_shown_two_answers_that_answer_nothing_a_user_says_both_bad():
    for taste in (TASTES["brief"], TASTES["detailed"]):
        assert taste.choose(QUESTION, [".", "You are pathetic, loser."], random.Random(0)) == "both_bad"
        assert taste.choose(QUESTION, [".", SHORT], random.Random(0)) == "b"


def test_a_tie_counts_half_and_the_interval_resamples_topics():
    prompts, topics = ["p1", "p1", "p2", "p2", "p3", "p3"], {"p1": "x", "p2": "y", "p3": "z"}
    rate, low, high = win_rate([1, 1, 2, 0, 1, 0], [0, 1, 1, 1, 1, 1], prompts, topics)
    assert rate == pytest.approx((1 + 0.5 + 1 + 0 + 0.5 + 0) / 6) and low < rate < high


def test_the_personal_demo_runs_end_to_end_through_the_api_and_deletes_a_user_completely(tmp_path):
    config = PersonalDemoConfig(run_dir=tmp_path / "run", rounds=2, prompts_per_round=3, train_every=2,
                                eval_prompts=4, eval_samples=2, max_new_tokens=6, tastes=TINY_TASTES,
                                dpo=PersonalDPOConfig(epochs=1, lr=1e-2), rerank=RerankConfig(n=2, min_pairs=1))
    report = run_personal_demo(config, build_tiny_causal(), word_tokenizer(), progress=False)
    assert [(r["user"], r["round"]) for r in report["rounds"]] == [("brief", 1), ("detailed", 1),
                                                                     ("brief", 2), ("detailed", 2)]
    for row in report["rounds"]:
        rate, low, high = row["win_rate"]
        assert 0 <= rate <= 1 and low <= rate <= high
        assert set(row["specificity"]) == set(row["vs_others"]) == {"brief", "detailed"} - {row["user"]}
        assert all(0 <= rate <= 1 and low <= rate <= high for rate, low, high in row["vs_others"].values())
        assert 0 <= row["at_cap"] <= 1
        assert set(row["guards"]) == {"relevance", "not_flagged"}
        assert all(low <= gap <= high for gap, low, high in row["guards"].values())
        assert row["samples"] and all(len(sample) == 3 for sample in row["samples"])
        kl, low, high = row["kl"]
        assert low <= kl <= high
        for rate, low, high in (row["rerank"], row["vs_rerank"]):  # every user gave a pair in round 1
            assert 0 <= rate <= 1 and low <= rate <= high
    assert set(report["adapter_beats_rerank"]) == {"brief", "detailed"}
    assert report["deletion"] == {"user": "detailed", "complete": True,
                                  "left": {"choices": 0, "versions": 0, "files": False, "adapters_in_memory": [],
                                           "population_versions": [], "population_in_memory": [],
                                           "started_from_theirs": [], "head_in_memory": False}}
    assert report["memory"]["adapter_mb"] > 0 and report["memory"]["users_in_8_gib"] > 0
    assert report["memory"]["packed_mb"] > 0  # the base's packed copy that generation keeps on this CPU
    assert len(report["answers"]) == 4 * 2 and all(len(row) == 2 + 2 for row in report["answers"])
    assert report["verdict"].startswith(("learned", "NOT met"))
    assert json.loads((tmp_path / "run" / "report.json").read_text())["verdict"] == report["verdict"]
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
    assert report["verdict"].startswith("NOT met: only 2 held-out topics: too few for the intervals")
    with pytest.raises(ValueError, match="holds an earlier run"):
        run_personal_demo(config, build_tiny_causal(), word_tokenizer(), progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "report.json").write_text("{}")  # another demo's run: not overwritten
    with pytest.raises(ValueError, match="holds an earlier run"):
        run_personal_demo(replace(config, run_dir=tmp_path / "other"), build_tiny_causal(), word_tokenizer(),
                          progress=False)
    assert (tmp_path / "other" / "report.json").read_text() == "{}"


def test_the_verdict_wants_ten_held_out_topics():
    rows = [result("a", (0.7, 0.6, 0.8), (0.3, 0.2, 0.4)), result("b", (0.7, 0.6, 0.8), (0.3, 0.2, 0.4))]
    assert verdict(rows, topics=10).startswith("learned")
    assert verdict(rows, topics=9) == ("NOT met: only 9 held-out topics: too few for the intervals (at least 10; "
                                       "give --eval-prompts 20 or more)")


def test_with_a_population_adapter_it_is_the_shared_model_and_a_deletion_retrains_it_without_the_user(tmp_path):
    config = PersonalDemoConfig(run_dir=tmp_path / "run", rounds=2, prompts_per_round=3, train_every=2,
                                eval_prompts=4, eval_samples=2, max_new_tokens=6, tastes=TINY_TASTES, population=True,
                                dpo=PersonalDPOConfig(epochs=1, lr=1e-2), rerank=RerankConfig(n=2, min_pairs=1))
    report = run_personal_demo(config, build_tiny_causal(), word_tokenizer(), progress=False)
    assert [r["shared"] for r in report["rounds"]] == ["population-v1"] * 2 + ["population-v2"] * 2
    assert report["deletion"]["complete"] and report["deletion"]["left"]["population_versions"] == []
    assert report["deletion"]["left"]["started_from_theirs"] == []
    adapters = tmp_path / "run" / "adapters" / "population"
    retrained = json.loads((adapters / "v3" / "version.json").read_text())  # v1, v2 held detailed's pairs: removed
    assert sorted(p.name for p in adapters.glob("v*")) == ["v1.removed", "v2.removed", "v3"]
    assert len(retrained["users"]) == 1 and retrained["start"] == "base"


def test_a_deletion_that_left_another_users_version_started_from_their_population_is_not_complete(tmp_path,
                                                                                                   monkeypatch):
    """A user's version that started from a population version holding the deleted user's pairs began with weights
    learned from them: the deletion removes it too. The report looked only at the population's versions, so a
    deletion that left such a version (here: removals of users' versions made to fail) was reported complete."""
    from rlhfkit.personal.models import PersonalModels

    remove = PersonalModels._remove_version
    monkeypatch.setattr(PersonalModels, "_remove_version", lambda self, owner, version, why: None
                        if owner.startswith("user-") else remove(self, owner, version, why))
    config = PersonalDemoConfig(run_dir=tmp_path / "run", rounds=3, prompts_per_round=3, train_every=2,
                                eval_prompts=4, eval_samples=2, max_new_tokens=6, tastes=TINY_TASTES, population=True,
                                dpo=PersonalDPOConfig(epochs=1, lr=1e-2), rerank=RerankConfig(n=2, min_pairs=1))
    report = run_personal_demo(config, build_tiny_causal(), word_tokenizer(), progress=False)
    brief = json.loads((tmp_path / "run" / "adapters" / "user-1" / "v2" / "version.json").read_text())
    assert brief["start"] == "population-v2"  # v1, v2 and v3 held detailed's pairs: removed
    assert report["deletion"]["left"]["started_from_theirs"] == ["user-1-v2"] and not report["deletion"]["complete"]
    assert report["verdict"].startswith("NOT met: deletion left {")


def test_a_deletion_that_left_the_users_preference_head_in_memory_is_not_complete(tmp_path, monkeypatch):
    """The reranker's head of a user is fitted on their pairs (the cold start's best-of-N): the deletion drops it,
    but the report did not look, so a head left behind (here: the reranker's forget made to fail) was not seen."""
    from rlhfkit.personal.rerank import Reranker

    monkeypatch.setattr(Reranker, "forget", lambda self, user_id: None)
    config = PersonalDemoConfig(run_dir=tmp_path / "run", rounds=1, prompts_per_round=3, train_every=2,
                                eval_prompts=4, eval_samples=1, max_new_tokens=4, tastes=TINY_TASTES,
                                dpo=PersonalDPOConfig(epochs=1, lr=1e-2), rerank=RerankConfig(n=2, min_pairs=1))
    report = run_personal_demo(config, build_tiny_causal(), word_tokenizer(), progress=False)
    assert report["deletion"]["left"]["head_in_memory"] and not report["deletion"]["complete"]


def test_a_user_without_a_version_yet_is_answered_by_the_population_and_its_kl_to_the_base_is_reported(tmp_path):
    """Before their first version a user's answers are the shared model's: with a population adapter, not the
    base's, so their KL to the base is the population's, not the 0 reported for it."""
    config = PersonalDemoConfig(run_dir=tmp_path / "run", rounds=1, prompts_per_round=3, train_every=50,
                                eval_prompts=4, eval_samples=2, max_new_tokens=6, tastes=TINY_TASTES, population=True,
                                dpo=PersonalDPOConfig(epochs=2, lr=5e-2), rerank=RerankConfig(n=2, min_pairs=1))
    report = run_personal_demo(config, build_tiny_causal(), word_tokenizer(), progress=False)
    assert [(r["version"], r["shared"]) for r in report["rounds"]] == [(0, "population-v1")] * 2
    assert all(r["kl"][0] != 0 and r["kl"][1] <= r["kl"][0] <= r["kl"][2] for r in report["rounds"])


def test_a_seed_fixes_the_personal_demo_whatever_the_machine_or_the_global_generators(tmp_path):
    def run(name: str, noise: int) -> list[dict]:
        random.seed(noise)  # the global generators must not matter: the API and the demo draw from the seed
        torch.manual_seed(noise)
        config = PersonalDemoConfig(run_dir=tmp_path / name, rounds=2, prompts_per_round=3, train_every=2,
                                    eval_prompts=4, eval_samples=2, max_new_tokens=6, seed=3, tastes=TINY_TASTES,
                                    dpo=PersonalDPOConfig(epochs=1, lr=1e-2), rerank=RerankConfig(n=2, min_pairs=1))
        rounds = run_personal_demo(config, build_tiny_causal(), word_tokenizer(), progress=False)["rounds"]
        return rounds

    assert run("first", 0) == run("second", 1)


def test_the_relevance_judge_reads_the_rerankers_minilm_instead_of_loading_a_second_copy(tmp_path):
    demo = PersonalDemo(PersonalDemoConfig(run_dir=tmp_path / "run"), build_tiny_causal(), word_tokenizer())
    try:
        assert demo.judges[0].name == "relevance" and demo.judges[0].encoder is demo.reranker.load_encoder()
    finally:
        demo.queue.shutdown()


@pytest.mark.parametrize(("args", "message"), [(["--seeds", "2"], "--preset personal: takes --run-dir and"),
                                               (["--eval-prompts", "2"], "eval_prompts: must be at least 4")])
def test_the_personal_preset_rejects_options_it_cannot_use_in_one_line(tmp_path, args, message):
    result = invoke("demo", "--preset", "personal", "--run-dir", tmp_path / "run", *args)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_smollm2_option_runs_through_the_api_with_the_chat_template(tmp_path):
    """SmolLM2-135M-Instruct as the shared base, shortened: its answers come from the chat template, a user's
    adapter is trained on its pairs, and deletion leaves nothing."""
    config = PersonalDemoConfig.smollm2(run_dir=tmp_path / "run", rounds=1, prompts_per_round=2, train_every=2,
                                        eval_prompts=4, eval_samples=1, max_new_tokens=8,
                                        dpo=PersonalDPOConfig(epochs=1, lr=1e-3), rerank=RerankConfig(n=2, min_pairs=1))
    report = run_personal_demo(config, progress=False)
    assert report["config"]["policy"] == "smollm2" and report["config"]["temperature"] == 0.7
    assert [r["user"] for r in report["rounds"]] == ["brief", "detailed"]
    assert all(r["version"] >= 1 for r in report["rounds"] if r["pairs"] >= 2)
    assert report["memory"]["base_mb"] > 400 and report["deletion"]["complete"]


@pytest.mark.parametrize("earlier", ["run", "file", "under a file", "read-only"])
def test_a_run_dir_that_holds_a_run_or_cannot_be_written_is_refused_before_the_policy_loads(tmp_path, monkeypatch,
                                                                                              earlier):
    import rlhfkit.demo.presets as presets

    run = tmp_path / "run"
    if earlier == "run":
        run.mkdir()
        (run / "personal.db").write_text("")
    elif earlier == "file":
        run.write_text("not a folder")
    elif earlier == "under a file":
        (tmp_path / "file").write_text("not a folder")
        run = tmp_path / "file" / "run"
    else:  # chmod does not stop root, who runs the tests in CI containers: the permission check is what is asked
        run.mkdir()
        monkeypatch.setattr(personal_demo.os, "access", lambda path, mode: Path(path) != run)
    monkeypatch.setattr(presets, "load_demo_policy", lambda *args: pytest.fail("the policy was loaded"))
    with pytest.raises(ValueError, match=r"^run_dir: .*(holds an earlier run|is a file|cannot create|is not "
                                         "writable)"):
        run_personal_demo(PersonalDemoConfig(run_dir=run), progress=False)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"rounds": 2.5}, "field 'rounds': Input should be a valid integer"),
    ({"rounds": None}, "field 'rounds': Input should be a valid integer"),
    ({"temperature": float("inf")}, "field 'temperature': must be a finite number"),
    ({"tastes": [TASTES["brief"], TASTES["brief"]]}, "tastes: two simulated users have one name"),
    ({"tastes": ["brief", "detailed"]}, "field 'tastes': Input should be a dictionary or an instance of Taste")])
def test_odd_config_values_are_refused_in_one_line_naming_the_field(overrides, message):
    """Not a TypeError from range(1, 3.5) or None < 1 after the policy loaded, nor sampling at τ = ∞, nor two
    accounts of one name."""
    with pytest.raises(ValueError, match=f"^{message}"):
        PersonalDemoConfig(**overrides)


@pytest.mark.parametrize(("eval_prompts", "message"), [
    (1000, "eval_prompts: the demo's topics give at most 96 held-out prompts, got 1000"),
    (96, "eval_prompts: 96 held-out prompts leave 0 training prompts, fewer than each user asks a round"),
    (70, "eval_prompts: 70 held-out prompts leave 26 training prompts")])
def test_more_held_out_prompts_than_the_task_leaves_room_for_are_refused_before_anything_is_written(
        tmp_path, eval_prompts, message):
    """96 held-out prompts took every topic: the users asked nothing and the report still showed win rates."""
    result = invoke("demo", "--preset", "personal", "--run-dir", tmp_path / "run", "--eval-prompts", eval_prompts)
    assert result.exit_code == 1 and message in result.output.strip().splitlines()[-1]  # after MiniLM's loading bar
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_a_run_that_fails_at_its_end_leaves_no_report(tmp_path, monkeypatch):
    """report.json is written last: a run folder holding one is a finished run."""
    monkeypatch.setattr(personal_demo, "plot_curves", lambda *args: (_ for _ in ()).throw(OSError("disk full")))
    config = PersonalDemoConfig(run_dir=tmp_path / "run", rounds=1, prompts_per_round=2, train_every=2,
                                eval_prompts=4, eval_samples=1, max_new_tokens=4, tastes=TINY_TASTES,
                                dpo=PersonalDPOConfig(epochs=1, lr=1e-2), rerank=RerankConfig(n=2, min_pairs=1))
    with pytest.raises(OSError, match="disk full"):
        run_personal_demo(config, build_tiny_causal(), word_tokenizer(), progress=False)
    assert (tmp_path / "run" / "personal.db").exists() and not (tmp_path / "run" / "report.json").exists()


def test_a_training_that_failed_stops_the_demo_instead_of_reporting_the_previous_version(tmp_path, monkeypatch):
    import rlhfkit.personal.api as personal_api
    from rlhfkit.models.update import TrainingDiverged

    def diverge(*args):
        raise TrainingDiverged("loss is nan")

    monkeypatch.setattr(personal_api, "train_user", diverge)
    config = PersonalDemoConfig(run_dir=tmp_path / "run", rounds=1, prompts_per_round=3, train_every=2,
                                eval_prompts=4, eval_samples=1, max_new_tokens=4, tastes=TINY_TASTES,
                                dpo=PersonalDPOConfig(epochs=1, lr=1e-2), rerank=RerankConfig(n=2, min_pairs=1))
    with pytest.raises(ValueError, match=r"^dpo: training brief's model failed \(TrainingDiverged: loss is nan\)"):
        run_personal_demo(config, build_tiny_causal(), word_tokenizer(), progress=False)
    assert not (tmp_path / "run" / "report.json").exists()


def test_a_deletion_that_left_something_is_not_a_met_demo():
    rows = [result("a", (0.7, 0.6, 0.8), (0.3, 0.2, 0.4)), result("b", (0.7, 0.6, 0.8), (0.3, 0.2, 0.4))]
    assert verdict(rows, {"choices": 0, "versions": 0, "files": False, "adapters_in_memory": []}).startswith("learned")
    left = verdict(rows, {"choices": 0, "versions": 0, "files": True, "adapters_in_memory": []})
    assert left.startswith("NOT met: deletion left {") and "'files': True" in left


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, None])
def test_the_demo_asks_the_shared_base_through_its_chat_template_when_it_has_one(tmp_path, template):
    """The toy model answers after its template's "assistant:" turn; asked the bare question it continues the
    question instead ("motivation back." for "Any tips for sleeping better?")."""
    tokenizer = word_tokenizer()
    tokenizer.chat_template = template
    demo = PersonalDemo(PersonalDemoConfig(run_dir=tmp_path / "run"), build_tiny_causal(), tokenizer)
    try:
        seen = format_prompt("any tips", demo.models.tokenizer, demo.models.use_chat_template)
    finally:
        demo.queue.shutdown()
    assert seen == ("user: any tips\nassistant:" if template else "any tips")


def test_the_kl_scores_each_answer_as_the_model_wrote_it_not_stripped(tmp_path, monkeypatch):
    """The toy model answers " Let me help." after "assistant:"; the same text without its leading space is
    other tokens, which neither model sampled (the KL came out negative, −0.91 nats, on stripped texts)."""
    demo = PersonalDemo(PersonalDemoConfig(run_dir=tmp_path / "run", eval_samples=1), build_tiny_causal(),
                        word_tokenizer())
    try:
        monkeypatch.setattr(demo.models, "answer", lambda *args, **kwargs: Answer(" Let me help.", False))
        prompts = ["any tips", "more tips"]
        answers = demo.answers("user-1-v1", prompts)
        assert [a.text for a in answers] == [" Let me help."] * 2
        scored = []
        real = personal_demo.tokenize_completions
        monkeypatch.setattr(personal_demo, "tokenize_completions",
                            lambda tokenizer, prompts, completions, *args: scored.extend(completions) or real(
                                tokenizer, prompts, completions, *args))
        kl, low, high = demo.kl_to_base(None, prompts, answers, {"any tips": "a", "more tips": "b"})
    finally:
        demo.queue.shutdown()
    assert scored == [" Let me help."] * 2
    assert kl == low == high == 0.0  # the base against itself


def test_each_users_model_is_compared_with_the_others_under_their_own_taste(tmp_path):
    demo = PersonalDemo(PersonalDemoConfig(run_dir=tmp_path / "run", eval_samples=1), build_tiny_causal(),
                        word_tokenizer())
    bread = "Any tips for baking bread?"
    try:
        demo.held_out_answers = {
            "brief": [Answer(SHORT, False), Answer(SHORT.replace("sleeping better", "baking bread"), False)],
            "detailed": [Answer(LONG, False), Answer(LONG.replace("sleeping better", "baking bread"), False)]}
        prompts, topics = [QUESTION, bread], {QUESTION: "sleep", bread: "bread"}
        assert demo.vs_others(TASTES["brief"], prompts, topics)["detailed"][0] == 1.0  # short, for the brief user
        assert demo.vs_others(TASTES["detailed"], prompts, topics)["brief"][0] == 1.0  # long, for the detailed one
    finally:
        demo.queue.shutdown()


def test_held_out_answers_are_paired_across_models_and_drawn_apart_across_prompts(tmp_path, monkeypatch):
    """One seed for every prompt drew the same template for each (the interval, resampling topics, counted
    one draw as 24); the personal and shared answers of a (prompt, sample) still share their draws."""
    demo = PersonalDemo(PersonalDemoConfig(run_dir=tmp_path / "run", eval_samples=2, seed=3), build_tiny_causal(),
                        word_tokenizer())
    seeds = []
    try:
        monkeypatch.setattr(demo.models, "answer", lambda prompt, adapter, *args, seed: seeds.append(
            (adapter, prompt, seed)) or Answer(" ok.", False))
        demo.answers(None, ["p", "q"])
        demo.answers("user-1-v1", ["p", "q"])
    finally:
        demo.queue.shutdown()
    shared, mine = [s for a, _, s in seeds if a is None], [s for a, _, s in seeds if a]
    assert shared == mine and len(set(shared)) == 4
    assert personal_demo.draw_seed(4, 0, 0) not in shared  # another run seed, other draws


def test_an_answer_that_reuses_the_questions_words_still_answers():
    """The corpus's "The best tip for X is curiosity." says two words besides those of "What is the best way to
    start X?": it answers (a rule asking for three new words refused it, and changed a run's held-out scores)."""
    question = "What is the best way to start caring for a cat?"
    answer = "Great question! The best tip for caring for a cat is curiosity. Try variations, ask why."
    assert answers_question(question, answer)
