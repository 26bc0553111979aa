"""The personal-model page and JSON API, in the feedback app (same accounts, sessions, CSRF and headers).

    GET  /personal                      the page (two answers side by side, the choice, what was learned)
    POST /api/personal/ask {prompt}     → {question_id, answers: [A, B], models: [model of A, model of B]}
    POST /api/personal/choose {question_id, choice: a | b | both_fine | both_bad, reason?}
                                        → {question_id, pairs (the user's count), training_queued}
    GET  /api/personal/learned          → the user's choices, counts, adapter versions, last training error
    GET  /api/personal/sample           → their latest question answered before (starting point) and after
    DELETE /api/personal/data           → every choice and adapter of the user removed (an ask that
                                          overlapped it stores nothing and answers 409: ask again), and
                                          every population version trained on their pairs, with the users'
                                          versions that started from one: all retrained without them

Exploration: one answer comes from the user's current personal adapter, the other from the alternative:
the starting point (population adapter, else base) when the user has an adapter, else the same model at
``alternative_temperature``; which side each lands on is drawn at random, and both are stored as shown.
The sides and the answers' draws come from one generator seeded with ``seed``: the same requests in the
same order (and the same versions trained meanwhile) get the same answers.
Cold start: until a user's first adapter version exists, once they gave ``rerank.min_pairs`` pairs, their
"personal" answer is the best of ``rerank.n`` samples of the starting point by their preference head
(rlhfkit.personal.rerank), labelled e.g. "base best-of-4 reranked".
Every ``train_every`` new pairs of a user, a training of their next version is queued (one background
thread); the next answers come from it once it is saved. A deletion that removed population versions
queues the population's training on the pairs that remain, then each user whose versions started from a
removed one; meanwhile they answer from the latest version left (or the base model).
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import AfterValidator, BaseModel, Field
from sqlalchemy.orm import Session

from rlhfkit.eval.judges import as_read
from rlhfkit.feedback.app import Text, json_body
from rlhfkit.feedback.db import User
from rlhfkit.feedback.service import FeedbackError
from rlhfkit.personal import store
from rlhfkit.personal.models import POPULATION, Forgotten, PersonalModels, PromptTooLong, user_owner
from rlhfkit.personal.rerank import PreferenceHead, RerankConfig, Reranker
from rlhfkit.personal.train import PersonalDPOConfig, TrainingQueue, train_population, train_user

HERE = Path(__file__).parent
TEMPLATES = Jinja2Templates(directory=[HERE / "templates", HERE.parent / "feedback" / "templates"])


def _not_blank(value: str) -> str:
    """Refuse a question a reader sees as empty: only white space or invisible format characters (zero-width)."""
    if not as_read(value).strip():
        raise ValueError("is blank: write a question")
    return value


def _text(min_length: int, max_length: int):
    """The feedback app's ``Text`` (storable in every database) of a length counted in characters (the
    length check comes first, so pydantic says "characters", not "items")."""
    return Annotated[str, Field(min_length=min_length, max_length=max_length), *Text.__metadata__]


class AskBody(BaseModel):
    prompt: Annotated[_text(1, store.MAX_PROMPT), AfterValidator(_not_blank)]


class ChooseBody(BaseModel):
    question_id: Annotated[int, Field(ge=1, le=2**31 - 1)]
    choice: store.Choice
    reason: _text(0, store.MAX_REASON) | None = None


# read after the session dependency (listed after it), as the feedback app's own JSON bodies
AskJson = Annotated[AskBody, Depends(json_body(AskBody))]
ChooseJson = Annotated[ChooseBody, Depends(json_body(ChooseBody))]


@dataclass
class PersonalSettings:
    train_every: int = 8  # new pairs of a user that queue a training of their next version
    temperature: float = 1.0
    alternative_temperature: float = 0.7  # the alternative when the user has no adapter yet
    max_new_tokens: int = 48
    seed: int | None = None  # the sides' order and the answers' random draws (None: a fresh seed per process)
    dpo: PersonalDPOConfig = field(default_factory=PersonalDPOConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)  # the cold start's best-of-N


class Deletions:
    """Per user, a count bumped when a deletion of their data starts and again when it ends (odd: one is
    running). An ask that overlapped any part of a deletion may have answered from what it removed (their
    pairs, head or adapter): ``overlapped(user_id, before)``, with ``before`` read when the ask began, says
    so. An ask that ends before a deletion starts stores its question first, and the deletion removes it."""

    def __init__(self) -> None:
        self._counts: Counter[int] = Counter()
        self._lock = threading.Lock()

    def count(self, user_id: int) -> int:
        return self._counts[user_id]

    @contextmanager
    def running(self, user_id: int) -> Iterator[None]:
        with self._lock:
            self._counts[user_id] += 1
        try:
            yield
        finally:
            with self._lock:
                self._counts[user_id] += 1

    def overlapped(self, user_id: int, before: int) -> bool:
        return before % 2 == 1 or self._counts[user_id] != before


def model_label(adapter: str | None, temperature: float, settings: PersonalSettings, n: int = 1) -> str:
    """What the page shows: "base", "population-v1" or "user-3-v2", "base best-of-4 reranked" for a reranked
    best of n samples, with the temperature when not the default."""
    name = adapter or "base"
    name = name if n == 1 else f"{name} best-of-{n} reranked"
    return name if temperature == settings.temperature else f"{name} τ={temperature:g}"


def include_personal(app: FastAPI, models: PersonalModels, settings: PersonalSettings | None = None) -> TrainingQueue:
    """Add the page and API to the feedback ``app``; returns the queue of background trainings."""
    settings = settings or PersonalSettings()
    sessions, deps = app.state.sessions, app.state.dependencies
    db, current_user, api_user, csrf_token = deps["db"], deps["user"], deps["api_user"], deps["csrf_token"]

    def train(owner: int | str) -> None:
        with sessions() as session:
            if owner == POPULATION:
                train_population(models, session, settings.dpo)
            else:
                train_user(models, session, owner, settings.dpo)

    def retrain(forgotten: Forgotten) -> str:
        """Queue the trainings of what a deletion removed (the population first: the users' versions start
        from it); returns what the deleting user is told about it."""
        if not forgotten.population:
            return ""
        queue.submit(POPULATION)
        for other in forgotten.started_from_them:
            queue.submit(other)
        left = models.version(POPULATION)
        others = sum(map(len, forgotten.started_from_them.values()))
        return (f" The shared population model had learned from your choices: its version(s) "
                f"{', '.join(f'v{v}' for v in forgotten.population)} and {others} adapter version(s) of other users "
                f"that started from them were deleted; they are being trained again without your data (meanwhile "
                f"the answers start from {f'{POPULATION}-v{left}' if left else 'the base model'}).")

    queue = TrainingQueue(train, settings.train_every)
    deletions = Deletions()
    draws = random.Random(settings.seed)  # used under models.lock only: the same requests in the same order
    reranker = Reranker(settings.rerank)
    app.state.personal_training, app.state.personal_reranker = queue, reranker

    def cold_start_head(user_id: int, session: Session) -> PreferenceHead | None:
        """The user's preference head while they have no adapter version (None outside that window or
        below ``rerank.min_pairs`` pairs). Pairs are read under the head's lock, so a deletion meanwhile
        (pairs removed first, then the head) cannot leave a head behind. The read's transaction ends before
        the fit and the sampling: on SQLite it holds the write lock, which every other request would wait for."""
        if not settings.rerank.n or models.version(user_owner(user_id)):
            return None
        with reranker.lock:
            pairs = store.preference_pairs(store.user_choices(session, user_id))
            session.rollback()
            return reranker.head(user_id, pairs)
    router = APIRouter()

    @router.get("/personal", response_class=HTMLResponse)
    def personal_page(request: Request, user: User = Depends(current_user)):
        return TEMPLATES.TemplateResponse(request, "personal.html", {"csrf": csrf_token(request), "user": user})

    @router.post("/api/personal/ask")
    def ask(*, user: User = Depends(api_user), body: AskJson, session: Session = Depends(db)):
        before = deletions.count(user.id)
        owner, head = user_owner(user.id), cold_start_head(user.id, session)
        with models.lock:  # a training that publishes meanwhile must not drop the adapters picked here
            personal, start = models.adapter(owner), models.starting_point(owner)
            if personal is not None:
                options = [(personal, settings.temperature, 1), (start, settings.temperature, 1)]
            else:
                options = [(start, settings.temperature, settings.rerank.n if head else 1),
                           (start, settings.alternative_temperature, 1)]
            draws.shuffle(options)
            try:
                samples = [[models.answer(body.prompt, adapter, t, settings.max_new_tokens, draws.randrange(2**31))
                            for _ in range(n)] for adapter, t, n in options]
            except PromptTooLong as exc:
                raise FeedbackError(f"prompt: {exc}", 422) from None
        answers = tuple(s[0] if len(s) == 1 else s[reranker.best_of_n(head, body.prompt, [a.text for a in s])[0]]
                        for s in samples)
        labels = tuple(model_label(adapter, t, settings, n) for adapter, t, n in options)
        row = store.record_question(session, user, body.prompt, tuple(a.text for a in answers), labels,
                                    tuple(a.truncated for a in answers))
        if deletions.overlapped(user.id, before):
            session.delete(row)
            session.commit()
            raise FeedbackError("your data was deleted while these answers were written (some may come from "
                                "it): ask again", 409)
        return {"question_id": row.id, "answers": [a.text.strip() for a in answers], "models": list(labels)}

    @router.post("/api/personal/choose")
    def choose(*, user: User = Depends(api_user), body: ChooseJson, session: Session = Depends(db)):
        store.record_choice(session, user, body.question_id, body.choice, body.reason)
        pairs = store.pair_count(session, user.id)
        queued = queue.trigger(user.id, pairs, models.trained_pairs(user_owner(user.id))) is not None
        return {"question_id": body.question_id, "pairs": pairs, "training_queued": queued}

    @router.get("/api/personal/learned")
    def learned(user: User = Depends(current_user), session: Session = Depends(db)):
        user_id, owner = user.id, user_owner(user.id)
        choices = [row.as_dict() for row in store.user_choices(session, user_id)]
        session.rollback()  # no transaction (SQLite: the write lock) held while waiting for the model's lock
        counts = {c: sum(row["choice"] == c for row in choices) for c in ("a", "b", "both_fine", "both_bad")}
        versions = [{k: v for k, v in info.items() if k != "config"} for info in models.version_infos(owner)]
        pairs = counts["a"] + counts["b"]
        reranked = settings.rerank.n and pairs >= settings.rerank.min_pairs
        return {"choices": choices, "counts": counts,
                "pairs": pairs, "versions": versions,
                "current_model": models.adapter(owner) or (
                    model_label(models.starting_point(owner), settings.temperature, settings, settings.rerank.n)
                    if reranked else "none yet (the starting point answers)"),
                "removed_versions": models.removed_versions(owner), "train_every": settings.train_every,
                "training_error": queue.errors.get(user_id), "population_training_error": queue.errors.get(POPULATION)}

    @router.get("/api/personal/sample")
    def before_after(user: User = Depends(current_user), session: Session = Depends(db)):
        """The user's latest question answered by the starting point (before) and by their current adapter
        (after), each with the same random draws (one seed), so that only the weights differ."""
        choices, owner = store.user_choices(session, user.id), user_owner(user.id)
        prompt = choices[-1].prompt if choices else None
        session.rollback()  # no transaction (SQLite: the write lock) held while the answers are sampled
        with models.lock:
            personal, start = models.adapter(owner), models.starting_point(owner)
            if prompt is None or personal is None:
                raise FeedbackError("no sample yet: your model has no trained version", 404)
            seed = draws.randrange(2**31)
            before, after = (models.answer(prompt, adapter, settings.temperature, settings.max_new_tokens, seed)
                             for adapter in (start, personal))
        return {"prompt": prompt, "before": before.text.strip(), "after": after.text.strip(),
                "models": [model_label(start, settings.temperature, settings), personal]}

    @router.delete("/api/personal/data")
    def delete_data(user: User = Depends(api_user), session: Session = Depends(db)):
        with deletions.running(user.id):
            deleted = store.delete_user_data(session, user)  # first: a training from now on finds no pairs
            forgotten = models.forget(user.id)
            reranker.forget(user.id)  # after the pairs: a head fitted meanwhile is dropped here
        queue.errors.pop(user.id, None)
        return {"deleted_choices": deleted, "adapters": models.versions(user_owner(user.id)),
                "population_versions_removed": forgotten.population,
                "said": f"Deleted {deleted} choices and your personal model." + retrain(forgotten)}

    app.include_router(router)
    app.mount("/personal/static", StaticFiles(directory=HERE / "static"), name="personal-static")
    return queue
