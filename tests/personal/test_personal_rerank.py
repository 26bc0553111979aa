"""The cold start's preference head: Bradley–Terry on a user's pairs over a frozen encoder, and best-of-N."""

import re
import time

import pytest
import torch

from conftest import build_tiny_reward_backbone, minilm_tokenizer
from rlhfkit.config import FieldError
from rlhfkit.data.records import PreferencePair
from rlhfkit.personal.rerank import RerankConfig, Reranker, fit_head

PROMPT = "How do I fix my bike?"
SHORT, MEDIUM, LONG = "Oil the chain.", "Oil the chain and check the brakes.", \
    "Oil the chain, check the brakes, pump both tyres, tighten the bolts and ride slowly around the block."


def tiny_encoder(folder) -> str:
    """A 2-layer, 32-wide BERT (random weights, MiniLM's tokenizer) saved as a transformers folder, the way a
    reward model's backbone is: the sentence encoder reads it with mean pooling."""
    build_tiny_reward_backbone().save_pretrained(folder)
    minilm_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def reranker(tmp_path_factory):
    return Reranker(RerankConfig(min_pairs=2, encoder=tiny_encoder(tmp_path_factory.mktemp("encoder"))))


def pair(chosen, rejected, n=0, prompt=PROMPT):
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, prompt_id=f"q{n}")


def test_the_head_learns_a_separable_preference_in_well_under_a_second():
    torch.manual_seed(0)
    truth = torch.randn(16)
    differences = torch.randn(200, 16)
    differences *= torch.sign(differences @ truth)[:, None]  # each row: chosen − rejected under the truth
    fit_head(differences[:2], l2=0.01)  # torch's one-off set-up of its first optimizer step, not timed
    started = time.perf_counter()
    weights, loss = fit_head(differences[:100], l2=0.01)
    assert time.perf_counter() - started < 1.0
    assert (differences[:100] @ weights > 0).all()  # separable: every training pair ordered right
    held_out = differences[100:]
    assert (held_out @ weights > 0).float().mean() > 0.9  # pairs it never saw, ordered as the truth orders them
    assert loss < fit_head(differences[:100], l2=1.0)[1] and loss < torch.log(torch.tensor(2.0))


def test_ties_teach_nothing_and_the_l2_penalty_keeps_one_pair_finite():
    weights, loss = fit_head(torch.zeros(3, 8), l2=0.1)  # three pairs of equal answers
    assert torch.equal(weights, torch.zeros(8)) and loss == pytest.approx(torch.log(torch.tensor(2.0)).item())
    one, _ = fit_head(torch.ones(1, 8), l2=0.1)
    assert torch.isfinite(one).all() and one.sum() > 0  # prefers the chosen answer, by a finite margin
    with pytest.raises(ValueError, match=re.escape("differences: need a [pairs, features] tensor with a pair, got "
                                                   "shape (0, 8)")):
        fit_head(torch.zeros(0, 8), l2=0.1)


def test_best_of_n_returns_the_candidate_the_head_scores_highest(reranker):
    head = reranker.fit([pair(SHORT, LONG, 0), pair(MEDIUM, LONG, 1), pair(SHORT, MEDIUM, 2)])
    candidates = [MEDIUM, LONG, SHORT, "Ride it."]
    scores = reranker.scores(head, PROMPT, candidates)
    best, score = reranker.best_of_n(head, PROMPT, candidates)
    assert best == int(scores.argmax()) and score == pytest.approx(scores.max().item())
    assert reranker.best_of_n(head, PROMPT, [LONG])[0] == 0
    with pytest.raises(ValueError, match="candidates: best-of-N needs at least one sample"):
        reranker.best_of_n(head, PROMPT, [])


def test_a_head_learns_a_length_taste_from_a_few_pairs_and_picks_the_opposite_ends(reranker):
    brief = reranker.fit([pair(SHORT, MEDIUM, 0), pair(MEDIUM, LONG, 1), pair(SHORT, LONG, 2)])
    detailed = reranker.fit([pair(MEDIUM, SHORT, 0), pair(LONG, MEDIUM, 1), pair(LONG, SHORT, 2)])
    candidates = ["Ask a shop.", "Ask a bike shop near you to look at the gears, the chain and the wheels for you."]
    other = "How do I bake bread?"
    assert reranker.best_of_n(brief, other, candidates)[0] == 0
    assert reranker.best_of_n(detailed, other, candidates)[0] == 1


def test_a_users_head_answers_from_min_pairs_on_is_refitted_on_new_pairs_and_forgotten(reranker):
    first = [pair(SHORT, LONG, 0)]
    assert reranker.head(7, []) is None and reranker.head(7, first) is None  # below min_pairs = 2
    two = [*first, pair(MEDIUM, LONG, 1)]
    head = reranker.head(7, two)
    assert head.pairs == 2 and reranker.head(7, two) is head  # unchanged pairs: the same head
    three = reranker.head(7, [*two, pair(SHORT, MEDIUM, 2)])
    assert three.pairs == 3 and torch.equal(three.differences[:2], head.differences)  # old rows reused
    assert reranker.has_head(7) and not reranker.has_head(8)
    reranker.forget(7)
    assert not reranker.has_head(7)
    reranker.head(7, two)
    assert reranker.head(7, first) is None and not reranker.has_head(7)  # fewer pairs than min_pairs: dropped


def test_a_head_of_no_pairs_is_refused_in_one_line(reranker):
    with pytest.raises(ValueError, match=r"^pairs: a preference head needs at least one pair \(choices of A or B\)$"):
        reranker.fit([])


@pytest.mark.parametrize(("field", "value", "says"), [("n", 1, "must be 0 (no reranking) or at least 2"),
                                                     ("n", 33, "must be at most 32"),
                                                     ("min_pairs", 0, "must be at least 1"),
                                                     ("l2", 0.0, "must be positive"),
                                                     ("l2", float("nan"), "finite")])
def test_settings_that_cannot_rerank_are_refused_by_name(field, value, says):
    with pytest.raises(FieldError, match=re.escape(f"field '{field}': ") + ".*" + re.escape(says)):
        RerankConfig(**{field: value})
