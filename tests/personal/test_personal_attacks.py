"""Attacks on the personal models and careless use of them: what a hostile or hurried user sends, what two
tabs do at once, and what must be left after a deletion."""

import sqlite3
import threading

from test_personal_api import PROMPT, ask_and_choose, cold_start, encoder, login, server  # noqa: F401


def while_answers_are_sampled(app, models, request):
    """``request()``'s response, sent with the model's sampling held until another connection has taken and
    released SQLite's write lock (which fails, "database is locked", while a transaction holds it)."""
    sampling, release = threading.Event(), threading.Event()
    answer = models.answer

    def held_answer(*args, **kwargs):
        sampling.set()
        release.wait(10)
        return answer(*args, **kwargs)

    models.answer, done = held_answer, []
    thread = threading.Thread(target=lambda: done.append(request()))
    thread.start()
    try:
        assert sampling.wait(10)
        other = sqlite3.connect(app.state.sessions.kw["bind"].url.database, timeout=0.2, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
        other.close()
    finally:
        release.set()
        thread.join(10)
        models.answer = answer
    return done[0]


def test_an_ask_in_the_cold_start_does_not_hold_the_database_write_lock_while_it_samples(cold_start):
    """An ask reads the user's pairs for their head; kept open through the sampling, that read's transaction
    (SQLite: BEGIN IMMEDIATE) made every other write of the app (labels, logins, choices) wait for it."""
    app, models, _ = cold_start
    ann = login(app, "ann")
    asked = while_answers_are_sampled(app, models, lambda: ann.post("/api/personal/ask", json={"prompt": PROMPT}))
    assert asked.status_code == 200, asked.text


def test_a_before_after_sample_does_not_hold_the_database_write_lock_while_it_samples(server):
    app, models, queue = server
    ann = login(app, "ann")
    ask_and_choose(ann), ask_and_choose(ann)
    queue.wait()
    sample = while_answers_are_sampled(app, models, lambda: ann.get("/api/personal/sample"))
    assert sample.status_code == 200, sample.text
