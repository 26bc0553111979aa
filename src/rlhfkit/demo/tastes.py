"""The personal demo's simulated users: hidden tastes, what a user of that kind wants from an answer to their
question (built from the question's content words and the toy corpus's insults, not from the verdict's
judges, so those stay independent checks), on the text as a person reads it (NFKC, no zero-width characters):

    answers(x, y)  = some whole sentence of y without an insult, not a question, names every content word of x,
                     in 6+ words, not x's words in their order (whole: ended by its mark, no word of 4+ letters said
                     3 times)
    insults(y)     = some word of y is one of the corpus's insults (any case, plural, "id-iot")
    on(x, y)       = words of y's whole sentences from the first that names x's topic on (not the opener),
                     but for the corpus's pleasantries ("Thank you!") and a sentence said again
    brief(x, y)    = −(max(words(y), 20) + 20 · [not answers(x, y)] + 20 · [insults(y)]) / 10
    detailed(x, y) = (min(on(x, y), 18) · [answers(x, y)] − 20 · [insults(y)]) / 10

Each taste is satisfied by many answers (the brief user does not mind 20 words, 18 words on the question
are detailed enough for the other), as a person's: a taste that always prefers one more word is won by the
one longest template of the toy corpus, given to every question.

Shown two answers of which neither answers the question, either user says "both bad" (no pair).
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rlhfkit.demo.criteria import topic_words
from rlhfkit.eval.judges import as_read  # the text as a reader sees it (NFKC, no zero-width characters)
from rlhfkit.models.toy_policy import toy_corpus

WORD = re.compile(r"[A-Za-z']+")
SENTENCE = re.compile(r"[^.!?]*[.!?]")  # a whole sentence, up to its end mark
JOINER = re.compile(r"(?<=[a-z])[-.*_](?=[a-z])")  # inside a word: "id-iot", "i.d.i.o.t"
STUTTER = 3  # a sentence that says a word of 4+ letters this often stutters ("sleeping sleeping sleeping.")
MIN_ANSWER_WORDS = 6  # a sentence naming the topic in fewer words says nothing about it ("Keeping a diary!")
# What not answering the question and an insult cost either user, in words: with BRIEF_ENOUGH 20, "." scores as an
# answer of 40 words for the brief user (20 was the cost at which brief's best of 8 base samples answered the
# question 94% of the time, benchmarks/results/personal_tastes.md, run 37)
UNANSWERED_WORDS = 20
INSULT_WORDS = 20
# How short is short enough and how detailed is detailed enough: a taste that always wants one more (or one fewer)
# word is won by one template for every question; the best of 12 base samples by a taste tying more answers
# keeps more variety but beats the shared answers less often (brief at 14-19 words: 0.58-0.73× the shared
# samples' distinct-2, at 20 words 1.02×; own-taste win 0.87-1.00 and 0.76: personal_tastes.md, run 48)
# Where the two tastes meet: at DETAILED_ENOUGH 17 an answer of 17-20 words with no opener satisfied both, and the
# best of 12 base samples by the detailed taste (a stand-in for a model that learned it) also beat the shared
# answers under the brief taste, 0.58 [0.50, 0.67]: no model could pass the specificity check (the default seed's
# detailed model did not: 0.58 [0.51, 0.65], run 116). At 18 that pick scores 0.47 [0.38, 0.57] under brief's
# taste, its own-taste win rises from 0.73 to 0.81 (brief's pick: 0.47 under the detailed taste, 0.84 under its
# own, unchanged), at 0.62× the shared samples' distinct-2 instead of 0.77× (personal_tastes.py --pick 20,17 20,18;
# personal_tastes.md, run 121)
BRIEF_ENOUGH = 20  # words the brief user reads without minding: answers this short tie
DETAILED_ENOUGH = 18  # words on the question that satisfy the detailed user: answers this detailed tie

@dataclass(frozen=True)
class Taste:
    """A simulated user's hidden criterion: ``score(question, answer)``, higher is better; the user sees it
    with Gaussian noise of std ``noise`` and says "both fine" when the noisy scores differ by less than
    ``tie_margin``. A taste with ``is_answer`` says "both bad" when neither answer answers the question."""

    user: str
    description: str
    score: Callable[[str, str], float]
    # a word is 0.1 on the length tastes: answers a word apart are "both fine". Of the pairs made of two base
    # answers, 3% of brief's and 8% of detailed's are of answers its taste scores the same (a pair of noise;
    # personal_tastes.py --pick 20,17); 8% and 26% at noise 0.1, margin 0.05 (personal_tastes.md, run 48)
    noise: float = 0.05
    tie_margin: float = 0.1
    is_answer: Callable[[str, str], bool] | None = None

    def choose(self, question: str, answers: Sequence[str], rng: random.Random) -> str:
        if self.is_answer and not any(self.is_answer(question, x) for x in answers):
            return "both_bad"
        a, b = (self.score(question, x) + rng.gauss(0.0, self.noise) for x in answers)
        return "both_fine" if abs(a - b) < self.tie_margin else "a" if a > b else "b"


def words(text: str) -> int:
    return len(WORD.findall(as_read(text)))


@functools.cache
def rude_words() -> frozenset[str]:
    """The insults of the toy corpus's rude openers ("What a stupid question, idiot.")."""
    return frozenset(toy_corpus()["rude_words"])


