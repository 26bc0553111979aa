"""Pairs ranked by a user's preference head: made from the starting point's samples of the questions they
asked, ordered as the head orders them, used by their training and stored nowhere."""

import re

import pytest
from fastapi.testclient import TestClient
from test_personal_api import ask_and_choose, login, serve, user_id
from test_personal_rerank import tiny_encoder

from conftest import build_tiny_causal, word_tokenizer
from rlhfkit.config import FieldError
from rlhfkit.data.records import PreferencePair
from rlhfkit.personal.models import PersonalModels, user_owner
from rlhfkit.personal.ranked import ranked_pairs
from rlhfkit.personal.rerank import RerankConfig, Reranker
from rlhfkit.personal.train import PersonalDPOConfig, train_version

QUESTIONS = ["how do i fix bike", "how do i cook", "how do i fix bike"]
GIVEN = [PreferencePair(prompt="how do i fix bike", chosen="fix the bike", rejected="i do not know how to fix a bike",
                        prompt_id="q1"),
         PreferencePair(prompt="how do i cook", chosen="cook it", rejected="i do not know how to cook at all",
                        prompt_id="q2")]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return tiny_encoder(tmp_path_factory.mktemp("encoder"))


@pytest.fixture
def models(tmp_path):
    return PersonalModels(build_tiny_causal(), word_tokenizer(), tmp_path / "adapters")


def rank(models, reranker, pairs=GIVEN, questions=QUESTIONS, seed=0):
    return ranked_pairs(models, reranker, 7, pairs, questions, temperature=1.0, max_new_tokens=8, seed=seed)


def test_one_pair_per_distinct_question_its_best_and_worst_sample_by_the_head(models, encoder):
    reranker = Reranker(RerankConfig(min_pairs=2, encoder=encoder, ranked_pairs=6))
    made = rank(models, reranker)
    assert [p.prompt for p in made] == ["how do i fix bike", "how do i cook"]
    head = reranker.head(7, GIVEN)
    for i, pair in enumerate(made):
        samples = [a.text for a in models.answers(pair.prompt, None, 6, 1.0, 8, seed=i)]  # question i: seed + i
        scores = reranker.scores(head, pair.prompt, samples).tolist()
        assert pair.chosen == samples[scores.index(max(scores))] and pair.rejected == samples[scores.index(min(scores))]
        assert max(scores) > min(scores) and pair.provenance == {"source": "ranked", "user_id": 7, "n": 6}
    assert rank(models, reranker) == made  # the same seed draws the same samples
    assert rank(models, reranker, seed=100) != made


def test_no_pairs_below_min_pairs_when_off_or_for_a_question_the_model_cannot_read(models, encoder):
    assert rank(models, Reranker(RerankConfig(min_pairs=3, encoder=encoder, ranked_pairs=4))) == []
    assert rank(models, Reranker(RerankConfig(min_pairs=2, encoder=encoder))) == []  # ranked_pairs 0: off
    reranker = Reranker(RerankConfig(min_pairs=2, encoder=encoder, ranked_pairs=4))
    too_long = " ".join(["bike"] * 200)  # past the tiny model's 128 positions
    assert [p.prompt for p in rank(models, reranker, questions=[too_long, "how do i cook"])] == ["how do i cook"]
    assert rank(models, reranker, questions=[too_long]) == []


def test_a_version_trains_on_its_ranked_pairs_and_counts_them_apart(models):
    config = PersonalDPOConfig(epochs=1, batch_size=2)
    ranked = [PreferencePair(prompt="how do i cook", chosen="cook", rejected="i do not know", prompt_id="r")] * 3
    _, history = train_version(models, user_owner(7), GIVEN, config, ranked=ranked)
    assert len(history) == 3  # 5 pairs, 2 a step
    info = models.version_info(user_owner(7), 1)
    assert info["pairs"] == 2 and info["ranked_pairs"] == 3
    assert models.trained_pairs(user_owner(7)) == 2  # the next training is queued by the user's own pairs


def test_the_app_trains_on_ranked_pairs_and_a_deletion_leaves_neither_them_nor_the_head(tmp_path, encoder):
    app, models, queue = serve(tmp_path, encoder, train_every=2, min_pairs=2)
    app.state.personal_reranker.config.ranked_pairs = 4
    try:
        ann = login(app, "ann")
        ask_and_choose(ann, "a"), ask_and_choose(ann, "b")
        queue.wait()
        owner, ann_id = user_owner(user_id(app, "ann")), user_id(app, "ann")
        learned = ann.get("/api/personal/learned").json()
        assert learned["training_error"] is None and learned["current_model"] == f"{owner}-v1"
        assert models.version_info(owner, 1)["ranked_pairs"] == 1  # one distinct question asked
        assert app.state.personal_reranker.has_head(ann_id)
        assert ann.delete("/api/personal/data").json()["deleted_choices"] == 2
        assert not app.state.personal_reranker.has_head(ann_id) and not (models.folder / owner).exists()
        assert not [n for n in models.adapter_names() if n.startswith(f"{owner}-")]
        assert TestClient(app).get("/api/personal/learned").status_code == 401
    finally:
        queue.shutdown()


@pytest.mark.parametrize("value", [1, 33, -1])
def test_a_number_of_samples_that_cannot_rank_is_refused_by_name(value):
    with pytest.raises(FieldError, match=re.escape("field 'ranked_pairs': ") + ".*" +
                       re.escape("must be 0 (off) or 2 to 32")):
        RerankConfig(ranked_pairs=value)
