"""Choices in the feedback database: stored at once, private to their user, turned into pairs, deletable."""

import threading

import pytest
from alembic import command
from sqlalchemy import inspect, select

from rlhfkit.feedback import db as feedback_db
from rlhfkit.feedback import service
from rlhfkit.feedback.service import FeedbackError
from rlhfkit.personal import store


@pytest.fixture
def sessions(tmp_path):
    return feedback_db.session_factory(str(tmp_path / "feedback.db"))


def users(sessions, *names):
    with sessions() as db:
        return [service.create_user(db, name, password=f"{name}-password") for name in names]


def ask(sessions, user, prompt="how do i fix bike", answers=("kind answer", "rude answer")):
    with sessions() as db:
        return store.record_question(db, user, prompt, answers, ("personal v1", "base")).id


def test_only_a_or_b_gives_a_pair_with_the_picked_answer_chosen(sessions):
    (ann,) = users(sessions, "ann")
    with sessions() as db:
        for choice in ("a", "b", "both_fine", "both_bad"):
            store.record_choice(db, ann, ask(sessions, ann), choice)
        ask(sessions, ann)  # asked, never answered
        pairs = store.preference_pairs(store.user_choices(db, ann.id))
        assert store.pair_count(db, ann.id) == 2
    assert [(p.chosen, p.rejected) for p in pairs] == [("kind answer", "rude answer"), ("rude answer", "kind answer")]
    assert pairs[0].provenance["models"] == ["personal v1", "base"]


def test_another_users_question_cannot_be_answered_and_a_choice_is_final(sessions):
    ann, bob = users(sessions, "ann", "bob")
    question = ask(sessions, ann)
    with sessions() as db, pytest.raises(FeedbackError) as refused:
        store.record_choice(db, bob, question, "a")
    assert refused.value.status == 404 and "no such question of yours" in refused.value.message
    unanswered = ask(sessions, ann)
    with sessions() as db:
        store.record_choice(db, ann, question, "b", "shorter")
        with pytest.raises(FeedbackError) as again:
            store.record_choice(db, ann, question, "a")
        assert again.value.status == 409
        with pytest.raises(FeedbackError) as long_reason:
            store.record_choice(db, ann, unanswered, "a", "x" * (store.MAX_REASON + 1))
        assert long_reason.value.status == 422
        assert store.user_choices(db, bob.id) == []


def test_concurrent_choices_of_one_user_are_all_stored(sessions):
    (ann,) = users(sessions, "ann")
    questions = [ask(sessions, ann) for _ in range(12)]

    def choose(question):
        with sessions() as db:
            store.record_choice(db, ann, question, "a")

    threads = [threading.Thread(target=choose, args=(q,)) for q in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with sessions() as db:
        assert sorted(c.id for c in store.user_choices(db, ann.id)) == questions


def test_deleting_a_users_data_leaves_no_row_of_theirs_and_the_others_untouched(sessions):
    ann, bob = users(sessions, "ann", "bob")
    for user in (ann, ann, bob):
        with sessions() as db:
            store.record_choice(db, user, ask(sessions, user), "a")
    with sessions() as db:
        assert store.delete_user_data(db, ann) == 2
        left = db.scalars(select(store.PersonalChoice)).all()
    assert [row.user_id for row in left] == [bob.id]


def test_migration_0005_creates_the_table_and_its_downgrade_removes_it(tmp_path):
    engine = feedback_db.make_engine(str(tmp_path / "m.db"))
    feedback_db.migrate(engine)
    assert "personal_choices" in inspect(engine).get_table_names()
    with engine.begin() as connection:
        command.downgrade(feedback_db.alembic_config(connection), "0004")
    assert "personal_choices" not in inspect(engine).get_table_names()