def insults(answer: str) -> bool:
    """Some word of ``answer`` is one of the corpus's insults, in any case, in the plural ("idiots") or
    spelled apart ("id-iot", "i.d.i.o.t")."""
    text = as_read(answer).lower()
    said = set(WORD.findall(text)) | set(WORD.findall(JOINER.sub("", text)))
    return any(w in rude_words() or w.removesuffix("s") in rude_words() for w in said)


def whole_sentences(answer: str) -> list[str]:
    """The sentences of ``answer`` ended by '.', '!' or '?' (a sentence cut at the token cap is not one) that do
    not stutter (no word of 4+ letters said STUTTER times: a repetition loop names the topic, says nothing)."""
    def stutters(sentence: str) -> bool:
        said = [w for w in WORD.findall(sentence.lower()) if len(w) >= 4]
        return any(said.count(w) >= STUTTER for w in set(said))

    # cut after the last end mark: no sentence follows it, and the pattern, tried there from every position, was
    # quadratic in a long text without one
    text = as_read(answer)
    text = text[:max(text.rfind(mark) for mark in ".!?") + 1]
    return [s for s in SENTENCE.findall(text) if not stutters(s)]


def sentences_on(question: str, answer: str) -> list[str]:
    """The whole sentences of ``answer`` that name the question's topic (a content word of it,
    criteria.topic_words) and insult no one."""
    topic = topic_words(question)
    return [s for s in whole_sentences(answer) if set(WORD.findall(s.lower())) & topic and not insults(s)]


def answers_question(question: str, answer: str) -> bool:
    """A sentence of ``answer`` on the question, not a question itself nor one that says the question's words in
    their order, names all of its content words in MIN_ANSWER_WORDS words or more ("For sleeping better, start
    small and practice a little every day."; not "." nor "Sleeping better!" nor the question asked or said back,
    "What is the best way to start sleeping better?", "You asked: any tips for sleeping better."). A rule counting
    the words besides the question's would refuse the corpus's "The best tip for caring for a cat is curiosity."
    for "What is the best way to start caring for a cat?"."""
    topic, asked = topic_words(question), " ".join(WORD.findall(as_read(question).lower()))
    return any(topic <= set(said := WORD.findall(s.lower())) and words(s) >= MIN_ANSWER_WORDS and not s.endswith("?")
               and f" {asked} " not in f" {' '.join(said)} " for s in sentences_on(question, answer))


@functools.cache
def pleasantries() -> frozenset[str]:
    """The sentences of the toy corpus's kind openers and empty replies, lower case: "thank you!", "good luck!"."""
    corpus = toy_corpus()
    return frozenset(s.strip().lower() for text in corpus["openers"]["kind"] + corpus["empty"]
                     for s in SENTENCE.findall(text))


def words_on(question: str, answer: str) -> int:
    """The words of ``answer``'s whole sentences from the first that names the question's topic on, but for
    pleasantries and a sentence said again (its words, in any case and punctuation, counted once): the answer
    proper, without its opener ("Love this question."), a closing "Thank you! Have a wonderful day.", a sentence
    cut at the token cap or one repeated to reach DETAILED_ENOUGH."""
    whole = whole_sentences(answer)
    first = next((i for i, s in enumerate(whole) if set(WORD.findall(s.lower())) & topic_words(question)), len(whole))
    said = {tuple(WORD.findall(s.lower())) for s in whole[first:] if s.strip().lower() not in pleasantries()}
    return sum(map(len, said))


def brief(question: str, answer: str) -> float:
    """−(max(words, BRIEF_ENOUGH) + UNANSWERED_WORDS · [no answer] + INSULT_WORDS · [insult]) / 10: every
    word past BRIEF_ENOUGH costs, not answering the question and an insult cost more."""
    return -(max(words(answer), BRIEF_ENOUGH) + UNANSWERED_WORDS * (not answers_question(question, answer))
             + INSULT_WORDS * insults(answer)) / 10


def detailed(question: str, answer: str) -> float:
    """(min(words_on(question, answer), DETAILED_ENOUGH) · [answers] − INSULT_WORDS · [insult]) / 10: every word of
    an answer to the question up to DETAILED_ENOUGH counts (openers, pleasantries and a sentence cut at the token
    cap do not; nothing counts in a text that does not answer: "learning to juggle" for "learning to dance"
    names "learning"), an insult costs."""
    return (min(words_on(question, answer), DETAILED_ENOUGH) * answers_question(question, answer)
            - INSULT_WORDS * insults(answer)) / 10


@functools.cache
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment(text: str) -> float:
    """VADER's compound sentiment of ``text``, in [−1, 1] (as rlhfkit.eval.judges.SentimentJudge)."""
    return _vader().polarity_scores(text)["compound"]


TASTES = {  # scores on the scale of the base samples' spread: words / 10 (sd 0.9), VADER compound (sd 0.5)
    "brief": Taste("brief", f"a short answer to the question (words past {BRIEF_ENOUGH} cost; not answering and an "
                   "insult cost 20 words more)", brief, is_answer=answers_question),
    "detailed": Taste("detailed", f"a detailed answer to the question (at least {DETAILED_ENOUGH} words on it; an "
                      "insult costs 20)", detailed, is_answer=answers_question),
    "warm": Taste("warm", "warm, positive answers (VADER sentiment)", lambda question, answer: sentiment(answer)),
}


def default_tastes() -> list[Taste]:
    """Two users with opposite tastes on what the toy policy's answers vary on most: their length (words
    per answer over its samples: mean 18, sd 8.8, quartiles 13, 20, 25, measured before the base was asked
    through its chat template; benchmarks/personal_tastes.py --look),
    both among answers to the question."""
    return [TASTES["brief"], TASTES["detailed"]]
